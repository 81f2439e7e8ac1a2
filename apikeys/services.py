"""State changes of API keys: create, rotate, revoke, and archiving a project (whose keys then stop). Each is
one transaction with an audit row, checks the acting member's role when an Actor acts, and invalidates the
cached copy of the key once the transaction has committed."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from apikeys import keyformat
from apikeys.auth import invalidate_cached_key
from apikeys.exceptions import InvalidKeySettings
from apikeys.models import ApiKey
from apikeys.scopes import ADMIN, ALL_SCOPES, CHAT, KNOWN_SCOPES
from apikeys.sessions import announce_key_ended
from platform_site.access import KEY_MAKERS, Actor
from platform_site.exceptions import NotPermitted
from platform_site.models import Organization, Project
from platform_site.selectors import default_project
from platform_site.services import audit_log_record, project_mark_archived

MAX_NAME = 100
MAX_ALLOWED_MODELS = 200
# The largest limits anything accepts (keys here, projects in billing): every counter and column holds them.
MAX_RPM = 10**9
MAX_TPM = 10**12
MAX_KEY_BUDGET_MICROS = 10**12  # a million USD a month
_MAX_LIMIT = {"rpm": MAX_RPM, "tpm": MAX_TPM, "monthly_budget": MAX_KEY_BUDGET_MICROS}
MAX_ROTATION_GRACE = timedelta(days=30)


def _clean_scopes(scopes: Iterable[str]) -> list[str]:
    cleaned = sorted(set(scopes))
    unknown = [scope for scope in cleaned if scope not in KNOWN_SCOPES]
    if unknown:
        raise InvalidKeySettings(
            f"Unknown scope(s): {', '.join(unknown)}. Known: {', '.join(KNOWN_SCOPES)}.", param="scopes"
        )
    if not cleaned:
        raise InvalidKeySettings("A key needs at least one scope.", param="scopes")
    if ADMIN in cleaned and cleaned != [ADMIN]:
        raise InvalidKeySettings("The admin scope cannot be combined with other scopes.", param="scopes")
    return cleaned


def _clean_limit(value: int | None, param: str) -> int | None:
    if value is None:
        return None
    maximum = _MAX_LIMIT[param]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise InvalidKeySettings(f"{param} must be a whole number from 1 to {maximum}, or empty.", param=param)
    return value


def apikey_settings_clean(
    *,
    name: str,
    scopes: Iterable[str],
    allowed_models: Iterable[str],
    rpm_limit: int | None,
    tpm_limit: int | None,
    monthly_budget_micros: int | None,
) -> dict[str, Any]:
    """A key's settings, checked and normalised as they are stored (the ApiKey fields of the same names), or
    InvalidKeySettings naming the field. Shared by creation, updates and forms that show errors beside it."""
    name = name.strip()
    if not name or len(name) > MAX_NAME:
        raise InvalidKeySettings(f"A key needs a name of 1 to {MAX_NAME} characters.", param="name")
    models = sorted({model.strip() for model in allowed_models if model.strip()})
    if len(models) > MAX_ALLOWED_MODELS:
        raise InvalidKeySettings(f"A key may list at most {MAX_ALLOWED_MODELS} models.", param="models")
    return {
        "name": name,
        "scopes": _clean_scopes(scopes),
        "allowed_models": models,
        "rpm_limit": _clean_limit(rpm_limit, "rpm"),
        "tpm_limit": _clean_limit(tpm_limit, "tpm"),
        "monthly_budget_micros": _clean_limit(monthly_budget_micros, "monthly_budget"),
    }


def _require_may_manage(by: Actor | None, key: ApiKey) -> None:
    if by is None:
        return
    if key.organization_id != by.organization.pk:
        raise NotPermitted("This key belongs to another organization.")
    if key.is_admin:
        by.require_manager("manage admin keys")
    elif not by.may_manage_key_of(key.created_by_id):
        raise NotPermitted("Members can manage only the keys they created; ask an owner or admin.")


@transaction.atomic
def apikey_create(
    *,
    organization: Organization,
    name: str,
    project: Project | None = None,
    scopes: Iterable[str] = ALL_SCOPES,
    allowed_models: Iterable[str] = (),
    expires_at: datetime | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    monthly_budget_micros: int | None = None,
    created_by: User | None = None,
    actor_label: str = "",
    by: Actor | None = None,
    reason: str = "",
) -> tuple[ApiKey, str]:
    """Create a key and return it with its raw secret. The raw secret is returned exactly once: only its
    HMAC is stored, so no later call can show it again.

    A key with the admin scope is an admin key of the organization; any other key belongs to `project` (the
    organization's default project when none is given). `reason` says in the audit row why a key was made
    by something other than a person's own request (the playground)."""
    cleaned = apikey_settings_clean(name=name, scopes=scopes, allowed_models=allowed_models, rpm_limit=rpm_limit,
                                    tpm_limit=tpm_limit, monthly_budget_micros=monthly_budget_micros)
    cleaned_scopes = cleaned["scopes"]
    if expires_at is not None and expires_at <= timezone.now():
        raise InvalidKeySettings("The expiry must be in the future.", param="expires_at")
    if by is not None:
        organization = by.organization
        created_by = by.user
        if cleaned_scopes == [ADMIN]:
            by.require_manager("create admin keys")
        else:
            by.require_key_maker()
    if cleaned_scopes == [ADMIN]:
        if project is not None:
            raise InvalidKeySettings(
                "A project key cannot hold the admin scope; create an admin key instead.", param="scopes"
            )
    else:
        project = project if project is not None else default_project(organization=organization)
        if project.organization_id != organization.pk:
            raise NotPermitted("This project belongs to another organization.")
        if project.archived_at is not None:
            raise InvalidKeySettings("Keys cannot be created in an archived project.", param="project")
    public_id = keyformat.new_public_id()
    while ApiKey.objects.filter(public_id=public_id).exists():
        public_id = keyformat.new_public_id()
    secret = keyformat.new_secret()
    key = ApiKey.objects.create(
        organization=organization,
        project=project,
        public_id=public_id,
        secret_hash=keyformat.hash_secret(public_id, secret),
        expires_at=expires_at,
        **cleaned,
        created_by=created_by if created_by is not None and created_by.is_authenticated else None,
    )
    details: dict[str, Any] = {"data": {"scopes": key.scopes}, "name": key.name, "allowed_models": key.allowed_models}
    if reason:
        details["reason"] = reason
    audit_log_record(
        organization=organization,
        action="api_key.created",
        target=key.public_id,
        actor=created_by,
        actor_label=actor_label,
        project=project,
        by=by,
        details=details,
    )
    transaction.on_commit(lambda: invalidate_cached_key(public_id))
    return key, keyformat.format_key(public_id, secret)


def playground_key_create(*, by: Actor, project: Project) -> tuple[ApiKey, str]:
    """The dashboard playground's key for the signed-in member `by`, in `project`, and its raw secret, returned
    exactly once: the page keeps it in memory only. It is a real key, metered and billed like any other, so
    it can do no more than the playground needs (chat), ends by itself after KEYWAY_PLAYGROUND_KEY_TTL
    seconds, and is listed among the member's keys under a recognisable name, where they can revoke it.

    Readers may not have one: a playground call spends the organization's money, and readers only look."""
    if by.user is None:
        raise NotPermitted("A playground key is made for a signed-in member only.")
    if by.role not in KEY_MAKERS:
        raise NotPermitted(f"Readers cannot use the playground, whose calls are billed; your role is {by.role}.")
    name = f"Playground · {by.label}"[:MAX_NAME]
    expires_at = timezone.now() + timedelta(seconds=settings.KEYWAY_PLAYGROUND_KEY_TTL)
    return apikey_create(
        organization=by.organization, project=project, name=name, scopes=[CHAT], expires_at=expires_at, by=by,
        reason="playground",
    )


@transaction.atomic
def apikey_update(
    *,
    key: ApiKey,
    name: str,
    scopes: Iterable[str],
    allowed_models: Iterable[str],
    expires_at: datetime | None,
    rpm_limit: int | None,
    tpm_limit: int | None,
    monthly_budget_micros: int | None,
    actor: User | None = None,
    actor_label: str = "",
) -> ApiKey:
    """Change a key's settings (staff, in the admin): checked like a new key's, audited, and seen by every
    worker once it commits. A key stays in its organization and project, and an admin key stays one."""
    key = ApiKey.objects.select_for_update(of=("self",)).select_related("organization", "project").get(pk=key.pk)
    if key.revoked_at is not None:
        raise InvalidKeySettings("A revoked key cannot be changed.", param="api_key_id")
    wanted = apikey_settings_clean(name=name, scopes=scopes, allowed_models=allowed_models, rpm_limit=rpm_limit,
                                   tpm_limit=tpm_limit, monthly_budget_micros=monthly_budget_micros)
    if (wanted["scopes"] == [ADMIN]) != (key.scopes == [ADMIN]):
        raise InvalidKeySettings("An admin key stays an admin key, and a project key a project key.", param="scopes")
    wanted["expires_at"] = expires_at
    changes = {field: value for field, value in wanted.items() if getattr(key, field) != value}
    if not changes:
        return key
    for field, value in changes.items():
        setattr(key, field, value)
    key.save(update_fields=list(changes))
    audit_log_record(
        organization=key.organization,
        action="api_key.updated",
        target=key.public_id,
        actor=actor,
        actor_label=actor_label,
        project=key.project,
        details={"changes_requested": {
            field: value.isoformat() if isinstance(value, datetime) else value for field, value in changes.items()
        }},
    )
    public_id = key.public_id
    transaction.on_commit(lambda: invalidate_cached_key(public_id))
    return key


@transaction.atomic
def apikey_rotate(
    *,
    key: ApiKey,
    grace: timedelta | None = None,
    actor: User | None = None,
    actor_label: str = "",
    by: Actor | None = None,
) -> tuple[ApiKey, str]:
    """Give the key a new secret and return it, exactly once. The old secret keeps working for `grace`
    (default KEYWAY_ROTATION_GRACE_SECONDS, at most 30 days; zero ends it at once) so deployed clients can
    be switched over, then it is refused."""
    key = ApiKey.objects.select_for_update(of=("self",)).select_related("organization", "project").get(pk=key.pk)
    _require_may_manage(by, key)
    if key.revoked_at is not None:
        raise InvalidKeySettings("A revoked key cannot be rotated.", param="api_key_id")
    if grace is None:
        grace = timedelta(seconds=settings.KEYWAY_ROTATION_GRACE_SECONDS)
    if not timedelta(0) <= grace <= MAX_ROTATION_GRACE:
        raise InvalidKeySettings("The grace period must be between 0 seconds and 30 days.", param="grace_period")
    now = timezone.now()
    secret = keyformat.new_secret()
    key.previous_secret_hash = key.secret_hash
    key.previous_secret_expires_at = now + grace
    key.secret_hash = keyformat.hash_secret(key.public_id, secret)
    key.rotated_at = now
    key.save(update_fields=["previous_secret_hash", "previous_secret_expires_at", "secret_hash", "rotated_at"])
    audit_log_record(
        organization=key.organization,
        action="api_key.updated",
        target=key.public_id,
        actor=actor,
        actor_label=actor_label,
        project=key.project,
        by=by,
        details={
            "changes_requested": {"rotated": True},
            "previous_secret_expires_at": key.previous_secret_expires_at.isoformat(),
        },
    )
    public_id = key.public_id
    transaction.on_commit(lambda: invalidate_cached_key(public_id))
    return key, keyformat.format_key(key.public_id, secret)


@transaction.atomic
def apikey_revoke(
    *, key: ApiKey, actor: User | None = None, actor_label: str = "", by: Actor | None = None
) -> ApiKey:
    """Revoke the key for good: both its current and any previous secret are refused from now on."""
    key = ApiKey.objects.select_for_update(of=("self",)).select_related("organization", "project").get(pk=key.pk)
    _require_may_manage(by, key)
    if key.revoked_at is not None:
        return key
    key.revoked_at = timezone.now()
    key.save(update_fields=["revoked_at"])
    audit_log_record(
        organization=key.organization,
        action="api_key.deleted",
        target=key.public_id,
        actor=actor,
        actor_label=actor_label,
        project=key.project,
        by=by,
    )
    public_id = key.public_id

    def forget() -> None:
        invalidate_cached_key(public_id)
        announce_key_ended([public_id])

    transaction.on_commit(forget)
    return key


@transaction.atomic
def project_archive(*, by: Actor, project: Project) -> Project:
    """Archive a project: its keys are refused from now on, on every worker within a second."""
    project = project_mark_archived(by=by, project=project)
    public_ids = list(ApiKey.objects.filter(project=project).values_list("public_id", flat=True))
    def forget() -> None:
        for public_id in public_ids:
            invalidate_cached_key(public_id)
        announce_key_ended(public_ids)

    transaction.on_commit(forget)
    return project
