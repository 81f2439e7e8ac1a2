"""Reads of tenancy data. Every function that returns tenant data takes the organization."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.db.models import QuerySet

from platform_site.models import AuditLog, Organization


def organizations_for_user(*, user: User) -> QuerySet[Organization]:
    return Organization.objects.filter(memberships__user=user)


def audit_log_list(*, organization: Organization) -> QuerySet[AuditLog]:
    return AuditLog.objects.filter(organization=organization)
