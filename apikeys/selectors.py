"""Reads of API keys, always scoped to an organization."""

from __future__ import annotations

from django.db.models import QuerySet

from apikeys.models import ApiKey
from platform_site.models import Organization


def apikey_list(*, organization: Organization) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(organization=organization)


def apikey_get(*, organization: Organization, public_id: str) -> ApiKey:
    return ApiKey.objects.select_related("organization").get(organization=organization, public_id=public_id)
