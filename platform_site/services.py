"""State changes of tenancy. Each runs in a transaction and leaves an audit row."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import User
from django.db import transaction
from django.utils.text import slugify

from platform_site.models import AuditLog, Membership, Organization


def audit_log_record(
    *,
    organization: Organization,
    action: str,
    target: str = "",
    actor: User | None = None,
    actor_label: str = "",
    details: dict[str, Any] | None = None,
) -> AuditLog:
    return AuditLog.objects.create(
        organization=organization,
        actor=actor if actor is not None and actor.is_authenticated else None,
        actor_label=actor_label or (str(actor) if actor is not None else "system"),
        action=action,
        target=target,
        details=details or {},
    )


@transaction.atomic
def organization_create(
    *, name: str, slug: str = "", owner: User | None = None, actor_label: str = ""
) -> Organization:
    organization = Organization.objects.create(name=name, slug=slug or slugify(name)[:64])
    if owner is not None:
        Membership.objects.create(organization=organization, user=owner, role=Membership.Role.OWNER)
    audit_log_record(
        organization=organization,
        action="organization.created",
        target=organization.slug,
        actor=owner,
        actor_label=actor_label,
    )
    return organization


@transaction.atomic
def membership_set(
    *,
    organization: Organization,
    user: User,
    role: str,
    actor: User | None = None,
    actor_label: str = "",
) -> Membership:
    membership, _ = Membership.objects.update_or_create(
        organization=organization, user=user, defaults={"role": role}
    )
    audit_log_record(
        organization=organization,
        action="membership.set",
        target=str(user),
        actor=actor,
        actor_label=actor_label,
        details={"role": role},
    )
    return membership
