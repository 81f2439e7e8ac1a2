"""The playground and its key: who may mint one, in which organization and project, with which scope and
lifetime; that minting is audited, CSRF-protected, never cached and rate-limited; and that the key works on
/v1/chat/completions (metered and billed like any other), does nothing else, and expires on its own."""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from allauth.account.models import EmailAddress
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.test import Client

from apikeys import auth
from apikeys.models import ApiKey
from apikeys.services import project_archive
from billing import metering
from billing.models import Price, UsageEvent
from completions.services import provider_upsert_openai_compatible
from platform_site.access import system_actor
from platform_site.models import AuditLog, Organization, Role
from platform_site.selectors import default_project
from platform_site.services import membership_set, organization_create, project_create
from tests.conftest import bearer


def _user(email: str) -> User:
    user = get_user_model().objects.create_user(username=email.split("@")[0], email=email, password="pw-" + "x" * 12)
    EmailAddress.objects.create(user=user, email=email, verified=True, primary=True)
    return user


def _client(user: User, **options: Any) -> Client:
    client = Client(**options)
    client.force_login(user)
    return client


def _member(organization: Organization, email: str, role: str = Role.MEMBER) -> User:
    user = _user(email)
    membership_set(organization=organization, user=user, role=role, actor_label="test")
    return user


@pytest.fixture
def alice(db: None) -> User:
    return _user("alice@acme.test")


@pytest.fixture
def acme(alice: User) -> Organization:
    return organization_create(name="Acme", owner=alice)


@pytest.fixture
def chat_model(db: None) -> None:
    provider_upsert_openai_compatible(name="upstream", base_url="http://127.0.0.1:9/v1", models=["chat-a", "chat-b"])
    provider_upsert_openai_compatible(
        name="upstream", base_url="http://127.0.0.1:9/v1", models=["embed"], capabilities=["embeddings"]
    )


# --- The page ---------------------------------------------------------------------------------------------------

@pytest.mark.django_db
@pytest.mark.parametrize("role", [Role.OWNER, Role.ADMIN, Role.MEMBER])
def test_owners_admins_and_members_get_the_chat_form_with_every_chat_model(
    role: str, acme: Organization, chat_model: None
) -> None:
    page = _client(_member(acme, f"{role}@acme.test", role)).get("/playground").content.decode()
    assert 'data-mint-url="/playground/key"' in page and 'data-chat-url="/v1/chat/completions"' in page
    assert re.findall(r'<option value="([^"]+)" data-context', page) == ["chat-a", "chat-b"]
    assert "dashboard/playground.js" in page and "csrfmiddlewaretoken" in page
    # The page itself holds no key: one is made when the first message is sent.
    assert "sk-kw-" not in page and not ApiKey.objects.exists()


@pytest.mark.django_db
def test_readers_are_told_why_they_cannot_use_the_playground_and_cannot_mint(
    acme: Organization, chat_model: None
) -> None:
    client = _client(_member(acme, "rex@acme.test", Role.READER))
    page = client.get("/playground").content.decode()
    assert "Readers cannot use the playground" in page and "data-mint-url" not in page
    response = client.post("/playground/key")
    assert response.status_code == 403 and response.json()["error"]["code"] == "insufficient_permissions"
    assert not ApiKey.objects.exists()


@pytest.mark.django_db
def test_a_pinned_organization_offers_its_pinned_model_only(alice: User, acme: Organization, chat_model: None) -> None:
    acme.pinned_model = "chat-b"
    acme.save(update_fields=["pinned_model"])
    page = _client(alice).get("/playground").content.decode()
    assert re.findall(r'<option value="([^"]+)" data-context', page) == ["chat-b"]


@pytest.mark.django_db
def test_without_a_chat_model_the_page_says_so(alice: User, acme: Organization) -> None:
    page = _client(alice).get("/playground").content.decode()
    assert "No chat model is enabled" in page and "data-mint-url" not in page


