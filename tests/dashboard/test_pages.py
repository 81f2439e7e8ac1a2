"""The dashboard's pages through Django's test client: tenants isolated, roles enforced, secrets shown once."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core import mail
from django.test import Client

from apikeys.models import ApiKey
from apikeys.services import apikey_create
from platform_site.models import AuditLog, Membership, Organization, Project, Role
from platform_site.selectors import default_project
from platform_site.services import membership_set, organization_create

pytestmark = pytest.mark.django_db


def _user(email: str) -> User:
    from allauth.account.models import EmailAddress

    user = get_user_model().objects.create_user(username=email.split("@")[0], email=email, password="pw-" + "x" * 12)
    EmailAddress.objects.create(user=user, email=email, verified=True, primary=True)
    return user


def _client(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def alice() -> User:
    return _user("alice@example.com")


@pytest.fixture
def acme(alice: User) -> Organization:
    return organization_create(name="Acme", owner=alice)


def test_signed_out_front_door_offers_sign_in_and_sign_up() -> None:
    page = Client().get("/").content.decode()
    assert 'href="/accounts/signup/"' in page and 'href="/accounts/login/"' in page


def test_every_page_sends_a_content_security_policy_and_no_cdn_asset(alice: User, acme: Organization) -> None:
    response = _client(alice).get("/settings/api-keys")
    assert response.status_code == 200
    assert "default-src 'self'" in response["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in response["Content-Security-Policy"]
    assert not re.search(r'(src|href)="https?://', response.content.decode())


def test_a_new_organization_has_a_default_project_and_its_creator_as_owner(alice: User, acme: Organization) -> None:
    assert default_project(organization=acme).is_default
    assert Membership.objects.get(organization=acme, user=alice).role == Role.OWNER


def test_created_secret_is_on_the_creating_page_only_and_stored_hashed(alice: User, acme: Organization) -> None:
    client = _client(alice)
    project = default_project(organization=acme)
    response = client.post(
        "/settings/api-keys/new",
        {"name": "web", "project": project.public_id, "permissions": "read_only", "rpm": "30"},
    )
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    raw = re.search(r'value="(sk-kw-[^"]+)"', response.content.decode()).group(1)  # type: ignore[union-attr]
    key = ApiKey.objects.get(name="web")
    assert key.project == project and key.scopes == ["models:read", "usage:read"] and key.rpm_limit == 30
    assert raw not in str(ApiKey.objects.filter(pk=key.pk).values().get())
    for path in ("/", "/settings/api-keys", "/settings/audit-log"):
        assert raw not in client.get(path).content.decode()
    assert raw.split("-")[-1] not in str(list(AuditLog.objects.values()))


def test_a_third_user_sees_no_other_tenants_projects_keys_or_members(alice: User, acme: Organization) -> None:
    bob = _user("bob@example.com")
    globex = organization_create(name="Globex", owner=bob)
    acme_key, _ = apikey_create(organization=acme, name="acme-secret-key")
    globex_project = Project.objects.create(organization=globex, name="globex-rocket")
    # Eve belongs to neither: her only job is to prove the walls hold.
    eve = _user("eve@example.com")
    organization_create(name="Eve Corp", owner=eve)
    client = _client(eve)
    for path in ("/", "/settings/api-keys", "/settings/projects", "/settings/members", "/settings/audit-log"):
        page = client.get(path).content.decode()
        for secret in ("acme-secret-key", acme_key.public_id, "globex-rocket", "alice@example.com", "bob@example.com"):
            assert secret not in page, (path, secret)
    # Naming another tenant's objects by id gets the same 404 as an unknown id.
    assert client.get(f"/settings/api-keys/{acme_key.public_id}/revoke").status_code == 404
    assert client.post(f"/settings/api-keys/{acme_key.public_id}/revoke").status_code == 404
    assert client.post(f"/settings/projects/{globex_project.public_id}", {"action": "archive"}).status_code == 404
    alice_id = alice.keyway_profile.public_id
    assert client.post(f"/settings/members/{alice_id}", {"remove": "1"}).status_code == 404
    # Switching to an organization one does not belong to does nothing.
    client.post("/organizations/switch", {"organization": acme.public_id})
    assert "acme-secret-key" not in client.get("/settings/api-keys").content.decode()
    acme_key.refresh_from_db()
    assert acme_key.revoked_at is None and Membership.objects.filter(user=alice, organization=acme).exists()


def test_members_manage_only_their_own_keys_and_readers_none(alice: User, acme: Organization) -> None:
    mia, rex = _user("mia@example.com"), _user("rex@example.com")
    membership_set(organization=acme, user=mia, role=Role.MEMBER)
    membership_set(organization=acme, user=rex, role=Role.READER)
    owners_key, _ = apikey_create(organization=acme, name="owners", created_by=alice)
    project = default_project(organization=acme)
    mia_client = _client(mia)
    mia_client.post("/settings/api-keys/new", {"name": "mias", "project": project.public_id, "permissions": "all"})
    mias_key = ApiKey.objects.get(name="mias")
    assert mias_key.created_by == mia
    mia_client.post(f"/settings/api-keys/{owners_key.public_id}/revoke")
    owners_key.refresh_from_db()
    assert owners_key.revoked_at is None
    mia_client.post(f"/settings/api-keys/{mias_key.public_id}/revoke")
    mias_key.refresh_from_db()
    assert mias_key.revoked_at is not None

    rex_client = _client(rex)
    page = rex_client.get("/settings/api-keys").content.decode()
    assert "owners" in page and "Create new secret key" not in page and ">Revoke<" not in page
    rex_client.post("/settings/api-keys/new", {"name": "rexs", "project": project.public_id, "permissions": "all"})
    assert not ApiKey.objects.filter(name="rexs").exists()
    rex_client.post("/settings/projects", {"name": "rex project"})
    assert not Project.objects.filter(name="rex project").exists()


def test_rotation_keeps_the_old_secret_for_the_chosen_grace_and_is_audited(alice: User, acme: Organization) -> None:
    key, old = apikey_create(organization=acme, name="svc", created_by=alice)
    response = _client(alice).post(f"/settings/api-keys/{key.public_id}/rotate", {"grace": "3600"})
    new = re.search(r'value="(sk-kw-[^"]+)"', response.content.decode()).group(1)  # type: ignore[union-attr]
    assert new != old and "previous secret keeps working until" in response.content.decode()
    key.refresh_from_db()
    assert key.previous_secret_expires_at is not None
    assert 3590 < (key.previous_secret_expires_at - key.rotated_at).total_seconds() <= 3600  # type: ignore[operator]
    assert AuditLog.objects.filter(action="api_key.updated", target=key.public_id, actor=alice).exists()


def test_invitation_link_joins_once_with_its_role(
    alice: User, acme: Organization, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = _client(alice).post("/settings/members", {"email": "new@example.com", "role": "reader"})
    assert response.status_code == 302
    link = re.search(r"http://\S+/invite/(\S+)", mail.outbox[-1].body)
    assert link is not None
    newcomer = _user("new@example.com")
    client = _client(newcomer)
    path = f"/invite/{link.group(1)}"
    assert "Join Acme" in client.get(path).content.decode()
    client.post(path)
    assert Membership.objects.get(organization=acme, user=newcomer).role == Role.READER
    assert client.get(path).status_code == 404
    assert AuditLog.objects.filter(organization=acme, action="invite.accepted").exists()


def test_the_last_owner_cannot_leave(alice: User, acme: Organization) -> None:
    client = _client(alice)
    client.post("/settings/organization/leave")
    assert Membership.objects.filter(organization=acme, user=alice).exists()
    bob = _user("bob@example.com")
    membership_set(organization=acme, user=bob, role=Role.OWNER)
    client.post("/settings/organization/leave")
    assert not Membership.objects.filter(organization=acme, user=alice).exists()


def test_archiving_a_project_stops_its_keys(
    alice: User, acme: Organization, django_capture_on_commit_callbacks: Any
) -> None:
    from apikeys.auth import authenticate_key_sync
    from apikeys.exceptions import InvalidApiKey

    client = _client(alice)
    client.post("/settings/projects", {"name": "Side"})
    side = Project.objects.get(organization=acme, name="Side")
    _, raw = apikey_create(organization=acme, project=side, name="side key")
    assert authenticate_key_sync(raw).project_public_id == side.public_id
    # On commit, archiving makes every worker forget the project's keys (the shared cache, with Redis, too).
    with django_capture_on_commit_callbacks(execute=True):
        client.post(f"/settings/projects/{side.public_id}", {"action": "archive"})
    with pytest.raises(InvalidApiKey):
        authenticate_key_sync(raw)
    client.post(f"/settings/projects/{default_project(organization=acme).public_id}", {"action": "archive"})
    assert default_project(organization=acme).archived_at is None


def test_single_sign_on_is_offered_when_an_oidc_client_is_configured(settings: Any) -> None:
    settings.SOCIALACCOUNT_PROVIDERS = {
        "openid_connect": {
            "APPS": [
                {
                    "provider_id": "okta",
                    "name": "Okta",
                    "client_id": "keyway",
                    "secret": "s3cret",
                    "settings": {"server_url": "https://id.example.com"},
                }
            ]
        }
    }
    page = Client().get("/accounts/login/").content.decode()
    assert "Okta" in page and "/accounts/oidc/okta/login/" in page and "s3cret" not in page


def test_two_factor_set_up_offers_a_totp_code_under_the_policy(alice: User, acme: Organization) -> None:
    client = Client()
    # A real sign-in (not force_login): allauth asks for a recent authentication before 2FA changes.
    assert client.post("/accounts/login/", {"login": alice.email, "password": "pw-" + "x" * 12}).status_code == 302
    client.post("/accounts/reauthenticate/", {"password": "pw-" + "x" * 12})
    response = client.get("/accounts/2fa/totp/activate/")
    assert response.status_code == 200
    page = response.content.decode()
    assert 'src="data:image/svg+xml' in page and "Authenticator code" in page
    assert "img-src 'self' data:" in response["Content-Security-Policy"]


def _totp_code(secret: str) -> str:
    from allauth.mfa.totp.internal.auth import format_hotp_value, hotp_value

    return format_hotp_value(hotp_value(secret, int(time.time()) // 30))


def test_with_totp_on_a_sign_in_needs_the_password_and_a_current_code(alice: User, acme: Organization) -> None:
    password = "pw-" + "x" * 12
    client = Client()
    client.post("/accounts/login/", {"login": alice.email, "password": password})
    client.post("/accounts/reauthenticate/", {"password": password})
    page = client.get("/accounts/2fa/totp/activate/").content.decode()
    secret = re.search(r"\b([A-Z2-7]{32})\b", page)  # 20 random bytes in base32
    assert secret is not None, "the set-up page shows the TOTP secret"
    activated = client.post("/accounts/2fa/totp/activate/", {"code": _totp_code(secret.group(1))})
    assert activated.status_code == 302
    from allauth.mfa.models import Authenticator

    assert Authenticator.objects.filter(user=alice, type=Authenticator.Type.TOTP).exists()
    client.post("/accounts/logout/")

    fresh = Client()
    step = fresh.post("/accounts/login/", {"login": alice.email, "password": password})
    assert step.status_code == 302 and step["Location"] == "/accounts/2fa/authenticate/"
    # The password alone does not sign in: the dashboard still sends the visitor to sign in.
    assert fresh.get("/settings/api-keys").status_code == 302
    wrong = fresh.post("/accounts/2fa/authenticate/", {"code": "000000"})
    assert wrong.status_code == 200 and "Incorrect code" in wrong.content.decode()
    signed_in = fresh.post("/accounts/2fa/authenticate/", {"code": _totp_code(secret.group(1))})
    assert signed_in.status_code == 302
    assert fresh.get("/settings/api-keys").status_code == 200


def test_a_forgotten_password_is_reset_by_an_emailed_link_that_works_once(alice: User) -> None:
    client = Client()
    client.post("/accounts/password/reset/", {"email": alice.email})
    link = re.search(r"http://\S+(/accounts/password/reset/key/\S+/)", mail.outbox[-1].body)
    assert link is not None
    form_page = client.get(link.group(1), follow=True)
    action = form_page.redirect_chain[-1][0] if form_page.redirect_chain else link.group(1)
    new_password = "a-new-pass-" + "y" * 8
    done = client.post(action, {"password1": new_password, "password2": new_password})
    assert done.status_code == 302
    assert Client().post("/accounts/login/", {"login": alice.email, "password": new_password}).status_code == 302
    # The link is spent: using it again changes nothing.
    again = Client().get(link.group(1), follow=True).content.decode()
    assert "Bad Token" in again or "invalid" in again.lower()


def test_repeated_failed_sign_ins_are_throttled_even_with_the_right_password_after(
    alice: User, settings: Any
) -> None:
    from django.core.cache import cache

    cache.clear()
    client = Client()
    for _ in range(5):
        client.post("/accounts/login/", {"login": alice.email, "password": "wrong-" + "z" * 10})
    refused = client.post("/accounts/login/", {"login": alice.email, "password": "pw-" + "x" * 12})
    assert refused.status_code in (200, 429)
    assert "_auth_user_id" not in client.session
    assert "Too many failed login attempts" in refused.content.decode()


def test_a_projects_page_sets_its_budget_and_rate_limits_and_a_reader_only_sees_them(
    alice: User, acme: Organization
) -> None:
    from billing.models import ProjectRateLimit
    from completions.services import catalog_ensure_default

    catalog_ensure_default()
    project = default_project(organization=acme)
    path = f"/settings/projects/{project.public_id}"
    client = _client(alice)
    page = client.get(path).content.decode()
    assert "Monthly budget" in page and "gemma-3-270m" in page and "Save rate limits" in page
    # Rows follow the catalog's order: all-minilm-l6-v2 is row 0, gemma-3-270m row 1.
    assert 'name="1-rpm"' in page and "Requests per minute for gemma-3-270m" in page
    client.post(path, {"action": "budget", "monthly_budget": "12.50"})
    project.refresh_from_db()
    assert project.monthly_budget_micros == 12_500_000
    client.post(path, {"action": "limits", "1-rpm": "60", "1-tpm": "", "1-rpd": "500", "0-rpm": "", "0-tpm": "",
                       "0-rpd": ""})
    row = ProjectRateLimit.objects.get(project=project)
    assert (row.model, row.max_requests_per_1_minute, row.max_tokens_per_1_minute, row.max_requests_per_1_day) == (
        "gemma-3-270m", 60, None, 500
    )
    assert AuditLog.objects.filter(organization=acme, action="rate_limit.updated", target="rl-gemma-3-270m").exists()
    # A value out of range is shown on the form, and nothing is saved.
    bad = client.post(path, {"action": "limits", "1-rpm": "0"})
    assert bad.status_code == 200 and "greater than or equal to 1" in bad.content.decode()
    assert ProjectRateLimit.objects.get(project=project).max_requests_per_1_minute == 60
    assert "$12.50" in client.get("/settings/projects").content.decode()

    rex = _user("rex@example.com")
    membership_set(organization=acme, user=rex, role=Role.READER)
    reader = _client(rex)
    seen = reader.get(path).content.decode()
    assert "Save rate limits" not in seen and "Save budget" not in seen and 'name="1-rpm"' not in seen
    assert ">60<" in re.sub(r"\s+", "", seen)
    reader.post(path, {"action": "budget", "monthly_budget": "999"})
    reader.post(path, {"action": "limits", "1-rpm": "1"})
    project.refresh_from_db()
    assert project.monthly_budget_micros == 12_500_000
    assert ProjectRateLimit.objects.get(project=project).max_requests_per_1_minute == 60


def test_another_tenants_project_page_is_not_found(alice: User, acme: Organization) -> None:
    globex = organization_create(name="Globex", owner=_user("gus@example.com"))
    theirs = default_project(organization=globex)
    client = _client(alice)
    assert client.get(f"/settings/projects/{theirs.public_id}").status_code == 404
    refused = client.post(f"/settings/projects/{theirs.public_id}", {"action": "budget", "monthly_budget": "1"})
    assert refused.status_code == 404
    theirs.refresh_from_db()
    assert theirs.monthly_budget_micros is None


def test_with_redis_unreachable_signed_in_users_manage_keys_new_sign_ins_wait_and_health_says_503(
    alice: User, acme: Organization, settings: Any
) -> None:
    """The cache (Redis) down, as README's "When a backing service fails" says: a signed-in user goes on
    working (sessions are in the database), a new sign-in is refused with 429 (allauth's throttle cannot
    count, and fails closed), and /health names the cache."""
    from platform_site.kernel import breaker
    from tests.e2e.server import free_port

    settings.CACHES = {"default": {"BACKEND": "platform_site.cache.SharedClientRedisCache",
                                   "LOCATION": f"redis://127.0.0.1:{free_port()}/0",
                                   "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}}}
    settings.REDIS_URL = settings.CACHES["default"]["LOCATION"]
    try:
        sign_in = Client().post("/accounts/login/", {"login": alice.email, "password": "pw-" + "x" * 12})
        assert sign_in.status_code == 429
        client = _client(alice)
        assert client.get("/settings/api-keys").status_code == 200
        created = client.post("/settings/api-keys/new", {
            "name": "made during the outage", "project": default_project(organization=acme).public_id,
            "permissions": "read_only"})
        assert created.status_code == 200 and b"sk-kw-" in created.content
        assert ApiKey.objects.filter(name="made during the outage").exists()
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["checks"]["cache"].startswith("error")
        assert breaker.redis.down_since is not None
    finally:
        breaker.redis.reset()
