from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from apikeys.selectors import apikey_list
from apikeys.services import apikey_create
from platform_site.models import AuditLog, Membership, Organization
from platform_site.selectors import audit_log_list, organizations_for_user
from platform_site.services import membership_set, organization_create


@pytest.mark.django_db
def test_organization_create_makes_owner_membership_and_audit_row() -> None:
    user = get_user_model().objects.create_user("ada", password="x" * 12)
    organization = organization_create(name="Analytical Engines", owner=user)
    assert organization.slug == "analytical-engines"
    assert Membership.objects.get(organization=organization).role == Membership.Role.OWNER
    assert AuditLog.objects.filter(organization=organization, action="organization.created").count() == 1


@pytest.mark.django_db
def test_membership_set_changes_role_and_is_audited(org: Organization) -> None:
    user = get_user_model().objects.create_user("bob", password="x" * 12)
    membership_set(organization=org, user=user, role=Membership.Role.ADMIN, actor_label="test")
    membership_set(organization=org, user=user, role=Membership.Role.MEMBER, actor_label="test")
    assert Membership.objects.get(organization=org, user=user).role == Membership.Role.MEMBER
    assert audit_log_list(organization=org).filter(action__in=["user.added", "user.updated"]).count() == 2


@pytest.mark.django_db
def test_tenants_cannot_see_each_others_keys_audit_rows_or_memberships(
    org: Organization, other_org: Organization
) -> None:
    # A third party whose only job is to prove isolation: a member of other_org only.
    outsider = get_user_model().objects.create_user("eve", password="x" * 12)
    membership_set(organization=other_org, user=outsider, role=Membership.Role.OWNER, actor_label="test")
    mine, _ = apikey_create(organization=org, name="mine")
    theirs, _ = apikey_create(organization=other_org, name="theirs")

    assert list(apikey_list(organization=org)) == [mine]
    assert list(apikey_list(organization=other_org)) == [theirs]
    assert all(row.organization_id == org.id for row in audit_log_list(organization=org))
    assert not audit_log_list(organization=org).filter(target=theirs.public_id).exists()
    assert list(organizations_for_user(user=outsider)) == [other_org]