# --- Minting ----------------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_a_member_mints_a_chat_only_key_of_their_own_that_expires_is_audited_and_is_never_cached(
    acme: Organization, settings: Any
) -> None:
    settings.KEYWAY_PLAYGROUND_KEY_TTL = 900
    mia = _member(acme, "mia@acme.test")
    client = _client(mia)
    response = client.post("/playground/key")
    assert response.status_code == 201 and response["Cache-Control"] == "no-store"
    minted = response.json()
    key = ApiKey.objects.get(public_id=minted["id"])
    assert minted["key"].startswith(f"sk-kw-{key.public_id}-") and minted["expires_in"] == 900
    assert key.organization == acme and key.project == default_project(organization=acme)
    assert key.scopes == ["chat"] and key.allowed_models == [] and key.created_by == mia
    assert key.name == "Playground · mia@acme.test"
    assert key.expires_at is not None and 895 <= (key.expires_at - key.created_at).total_seconds() <= 900
    audit = AuditLog.objects.get(action="api_key.created", target=key.public_id)
    assert audit.actor == mia and audit.details["reason"] == "playground"
    assert audit.details["data"]["scopes"] == ["chat"]
    # The secret is in that one answer only: not in the database, the audit log or the session.
    secret = minted["key"].rsplit("-", 1)[1]
    assert secret not in str(ApiKey.objects.filter(pk=key.pk).values().get())
    assert secret not in str(list(AuditLog.objects.values())) and secret not in str(dict(client.session))
    # The member sees it among the keys, named for what it is, and may revoke it.
    listing = client.get("/settings/api-keys").content.decode()
    assert "Playground · mia@acme.test" in listing and f"/settings/api-keys/{key.public_id}/revoke" in listing
    client.post(f"/settings/api-keys/{key.public_id}/revoke")
    key.refresh_from_db()
    assert key.revoked_at is not None


@pytest.mark.django_db
def test_a_key_is_minted_in_the_chosen_project_of_the_organization_and_never_in_an_archived_one(
    alice: User, acme: Organization
) -> None:
    research = project_create(by=system_actor(acme), name="Research")
    client = _client(alice)
    minted = client.post("/playground/key", {"project": research.public_id}).json()
    assert minted["project"] == {"id": research.public_id, "name": "Research"}
    assert ApiKey.objects.get(public_id=minted["id"]).project == research
    project_archive(by=system_actor(acme), project=research)
    response = client.post("/playground/key", {"project": research.public_id})
    assert response.status_code == 400 and "archived" in response.json()["error"]["message"]


@pytest.mark.django_db
def test_another_organizations_member_cannot_mint_into_it(alice: User, acme: Organization) -> None:
    mallory = _user("mallory@globex.test")
    globex = organization_create(name="Globex", owner=mallory)
    client = _client(mallory)
    response = client.post("/playground/key", {"project": default_project(organization=acme).public_id})
    assert response.status_code == 404 and "Acme" not in response.content.decode()
    assert not ApiKey.objects.filter(organization=acme).exists()
    # What Mallory may mint lands in her own organization.
    minted = client.post("/playground/key").json()
    key = ApiKey.objects.get(public_id=minted["id"])
    assert key.organization == globex and key.project == default_project(organization=globex)
    assert minted["organization"]["id"] == globex.public_id


@pytest.mark.django_db
def test_minting_is_refused_signed_out_without_the_csrf_token_and_by_get(alice: User, acme: Organization) -> None:
    signed_out = Client().post("/playground/key")
    assert signed_out.status_code == 401 and signed_out.json()["error"]["code"] == "not_signed_in"
    guarded = _client(alice, enforce_csrf_checks=True)
    assert guarded.post("/playground/key").status_code == 403
    assert not ApiKey.objects.exists()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', guarded.get("/playground").content.decode())
    assert token is not None
    assert guarded.post("/playground/key", headers={"X-CSRFToken": token.group(1)}).status_code == 201
    assert guarded.get("/playground/key").status_code == 405


@pytest.mark.django_db
def test_minting_is_rate_limited_per_user(alice: User, acme: Organization, settings: Any) -> None:
    settings.KEYWAY_PLAYGROUND_KEYS_PER_HOUR = 2
    client = _client(alice)
    assert [client.post("/playground/key").status_code for _ in range(2)] == [201, 201]
    refused = client.post("/playground/key")
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and refused["Cache-Control"] == "no-store"
    assert ApiKey.objects.count() == 2
    # Another member has a count of their own.
    assert _client(_member(acme, "mia@acme.test")).post("/playground/key").status_code == 201


