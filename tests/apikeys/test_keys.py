from __future__ import annotations

import math
import string
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from apikeys import auth, keyformat
from apikeys.auth import authenticate_key
from apikeys.exceptions import ApiKeyError, InvalidApiKey, MissingScope, ModelNotAllowed
from apikeys.models import ApiKey
from apikeys.services import apikey_create, apikey_revoke, apikey_rotate
from platform_site.models import AuditLog, Organization

pytestmark = pytest.mark.django_db(transaction=True)


def test_key_has_the_documented_shape_and_at_least_256_bits() -> None:
    raw = keyformat.format_key(keyformat.new_public_id(), keyformat.new_secret())
    public_id, secret = keyformat.parse_key(raw)  # type: ignore[misc]
    assert raw.startswith("sk-kw-") and raw == f"sk-kw-{public_id}-{secret}"
    assert len(secret) * math.log2(len(string.ascii_letters + string.digits)) >= 256


def test_only_an_hmac_of_the_secret_is_stored(api_key: tuple[ApiKey, str]) -> None:
    key, raw = api_key
    public_id, secret = keyformat.parse_key(raw)  # type: ignore[misc]
    key.refresh_from_db()
    assert key.public_id == public_id
    assert secret not in key.secret_hash and raw not in str(ApiKey.objects.filter(pk=key.pk).values().get())
    assert key.secret_hash == keyformat.hash_secret(public_id, secret)
    assert AuditLog.objects.filter(action="api_key.created", target=key.public_id).exists()
    assert secret not in str(list(AuditLog.objects.values()))


@pytest.mark.parametrize(
    "raw",
    ["", "Bearer", "sk-kw-short-x", "sk-other-abcdefghijkl-" + "a" * 44, "sk-kw-ABCDEFGHIJKL-" + "a" * 44],
)
async def test_malformed_keys_are_refused_without_a_lookup(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_lookup(public_id: str) -> None:
        raise AssertionError("a malformed key must not reach the cache or the database")

    monkeypatch.setattr(auth, "_fetch_record", no_lookup)
    with pytest.raises(InvalidApiKey):
        await authenticate_key(raw)


async def test_unknown_and_wrong_secrets_are_refused(api_key: tuple[ApiKey, str]) -> None:
    key, raw = api_key
    with pytest.raises(InvalidApiKey):
        await authenticate_key(keyformat.format_key(key.public_id, keyformat.new_secret()))
    with pytest.raises(InvalidApiKey):
        await authenticate_key(keyformat.format_key("zzzzzzzzzzzz", keyformat.new_secret()))
    assert (await authenticate_key(raw)).public_id == key.public_id


async def test_revoked_key_is_refused_at_once_in_the_same_process(api_key: tuple[ApiKey, str]) -> None:
    from asgiref.sync import sync_to_async

    key, raw = api_key
    await authenticate_key(raw)  # now cached locally and in the shared cache
    await sync_to_async(apikey_revoke)(key=key, actor_label="test")
    with pytest.raises(InvalidApiKey):
        await authenticate_key(raw)


async def test_expired_key_is_refused(org: Organization) -> None:
    from asgiref.sync import sync_to_async

    key, raw = await sync_to_async(apikey_create)(
        organization=org, name="old", expires_at=timezone.now() + timedelta(seconds=60)
    )
    await ApiKey.objects.filter(pk=key.pk).aupdate(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(InvalidApiKey):
        await authenticate_key(raw)


async def test_rotated_key_old_secret_works_during_grace_then_is_refused(api_key: tuple[ApiKey, str]) -> None:
    from asgiref.sync import sync_to_async

    key, old_raw = api_key
    key, new_raw = await sync_to_async(apikey_rotate)(key=key, grace=timedelta(hours=1), actor_label="test")
    assert new_raw != old_raw
    assert (await authenticate_key(old_raw)).id == key.id
    assert (await authenticate_key(new_raw)).id == key.id

    # Grace over: rotating again with no grace leaves only the newest secret valid.
    key, newest_raw = await sync_to_async(apikey_rotate)(key=key, grace=timedelta(0), actor_label="test")
    with pytest.raises(InvalidApiKey):
        await authenticate_key(old_raw)
    with pytest.raises(InvalidApiKey):
        await authenticate_key(new_raw)
    assert (await authenticate_key(newest_raw)).id == key.id
    assert await sync_to_async(AuditLog.objects.filter(action="api_key.updated").count)() == 2


def test_revoked_key_cannot_be_rotated(api_key: tuple[ApiKey, str]) -> None:
    key, _ = api_key
    apikey_revoke(key=key)
    with pytest.raises(ApiKeyError):
        apikey_rotate(key=key)


async def test_scopes_and_allowed_models_are_enforced(org: Organization) -> None:
    from asgiref.sync import sync_to_async

    _, raw = await sync_to_async(apikey_create)(
        organization=org, name="read-only", scopes=["models:read"], allowed_models=["m1"]
    )
    key = await authenticate_key(raw)
    key.require_scope("models:read")
    with pytest.raises(MissingScope):
        key.require_scope("chat")
    key.require_model("m1")
    with pytest.raises(ModelNotAllowed):
        key.require_model("m2")


def test_unknown_scope_is_rejected(org: Organization) -> None:
    with pytest.raises(ApiKeyError):
        apikey_create(organization=org, name="bad", scopes=["chat", "root"])


def test_management_commands_create_and_revoke_keys(org: Organization) -> None:
    out = StringIO()
    call_command("createapikey", org.slug, "--name", "ci", "--scopes", "chat,models:read", stdout=out)
    raw = out.getvalue().strip()
    public_id, _ = keyformat.parse_key(raw)  # type: ignore[misc]
    key = ApiKey.objects.get(public_id=public_id)
    assert key.scopes == ["chat", "models:read"] and key.revoked_at is None
    call_command("revokeapikey", raw, stdout=StringIO())
    key.refresh_from_db()
    assert key.revoked_at is not None


def test_createorg_command_creates_an_organization(db: None) -> None:
    out = StringIO()
    call_command("createorg", "Initech", stdout=out)
    assert Organization.objects.filter(slug=out.getvalue().strip()).exists()


async def test_last_used_at_is_written_at_most_once_a_minute(api_key: tuple[ApiKey, str]) -> None:
    import asyncio

    from asgiref.sync import sync_to_async

    key, raw = api_key
    await authenticate_key(raw)
    await asyncio.gather(*auth._background)
    await sync_to_async(key.refresh_from_db)()
    first = key.last_used_at
    assert first is not None
    for _ in range(3):
        await authenticate_key(raw)
    await asyncio.gather(*auth._background)
    await sync_to_async(key.refresh_from_db)()
    assert key.last_used_at == first


@pytest.mark.skipif(not settings.REDIS_URL, reason="the shared key cache exists only with REDIS_URL")
def test_a_copy_loaded_before_a_revocation_committed_is_never_trusted_after_it(api_key: tuple[ApiKey, str]) -> None:
    """The race: a worker reads the key's row, the revocation commits and clears the shared cache, and
    then the worker writes what it read into the cache. That copy must not serve the revoked key."""
    key, _ = api_key

    def load_then_lose_the_race(public_id: str) -> Any:
        record = auth._query_record(public_id)  # read while the key is live
        apikey_revoke(key=key, actor_label="test")  # commits (and invalidates) before the copy is written
        return record

    stale = auth._fetch_record(key.public_id, load=load_then_lose_the_race)
    assert stale is not None and not stale.revoked  # what the racing worker itself saw
    fresh = auth._fetch_record(key.public_id)
    assert fresh is not None and fresh.revoked
