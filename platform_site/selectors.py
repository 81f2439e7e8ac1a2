"""Reads of tenancy data. Every function that returns tenant data takes the organization, and looks objects
up by public id within it: an id of another tenant's object is answered exactly like an unknown one."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.db.models import QuerySet

from platform_site.exceptions import NotFound
from platform_site.models import AuditLog, Invitation, Membership, Organization, Project


def organizations_for_user(*, user: User) -> QuerySet[Organization]:
    return Organization.objects.filter(memberships__user=user)


def membership_for(*, user: User, organization: Organization) -> Membership | None:
    return Membership.objects.filter(user=user, organization=organization).first()


def memberships_of_user(*, user: User) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).select_related("organization").order_by("organization__name")


def member_list(*, organization: Organization) -> QuerySet[Membership]:
    return Membership.objects.filter(organization=organization).select_related("user", "user__keyway_profile")


def member_get(*, organization: Organization, user_public_id: str) -> Membership:
    membership = member_list(organization=organization).filter(user__keyway_profile__public_id=user_public_id).first()
    if membership is None:
        raise NotFound(f"No user '{user_public_id}' in this organization.", param="user_id")
    return membership


def project_list(*, organization: Organization, include_archived: bool = False) -> QuerySet[Project]:
    projects = Project.objects.filter(organization=organization)
    return projects if include_archived else projects.filter(archived_at__isnull=True)


def project_get(*, organization: Organization, public_id: str) -> Project:
    project = Project.objects.filter(organization=organization, public_id=public_id).first()
    if project is None:
        raise NotFound(f"No project '{public_id}' in this organization.", param="project_id")
    return project


def default_project(*, organization: Organization) -> Project:
    return Project.objects.get(organization=organization, is_default=True)


def invitation_list(*, organization: Organization) -> QuerySet[Invitation]:
    return Invitation.objects.filter(organization=organization).select_related("invited_by")


def invitation_get(*, organization: Organization, public_id: str) -> Invitation:
    invitation = invitation_list(organization=organization).filter(public_id=public_id).first()
    if invitation is None:
        raise NotFound(f"No invitation '{public_id}' in this organization.", param="invite_id")
    return invitation


def audit_log_list(*, organization: Organization) -> QuerySet[AuditLog]:
    return AuditLog.objects.filter(organization=organization).select_related("actor", "project")
