"""State changes of tenancy. Each runs in a transaction, checks the acting member's role (platform_site.access)
and leaves an audit row."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.text import slugify

from platform_site.access import Actor
from platform_site.exceptions import Conflict, NotFound, TenancyError
from platform_site.models import AuditLog, Invitation, Membership, Organization, Profile, Project, Role

DEFAULT_PROJECT_NAME = "Default project"
MAX_INVITE_DAYS = 30


def audit_log_record(
    *,
    organization: Organization,
    action: str,
    target: str = "",
    actor: User | None = None,
    actor_label: str = "",
    details: dict[str, Any] | None = None,
    project: Project | None = None,
    by: Actor | None = None,
) -> AuditLog:
    """Append an audit row. `by` (an Actor) names user, admin key and address at once; `actor` and
    `actor_label` serve callers that act without one (the shell, billing's staff actions)."""
    if by is not None:
        actor = by.user
        actor_label = actor_label or by.label
    return AuditLog.objects.create(
        organization=organization,
        project=project,
        actor=actor if actor is not None and actor.is_authenticated else None,
        actor_label=(actor_label or (str(actor) if actor is not None else "system"))[:64],
        actor_api_key=by.api_key_public_id if by is not None else "",
        ip_address=by.ip_address if by is not None else None,
        action=action,
        target=target[:200],
        details=details or {},
    )


def user_profile_ensure(*, user: User) -> Profile:
    profile, _ = Profile.objects.get_or_create(user=user)
    return profile


def _clean_name(name: str, *, what: str, limit: int) -> str:
    """A name as typed, trimmed; empty or longer than the column is refused, never silently cut."""
    name = name.strip()
    if not name or len(name) > limit:
        raise TenancyError(f"{what} needs a name of 1 to {limit} characters.", param="name", code="invalid_value")
    return name


def _unique_slug(name: str) -> str:
    base = slugify(name)[:56] or "org"
    slug = base
    while Organization.objects.filter(slug=slug).exists():
        slug = f"{base}-{secrets.token_hex(3)}"
    return slug


@transaction.atomic
def organization_create(
    *, name: str, slug: str = "", owner: User | None = None, actor_label: str = ""
) -> Organization:
    """A new organization with its default project; `owner`, when given, becomes its first owner."""
    name = _clean_name(name, what="An organization", limit=200)
    organization = Organization.objects.create(name=name, slug=slug or _unique_slug(name))
    project = Project.objects.create(organization=organization, name=DEFAULT_PROJECT_NAME, is_default=True)
    if owner is not None:
        user_profile_ensure(user=owner)
        Membership.objects.create(organization=organization, user=owner, role=Role.OWNER)
    audit_log_record(
        organization=organization,
        action="organization.created",
        target=organization.slug,
        actor=owner,
        actor_label=actor_label,
    )
    audit_log_record(
        organization=organization,
        action="project.created",
        target=project.public_id,
        actor=owner,
        actor_label=actor_label,
        project=project,
        details={"data": {"name": project.name}},
    )
    return organization


@transaction.atomic
def organization_rename(*, by: Actor, name: str) -> Organization:
    by.require_manager("rename the organization")
    name = _clean_name(name, what="An organization", limit=200)
    organization = Organization.objects.select_for_update().get(pk=by.organization.pk)
    previous, organization.name = organization.name, name
    organization.save(update_fields=["name"])
    audit_log_record(
        organization=organization,
        action="organization.updated",
        target=organization.public_id,
        by=by,
        details={"changes_requested": {"name": organization.name}, "previous": {"name": previous}},
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
    """Give `user` this role in the organization, adding them if needed, without a role check: for the shell
    and set-up code. Members act through member_role_set, which checks who may grant what."""
    if role not in Role.values:
        raise TenancyError(f"Unknown role '{role}'. Known: {', '.join(Role.values)}.", param="role")
    user_profile_ensure(user=user)
    membership, created = Membership.objects.update_or_create(
        organization=organization, user=user, defaults={"role": role}
    )
    audit_log_record(
        organization=organization,
        action="user.added" if created else "user.updated",
        target=user.keyway_profile.public_id,
        actor=actor,
        actor_label=actor_label,
        details={"data": {"role": role}, "email": user.email},
    )
    return membership


def _owners_left_without(organization: Organization, user: User) -> int:
    return Membership.objects.filter(organization=organization, role=Role.OWNER).exclude(user=user).count()


@transaction.atomic
def member_role_set(*, by: Actor, membership: Membership, role: str) -> Membership:
    if role not in Role.values:
        raise TenancyError(f"Unknown role '{role}'. Known: {', '.join(Role.values)}.", param="role")
    by.require_manager("change members' roles")
    membership = Membership.objects.select_for_update().select_related("user").get(pk=membership.pk)
    if membership.organization_id != by.organization.pk:
        raise NotFound("No such member in this organization.")
    if Role.OWNER in (role, membership.role):
        by.require_owner("grant or take away the owner role")
    if membership.role == Role.OWNER and role != Role.OWNER and not _owners_left_without(
        by.organization, membership.user
    ):
        raise Conflict("An organization needs at least one owner; make someone else owner first.", param="role")
    membership.role = role
    membership.save(update_fields=["role"])
    audit_log_record(
        organization=by.organization,
        action="user.updated",
        target=user_profile_ensure(user=membership.user).public_id,
        by=by,
        details={"changes_requested": {"role": role}, "email": membership.user.email},
    )
    return membership


@transaction.atomic
def member_remove(*, by: Actor, membership: Membership) -> None:
    """Remove a member; a user removing themselves is leaving, which every role may do (but the last owner)."""
    membership = Membership.objects.select_for_update().select_related("user").get(pk=membership.pk)
    if membership.organization_id != by.organization.pk:
        raise NotFound("No such member in this organization.")
    leaving = by.user is not None and membership.user_id == by.user.pk
    if not leaving:
        by.require_manager("remove members")
        if membership.role == Role.OWNER:
            by.require_owner("remove an owner")
    if membership.role == Role.OWNER and not _owners_left_without(by.organization, membership.user):
        raise Conflict("The last owner cannot leave; make someone else owner first, or delete the organization.")
    public_id = user_profile_ensure(user=membership.user).public_id
    email = membership.user.email
    membership.delete()
    audit_log_record(
        organization=by.organization,
        action="user.deleted",
        target=public_id,
        by=by,
        details={"email": email, "left": leaving},
    )


@transaction.atomic
def project_create(*, by: Actor, name: str) -> Project:
    by.require_manager("create projects")
    name = _clean_name(name, what="A project", limit=100)
    project = Project.objects.create(organization=by.organization, name=name)
    audit_log_record(
        organization=by.organization,
        action="project.created",
        target=project.public_id,
        project=project,
        by=by,
        details={"data": {"name": project.name}},
    )
    return project


def project_lock_for_change(*, by: Actor, project: Project, what: str) -> Project:
    """The project, locked for the rest of the caller's transaction, once `by` may change it (owners and
    admins) and it is not archived (an archived project is read-only)."""
    by.require_manager(what)
    project = Project.objects.select_for_update().get(pk=project.pk, organization=by.organization)
    if project.archived_at is not None:
        raise Conflict("An archived project cannot be changed.", param="project_id")
    return project


@transaction.atomic
def project_rename(*, by: Actor, project: Project, name: str) -> Project:
    name = _clean_name(name, what="A project", limit=100)
    project = project_lock_for_change(by=by, project=project, what="rename projects")
    project.name = name
    project.save(update_fields=["name"])
    audit_log_record(
        organization=by.organization,
        action="project.updated",
        target=project.public_id,
        project=project,
        by=by,
        details={"changes_requested": {"title": project.name}},
    )
    return project


def project_mark_archived(*, by: Actor, project: Project) -> Project:
    """Archive a project (its keys stop working). Called by apikeys.services.project_archive, which also
    makes every worker forget the project's keys; call that one."""
    by.require_manager("archive projects")
    project = Project.objects.select_for_update().get(pk=project.pk, organization=by.organization)
    if project.is_default:
        raise Conflict("The default project cannot be archived.", param="project_id")
    if project.archived_at is not None:
        return project
    project.archived_at = timezone.now()
    project.save(update_fields=["archived_at"])
    audit_log_record(
        organization=by.organization, action="project.archived", target=project.public_id, project=project, by=by
    )
    return project


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@transaction.atomic
def invitation_create(
    *, by: Actor, email: str, role: str, accept_url: str, expires_in: timedelta = timedelta(days=7)
) -> Invitation:
    """Invite an address and e-mail it the link. `accept_url` is the page the link opens, with `{token}`
    where the token goes; the token is in the e-mail only, never stored or returned."""
    by.require_manager("invite members")
    email = email.strip().lower()
    if role not in Role.values:
        raise TenancyError(f"Unknown role '{role}'. Known: {', '.join(Role.values)}.", param="role")
    if role == Role.OWNER:
        by.require_owner("invite owners")
    if not timedelta(minutes=1) <= expires_in <= timedelta(days=MAX_INVITE_DAYS):
        raise TenancyError(f"An invitation expires after 1 minute to {MAX_INVITE_DAYS} days.", param="expires_in")
    if Membership.objects.filter(organization=by.organization, user__email__iexact=email).exists():
        raise Conflict(f"{email} is already a member of this organization.", param="email")
    now = timezone.now()
    if Invitation.objects.filter(
        organization=by.organization, email=email, accepted_at__isnull=True, expires_at__gt=now
    ).exists():
        raise Conflict(f"{email} already has a pending invitation; delete it to send a new one.", param="email")
    token = secrets.token_urlsafe(32)
    invitation = Invitation.objects.create(
        organization=by.organization,
        email=email,
        role=role,
        token_hash=_token_hash(token),
        invited_by=by.user,
        expires_at=now + expires_in,
    )
    audit_log_record(
        organization=by.organization,
        action="invite.sent",
        target=invitation.public_id,
        by=by,
        details={"data": {"email": email, "role": role}},
    )
    context = {
        "organization": by.organization,
        "inviter": by.label,
        "role": role,
        "url": accept_url.replace("{token}", token),
        "expires_at": invitation.expires_at,
    }
    subject = f"You are invited to {by.organization.name} on Keyway"
    body = render_to_string("emails/invitation.txt", context)
    transaction.on_commit(lambda: send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, [email]))
    return invitation


def invitation_for_token(*, token: str) -> Invitation:
    """The invitation a link names, whoever opens it; NotFound for an unknown, used or expired token."""
    invitation = (
        Invitation.objects.select_related("organization", "invited_by").filter(token_hash=_token_hash(token)).first()
    )
    if invitation is None or invitation.accepted_at is not None or invitation.expires_at <= timezone.now():
        raise NotFound("This invitation link is not valid: it was used, it expired or it was withdrawn.")
    return invitation


@transaction.atomic
def invitation_accept(*, token: str, user: User) -> Membership:
    """Join the organization an invitation names. The link is the proof: whoever signed in holds it joins,
    once (the token then stops working), with the role the invitation gave."""
    invitation = invitation_for_token(token=token)
    invitation = Invitation.objects.select_for_update().get(pk=invitation.pk)
    if invitation.accepted_at is not None:
        raise NotFound("This invitation link has already been used.")
    organization = invitation.organization
    user_profile_ensure(user=user)
    try:
        with transaction.atomic():
            membership = Membership.objects.create(organization=organization, user=user, role=invitation.role)
    except IntegrityError:
        membership = Membership.objects.get(organization=organization, user=user)
    invitation.accepted_at = timezone.now()
    invitation.accepted_by = user
    invitation.save(update_fields=["accepted_at", "accepted_by"])
    audit_log_record(
        organization=organization,
        action="invite.accepted",
        target=invitation.public_id,
        actor=user,
        actor_label=user.email,
        details={"email": invitation.email, "role": membership.role},
    )
    audit_log_record(
        organization=organization,
        action="user.added",
        target=user.keyway_profile.public_id,
        actor=user,
        actor_label=user.email,
        details={"data": {"role": membership.role}, "email": user.email},
    )
    return membership


@transaction.atomic
def invitation_delete(*, by: Actor, invitation: Invitation) -> None:
    by.require_manager("withdraw invitations")
    if invitation.organization_id != by.organization.pk:
        raise NotFound("No such invitation in this organization.")
    if invitation.accepted_at is not None:
        raise Conflict("An accepted invitation cannot be deleted; remove the member instead.")
    public_id = invitation.public_id
    invitation.delete()
    audit_log_record(organization=by.organization, action="invite.deleted", target=public_id, by=by)

