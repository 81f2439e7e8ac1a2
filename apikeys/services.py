"""State changes of API keys: create, rotate, revoke. Each is one transaction with an audit row, and each
invalidates the cached copy of the key once the transaction has committed."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from apikeys import keyformat
from apikeys.auth import invalidate_cached_key
from apikeys.exceptions import ApiKeyError
from apikeys.models import ApiKey
from apikeys.scopes import ALL_SCOPES
from platform_site.models import Organization
from platform_site.services import audit_log_record


def _clean_scopes(scopes: Iterable[str]) -> list[str]:
    cleaned = sorted(set(scopes))
    unknown = [scope for scope in cleaned if scope not in ALL_SCOPES]
    if unknown:
        raise ApiKeyError(f"Unknown scope(s): {', '.join(unknown)}. Known: {', '.join(ALL_SCOPES)}.")
    return cleaned


@transaction.atomic
def apikey_create(
    *,
    organization: Organization,
    name: str,
    scopes: Iterable[str] = ALL_SCOPES,
    allowed_models: Iterable[str] = (),
    expires_at: datetime | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    monthly_budget_micros: int | None = None,
    created_by: User | None = None,
    actor_label: str = "",
) -> tuple[ApiKey, str]:
    """Create a key and return it with its raw secret. The raw secret is returned exactly once: only its
    HMAC is stored, so no later call can show it again."""
    public_id = keyformat.new_public_id()
    while ApiKey.objects.filter(public_id=public_id).exists():
        public_id = keyformat.new_public_id()
    secret = keyformat.new_secret()
    key = ApiKey.objects.create(
        organization=organization,
        name=name,
        public_id=public_id,
        secret_hash=keyformat.hash_secret(public_id, secret),
        scopes=_clean_scopes(scopes),
        allowed_models=sorted(set(allowed_models)),
        expires_at=expires_at,
        rpm_limit=rpm_limit,
        tpm_limit=tpm_limit,
        monthly_budget_micros=monthly_budget_micros,
        created_by=created_by if created_by is not None and created_by.is_authenticated else None,
    )
    audit_log_record(
        organization=organization,
        action="apikey.created",
        target=key.masked,
        actor=created_by,
        actor_label=actor_label,
        details={"name": name, "scopes": key.scopes, "allowed_models": key.allowed_models},
    )
    transaction.on_commit(lambda: invalidate_cached_key(public_id))
    return key, keyformat.format_key(public_id, secret)


@transaction.atomic
def apikey_rotate(
    *,
    key: ApiKey,
    grace: timedelta | None = None,
    actor: User | None = None,
    actor_label: str = "",
) -> tuple[ApiKey, str]:
    """Give the key a new secret and return it, exactly once. The old secret keeps working for `grace`
    (default KEYWAY_ROTATION_GRACE_SECONDS) so deployed clients can be switched over, then it is refused."""
    key = ApiKey.objects.select_for_update().get(pk=key.pk)
    if key.revoked_at is not None:
        raise ApiKeyError("A revoked key cannot be rotated.")
    if grace is None:
        grace = timedelta(seconds=settings.KEYWAY_ROTATION_GRACE_SECONDS)
    now = timezone.now()
    secret = keyformat.new_secret()
    key.previous_secret_hash = key.secret_hash
    key.previous_secret_expires_at = now + grace
    key.secret_hash = keyformat.hash_secret(key.public_id, secret)
    key.rotated_at = now
    key.save(update_fields=["previous_secret_hash", "previous_secret_expires_at", "secret_hash", "rotated_at"])
    audit_log_record(
        organization=key.organization,
        action="apikey.rotated",
        target=key.masked,
        actor=actor,
        actor_label=actor_label,
        details={"previous_secret_expires_at": key.previous_secret_expires_at.isoformat()},
    )
    public_id = key.public_id
    transaction.on_commit(lambda: invalidate_cached_key(public_id))
    return key, keyformat.format_key(key.public_id, secret)


@transaction.atomic
def apikey_revoke(*, key: ApiKey, actor: User | None = None, actor_label: str = "") -> ApiKey:
    """Revoke the key for good: both its current and any previous secret are refused from now on."""
    key = ApiKey.objects.select_for_update().get(pk=key.pk)
    if key.revoked_at is not None:
        return key
    key.revoked_at = timezone.now()
    key.save(update_fields=["revoked_at"])
    audit_log_record(
        organization=key.organization, action="apikey.revoked", target=key.masked, actor=actor,
        actor_label=actor_label,
    )
    public_id = key.public_id
    transaction.on_commit(lambda: invalidate_cached_key(public_id))
    return key
