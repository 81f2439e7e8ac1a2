from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from apikeys import keyformat
from apikeys.models import ApiKey
from apikeys.services import apikey_create
from platform_site.models import AuditLog, Organization

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_logged_in() -> Client:
    user = get_user_model().objects.create_superuser("root", "root@example.com", "x" * 16)
    client = Client()
    client.force_login(user)
    return client


def _secret_on_page(html: str) -> str:
    match = re.search(r'id="raw-key"[^>]*value="(sk-kw-[^"]+)"', html)
    assert match, "the new secret must be shown on the page"
    return match.group(1)


def test_admin_creates_a_key_and_shows_its_secret_once(admin_client_logged_in: Client, org: Organization) -> None:
    response = admin_client_logged_in.post(
        "/admin/apikeys/apikey/add/",
        {"organization": org.pk, "name": "from admin", "scopes": ["chat", "models:read"], "allowed_models": "a, b"},
    )
    assert response.status_code == 200
    raw = _secret_on_page(response.content.decode())
    key = ApiKey.objects.get(public_id=keyformat.parse_key(raw)[0])  # type: ignore[index]
    assert key.name == "from admin" and key.scopes == ["chat", "models:read"] and key.allowed_models == ["a", "b"]
    listing = admin_client_logged_in.get("/admin/apikeys/apikey/").content.decode()
    assert key.public_id in listing and raw not in listing
    detail = admin_client_logged_in.get(f"/admin/apikeys/apikey/{key.pk}/change/").content.decode()
    assert raw not in detail and key.secret_hash not in detail


def test_admin_rotates_and_revokes_keys(admin_client_logged_in: Client, org: Organization) -> None:
    key, raw = apikey_create(organization=org, name="k")
    response = admin_client_logged_in.post(
        "/admin/apikeys/apikey/", {"action": "rotate_keys", "_selected_action": [key.pk]}
    )
    new_raw = _secret_on_page(response.content.decode())
    assert new_raw != raw and new_raw.startswith(f"sk-kw-{key.public_id}-")
    key.refresh_from_db()
    assert key.previous_secret_expires_at is not None

    admin_client_logged_in.post("/admin/apikeys/apikey/", {"action": "revoke_keys", "_selected_action": [key.pk]})
    key.refresh_from_db()
    assert key.revoked_at is not None
    actions = set(AuditLog.objects.filter(target=key.public_id).values_list("action", flat=True))
    assert {"api_key.created", "api_key.updated", "api_key.deleted"} <= actions


def test_audit_log_is_read_only_in_admin(admin_client_logged_in: Client, org: Organization) -> None:
    row = AuditLog.objects.filter(organization=org).first()
    assert row is not None
    assert admin_client_logged_in.get("/admin/platform_site/auditlog/add/").status_code == 403
    deletion = admin_client_logged_in.post(f"/admin/platform_site/auditlog/{row.pk}/delete/", {"post": "yes"})
    assert deletion.status_code == 403
    assert AuditLog.objects.filter(pk=row.pk).exists()


def test_an_admin_edit_is_checked_audited_and_cannot_move_the_key(
    admin_client_logged_in: Client, org: Organization, other_org: Organization
) -> None:
    key, raw = apikey_create(organization=org, name="edited", actor_label="test")
    url = f"/admin/apikeys/apikey/{key.pk}/change/"
    form = {"organization": other_org.pk, "name": "renamed", "scopes": ["chat"], "allowed_models": "",
            "rpm_limit": "7", "tpm_limit": "", "monthly_budget_micros": "", "expires_at_0": "", "expires_at_1": ""}
    response = admin_client_logged_in.post(url, form)
    assert response.status_code == 302, response.content.decode()[:2000]
    key.refresh_from_db()
    assert key.organization_id == org.pk  # the organization field is read-only on change
    assert (key.name, key.scopes, key.rpm_limit) == ("renamed", ["chat"], 7)
    entry = AuditLog.objects.filter(organization=org, action="api_key.updated", target=key.public_id).get()
    assert entry.details["changes_requested"]["scopes"] == ["chat"]
    refused = admin_client_logged_in.post(url, {**form, "scopes": ["admin"]})
    assert refused.status_code == 200 and "errornote" in refused.content.decode()
    refused = admin_client_logged_in.post(url, {**form, "rpm_limit": str(10**10)})
    assert refused.status_code == 200 and "rpm must be a whole number" in refused.content.decode()
    key.refresh_from_db()
    assert (key.scopes, key.rpm_limit) == (["chat"], 7)
    assert apikey_authenticates(raw)


def apikey_authenticates(raw: str) -> bool:
    from apikeys.auth import authenticate_key_sync

    return authenticate_key_sync(raw).scopes == frozenset({"chat"})