@pytest.mark.django_db
def test_with_redis_unreachable_minting_fails_closed_and_says_why(
    alice: User, acme: Organization, settings: Any
) -> None:
    """The per-user count cannot be kept without the cache, so no key is minted: a 503 that names the cause,
    not a 429 that would blame the member."""
    from platform_site.kernel import breaker
    from tests.e2e.server import free_port

    settings.CACHES = {"default": {"BACKEND": "platform_site.cache.SharedClientRedisCache",
                                   "LOCATION": f"redis://127.0.0.1:{free_port()}/0",
                                   "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}}}
    settings.REDIS_URL = settings.CACHES["default"]["LOCATION"]
    try:
        response = _client(alice).post("/playground/key")
        assert response.status_code == 503 and response.json()["error"]["code"] == "rate_limits_unavailable"
        assert not ApiKey.objects.exists()
    finally:
        breaker.redis.reset()


# --- The key on the API -----------------------------------------------------------------------------------------

def _mint(organization: Organization, email: str) -> dict[str, Any]:
    response = _client(_member(organization, email)).post("/playground/key")
    assert response.status_code == 201, response.content
    return response.json()  # type: ignore[no-any-return]


def _chat(model: str = "ok") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "stream": True,
            "stream_options": {"include_usage": True}}


@pytest.fixture
async def fake_upstream(org: Organization, upstream: tuple[int, Any]) -> Organization:
    port, _ = upstream

    def setup() -> None:
        provider_upsert_openai_compatible(name="fake", base_url=f"http://127.0.0.1:{port}/v1", models=["ok"])
        provider_upsert_openai_compatible(
            name="fake", base_url=f"http://127.0.0.1:{port}/v1", models=["embed-ok"], capabilities=["embeddings"]
        )
        Price.objects.create(model="ok", input_per_million_micros=1_000_000, output_per_million_micros=1_000_000_000)

    await sync_to_async(setup)()
    return org


@pytest.mark.django_db(transaction=True)
async def test_the_minted_key_streams_a_chat_answer_metered_and_billed_to_its_project(
    asgi_client: Any, fake_upstream: Organization
) -> None:
    minted = await sync_to_async(_mint)(fake_upstream, "mia@acme.test")
    response = await asgi_client.post("/v1/chat/completions", headers=bearer(minted["key"]), json=_chat())
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    assert any(chunk["choices"] and chunk["choices"][0]["delta"].get("content") for chunk in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] > 0 and response.text.endswith("data: [DONE]\n\n")
    await metering.flush()
    event = await sync_to_async(UsageEvent.objects.select_related("project").get)(api_key__public_id=minted["id"])
    assert event.organization_id == fake_upstream.pk and event.project is not None
    assert event.project.public_id == minted["project"]["id"] and event.cost_micros > 0


@pytest.mark.django_db(transaction=True)
async def test_the_minted_key_can_chat_and_do_nothing_else(asgi_client: Any, fake_upstream: Organization) -> None:
    minted = await sync_to_async(_mint)(fake_upstream, "mia@acme.test")
    key = bearer(minted["key"])
    refused = {
        "embeddings": await asgi_client.post("/v1/embeddings", headers=key, json={"model": "embed-ok", "input": "x"}),
        "responses": await asgi_client.post("/v1/responses", headers=key, json={"model": "ok", "input": "hi"}),
        "models": await asgi_client.get("/v1/models", headers=key),
        "management": await asgi_client.get("/v1/organization/projects", headers=key),
        "audit": await asgi_client.get("/v1/organization/audit_logs", headers=key),
        "billing": await asgi_client.get("/api/billing/balance", headers=key),
    }
    for name, response in refused.items():
        assert response.status_code in (401, 403), (name, response.status_code, response.text[:200])
        assert "error" in response.json(), name
    assert refused["embeddings"].json()["error"]["code"] == "missing_scope"
    assert (await asgi_client.post("/v1/chat/completions", headers=key, json=_chat())).status_code == 200


@pytest.mark.django_db(transaction=True)
async def test_the_minted_key_expires_on_its_own(
    asgi_client: Any, fake_upstream: Organization, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    settings.KEYWAY_PLAYGROUND_KEY_TTL = 120
    minted = await sync_to_async(_mint)(fake_upstream, "mia@acme.test")
    key = await ApiKey.objects.aget(public_id=minted["id"])
    assert key.expires_at is not None and key.expires_at - key.created_at <= timedelta(seconds=120)
    first = await asgi_client.post("/v1/chat/completions", headers=bearer(minted["key"]), json=_chat())
    assert first.status_code == 200
    # Two minutes and a second later, by the clock the key check reads.
    later = time.time() + 121
    monkeypatch.setattr(auth, "time", SimpleNamespace(time=lambda: later))
    response = await asgi_client.post("/v1/chat/completions", headers=bearer(minted["key"]), json=_chat())
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
