"""The management API with the official SDK's admin client (and plain HTTP for what the SDK lacks): OpenAI's
Admin API paths, bodies valid against the official schemas, every tenant walled off."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2 as httpx
import openai
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model

from apikeys.services import apikey_create
from platform_site.models import Organization, Role
from platform_site.selectors import default_project
from platform_site.services import membership_set
from tests.conftest import bearer

pytestmark = pytest.mark.django_db(transaction=True)
Validate = Callable[[str, Any], None]


@pytest.fixture
def admin_key(org: Organization) -> str:
    return apikey_create(organization=org, name="ops", scopes=["admin"], actor_label="test")[1]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    from platform_site.asgi import application

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture
async def admin(admin_key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    from platform_site.asgi import application

    client = openai.AsyncOpenAI(
        base_url="http://127.0.0.1/v1", api_key="unused", admin_api_key=admin_key, max_retries=0,
        http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=application)),
    )
    yield client
    await client.close()


async def test_unknown_paths_are_json_404s_whatever_the_method_and_the_path(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    # Found by schemathesis (tests/e2e/test_fuzz.py): `.` in the catch-all route did not match a newline, so no
    # route matched and Django answered its HTML 404 page; and a POST to the catch-all got Django's HTML 403
    # (CSRF) page.
    for path in ("/v1/organization/projects/p/rate_limits/rl-a%0Ab", "/v1/organization/nothing/here"):
        for method in ("GET", "POST", "DELETE"):
            response = await http.request(method, path, headers=bearer(admin_key))
            assert response.status_code == 404, (method, path, response.text[:200])
            assert response.json()["error"]["code"] == "unknown_url"


async def test_admin_keys_are_created_once_listed_retrieved_and_deleted(
    admin: openai.AsyncOpenAI, http: httpx.AsyncClient, admin_key: str, validate_schema: Validate
) -> None:
    response = await http.post("/v1/organization/admin_api_keys", json={"name": "ci", "expires_in_seconds": 3600},
                               headers=bearer(admin_key))
    created = response.json()
    assert response.status_code == 200, created
    validate_schema("AdminApiKeyCreateResponse", created)
    assert created["value"].startswith("sk-kw-") and created["expires_at"] is not None
    listed = await admin.admin.organization.admin_api_keys.list()
    assert {key.name for key in listed.data} == {"ops", "ci"}
    for key in (await http.get("/v1/organization/admin_api_keys", headers=bearer(admin_key))).json()["data"]:
        validate_schema("AdminApiKey", key)
        assert "value" not in key
    assert (await admin.admin.organization.admin_api_keys.retrieve(created["id"])).name == "ci"
    deleted = await admin.admin.organization.admin_api_keys.delete(created["id"])
    assert deleted.deleted is True
    # The deleted admin key is refused from now on.
    refused = await http.get("/v1/organization/projects", headers=bearer(created["value"]))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


async def test_projects_and_their_keys_through_the_management_api(
    admin: openai.AsyncOpenAI, http: httpx.AsyncClient, admin_key: str, validate_schema: Validate, default_model: None
) -> None:
    project = await admin.admin.organization.projects.create(name="Search")
    assert project.status == "active"
    names = [p.name for p in (await admin.admin.organization.projects.list()).data]
    assert names == ["Default project", "Search"]
    await admin.admin.organization.projects.update(project.id, name="Search v2")
    body = (await http.get(f"/v1/organization/projects/{project.id}", headers=bearer(admin_key))).json()
    validate_schema("Project", body)
    assert body["name"] == "Search v2"

    response = await http.post(
        f"/v1/organization/projects/{project.id}/api_keys",
        json={"name": "indexer", "scopes": ["models:read", "embeddings"], "models": ["gemma-3-270m"], "rpm": 60,
              "tpm": 1000, "monthly_budget_usd": 12.5},
        headers=bearer(admin_key),
    )
    key = response.json()
    assert response.status_code == 200, key
    validate_schema("ProjectApiKey", key)
    assert key["scopes"] == ["embeddings", "models:read"] and key["rpm"] == 60
    assert key["monthly_budget_usd"] == "12.500000"
    models = await http.get("/v1/models", headers=bearer(key["value"]))
    assert [m["id"] for m in models.json()["data"]] == ["gemma-3-270m"]

    listed = await admin.admin.organization.projects.api_keys.list(project.id)
    assert [k.name for k in listed.data] == ["indexer"] and listed.data[0].owner.type == "service_account"
    rotated = (await http.post(f"/v1/organization/projects/{project.id}/api_keys/{key['id']}/rotate",
                               json={"grace_period_seconds": 0}, headers=bearer(admin_key))).json()
    assert rotated["value"] != key["value"]
    assert (await http.get("/v1/models", headers=bearer(key["value"]))).status_code == 401
    assert (await http.get("/v1/models", headers=bearer(rotated["value"]))).status_code == 200
    await admin.admin.organization.projects.api_keys.delete(key["id"], project_id=project.id)
    assert (await http.get("/v1/models", headers=bearer(rotated["value"]))).status_code == 401

    archived = await admin.admin.organization.projects.archive(project.id)
    assert archived.status == "archived"
    refused = await http.post(f"/v1/organization/projects/{project.id}/api_keys", json={"name": "late"},
                              headers=bearer(admin_key))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "project"


async def test_limits_up_to_the_documented_maxima_are_stored(
    http: httpx.AsyncClient, admin_key: str, org: Organization
) -> None:
    mine = await sync_to_async(default_project)(organization=org)
    response = await http.post(
        f"/v1/organization/projects/{mine.public_id}/api_keys",
        json={"name": "big", "rpm": 10**9, "tpm": 10**12, "monthly_budget_usd": "1000000"},
        headers=bearer(admin_key),
    )
    assert response.status_code == 200, response.text
    assert (response.json()["rpm"], response.json()["tpm"]) == (10**9, 10**12)
    assert response.json()["monthly_budget_usd"] == "1000000.000000"


async def test_users_and_invites(
    admin: openai.AsyncOpenAI, http: httpx.AsyncClient, admin_key: str, org: Organization, validate_schema: Validate
) -> None:
    user = await sync_to_async(get_user_model().objects.create_user)("kim", email="kim@example.com", password="x" * 12)
    await sync_to_async(membership_set)(organization=org, user=user, role=Role.READER)
    users = (await http.get("/v1/organization/users", headers=bearer(admin_key))).json()
    assert [u["email"] for u in users["data"]] == ["kim@example.com"]
    validate_schema("User", users["data"][0])
    user_id = users["data"][0]["id"]
    updated = await admin.admin.organization.users.update(user_id, role="member")
    assert updated.role == "member"
    # An admin key acts with the admin role: it cannot make owners (a leaked admin key cannot take over).
    with pytest.raises(openai.PermissionDeniedError):
        await admin.admin.organization.users.update(user_id, role="owner")

    response = await http.post("/v1/organization/invites", json={"email": "Lee@Example.com", "role": "reader"},
                               headers=bearer(admin_key))
    invite = response.json()
    assert response.status_code == 200, invite
    validate_schema("Invite", invite)
    assert invite["email"] == "lee@example.com" and invite["status"] == "pending"
    assert [i.id for i in (await admin.admin.organization.invites.list()).data] == [invite["id"]]
    assert (await admin.admin.organization.invites.retrieve(invite["id"])).role == "reader"
    assert (await admin.admin.organization.invites.delete(invite["id"])).deleted is True
    again = await http.get(f"/v1/organization/invites/{invite['id']}", headers=bearer(admin_key))
    assert again.status_code == 404 and again.json()["error"]["param"] == "invite_id"

    assert (await admin.admin.organization.users.delete(user_id)).deleted is True
    assert (await http.get("/v1/organization/users", headers=bearer(admin_key))).json()["data"] == []


async def test_bad_input_and_other_tenants_get_openai_errors(
    http: httpx.AsyncClient, admin_key: str, org: Organization, other_org: Organization
) -> None:
    theirs = await sync_to_async(default_project)(organization=other_org)
    mine = await sync_to_async(default_project)(organization=org)
    their_key, _ = await sync_to_async(apikey_create)(organization=other_org, name="theirs")
    _, project_key = await sync_to_async(apikey_create)(organization=org, name="plain")
    cases = [
        (None, "GET", "/v1/organization/projects", None, 401, None),
        (project_key, "GET", "/v1/organization/projects", None, 403, None),
        (admin_key, "GET", f"/v1/organization/projects/{theirs.public_id}", None, 404, "project_id"),
        (admin_key, "GET", f"/v1/organization/projects/{theirs.public_id}/api_keys", None, 404, "project_id"),
        (admin_key, "GET", "/v1/organization/projects?limit=0", None, 400, "limit"),
        (admin_key, "GET", "/v1/organization/projects?after=proj_nope", None, 400, "after"),
        (admin_key, "POST", "/v1/organization/projects", {"name": 7}, 400, "name"),
        (admin_key, "POST", "/v1/organization/projects", [], 400, None),
        (admin_key, "POST", "/v1/organization/admin_api_keys", {}, 400, "name"),
        (admin_key, "POST", "/v1/organization/invites", {"email": "x@example.com", "role": "emperor"}, 400, "role"),
        (admin_key, "POST", "/v1/organization/projects", {"name": "x" * 10_000}, 400, "name"),
        (admin_key, "POST", f"/v1/organization/projects/{mine.public_id}/api_keys", {"name": "k", "rpm": 10**13}, 400,
         "rpm"),
        (admin_key, "POST", f"/v1/organization/projects/{mine.public_id}/api_keys", {"name": "k", "rpm": "60"}, 400,
         "rpm"),
        # Above what the column holds (a PositiveIntegerField on PostgreSQL): refused, never a database error.
        (admin_key, "POST", f"/v1/organization/projects/{mine.public_id}/api_keys", {"name": "k", "rpm": 10**11}, 400,
         "rpm"),
        (admin_key, "POST", f"/v1/organization/projects/{mine.public_id}/api_keys",
         {"name": "k", "monthly_budget_usd": "0.0000001"}, 400, "monthly_budget_usd"),
        (admin_key, "POST", f"/v1/organization/projects/{mine.public_id}/api_keys",
         {"name": "k", "monthly_budget_usd": 10**9}, 400, "monthly_budget_usd"),
        (admin_key, "POST", f"/v1/organization/projects/{mine.public_id}/api_keys",
         {"name": "k", "monthly_budget_usd": "NaN"}, 400, "monthly_budget_usd"),
        (admin_key, "POST", f"/v1/organization/projects/{mine.public_id}/api_keys", {"name": "k", "scopes": ["admin"]},
         400, "scopes"),
        (admin_key, "POST", f"/v1/organization/projects/{mine.public_id}/api_keys",
         {"name": "k", "models": [f"m{i}" for i in range(500)]}, 400, "models"),
        (admin_key, "POST", f"/v1/organization/projects/{mine.public_id}/api_keys", {"name": "k", "scopes": "chat"},
         400, "scopes"),
        (admin_key, "GET", f"/v1/organization/projects/{mine.public_id}/api_keys/key_{their_key.public_id}", None,
         404, "key_id"),
        (admin_key, "DELETE", f"/v1/organization/admin_api_keys/key_{their_key.public_id}", None, 404, "key_id"),
        (admin_key, "GET", f"/v1/organization/users/{'u' * 5000}", None, 404, "user_id"),
        (admin_key, "GET", "/v1/organization/nothing-here", None, 404, None),
        (admin_key, "GET", "/v1/organization", None, 404, None),
        (admin_key, "GET", "/v1/organizationx", None, 404, None),
    ]
    for key, method, path, body, status, param in cases:
        headers = bearer(key) if key else {}
        response = await http.request(method, path, json=body, headers=headers)
        error = response.json()["error"]
        assert response.status_code == status, (path, response.text)
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, (path, error)


async def test_project_rate_limits_are_listed_per_model_and_updated_with_the_sdk(
    admin: openai.AsyncOpenAI, http: httpx.AsyncClient, admin_key: str, org: Organization,
    validate_schema: Validate, default_model: None,
) -> None:
    from django.conf import settings

    project = await sync_to_async(default_project)(organization=org)
    listed = (await http.get(f"/v1/organization/projects/{project.public_id}/rate_limits",
                             headers=bearer(admin_key))).json()
    validate_schema("ProjectRateLimitListResponse", listed)
    # Every model of the catalog, at the platform's defaults until the project changes them.
    assert [item["id"] for item in listed["data"]] == ["rl-all-minilm-l6-v2", "rl-gemma-3-270m"]
    assert listed["data"][1] == {
        "object": "project.rate_limit", "id": "rl-gemma-3-270m", "model": "gemma-3-270m",
        "max_requests_per_1_minute": settings.KEYWAY_PROJECT_RPM,
        "max_tokens_per_1_minute": settings.KEYWAY_PROJECT_TPM,
    }
    sdk_list = await admin.admin.organization.projects.rate_limits.list_rate_limits(project.public_id)
    assert [item.model for item in sdk_list.data] == ["all-minilm-l6-v2", "gemma-3-270m"]

    updated = await admin.admin.organization.projects.rate_limits.update_rate_limit(
        "rl-gemma-3-270m", project_id=project.public_id, max_requests_per_1_minute=60, max_requests_per_1_day=1000
    )
    assert (updated.max_requests_per_1_minute, updated.max_requests_per_1_day) == (60, 1000)
    assert updated.max_tokens_per_1_minute == settings.KEYWAY_PROJECT_TPM
    response = await http.post(f"/v1/organization/projects/{project.public_id}/rate_limits/rl-gemma-3-270m",
                               json={"max_requests_per_1_day": None}, headers=bearer(admin_key))
    validate_schema("ProjectRateLimit", response.json())
    assert "max_requests_per_1_day" not in response.json() and response.json()["max_requests_per_1_minute"] == 60

    page = (await http.get(f"/v1/organization/projects/{project.public_id}/rate_limits?limit=1",
                           headers=bearer(admin_key))).json()
    assert [item["id"] for item in page["data"]] == ["rl-all-minilm-l6-v2"] and page["has_more"]
    rest = (await http.get(f"/v1/organization/projects/{project.public_id}/rate_limits?after={page['last_id']}",
                           headers=bearer(admin_key))).json()
    assert [item["id"] for item in rest["data"]] == ["rl-gemma-3-270m"] and not rest["has_more"]
    before = (await http.get(f"/v1/organization/projects/{project.public_id}/rate_limits?before=rl-gemma-3-270m",
                             headers=bearer(admin_key))).json()
    assert [item["id"] for item in before["data"]] == ["rl-all-minilm-l6-v2"]

    audit = (await http.get("/v1/organization/audit_logs?event_types[]=rate_limit.updated",
                            headers=bearer(admin_key))).json()
    assert [e["rate_limit.updated"]["changes_requested"] for e in audit["data"]] == [
        {"max_requests_per_1_day": None},
        {"max_requests_per_1_minute": 60, "max_requests_per_1_day": 1000},
    ]


async def test_a_project_spend_limit_is_set_read_and_deleted_in_cents(
    admin: openai.AsyncOpenAI, http: httpx.AsyncClient, admin_key: str, org: Organization, validate_schema: Validate
) -> None:
    project = await sync_to_async(default_project)(organization=org)
    path = f"/v1/organization/projects/{project.public_id}/spend_limit"
    missing = await http.get(path, headers=bearer(admin_key))
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "project_id"
    limit = await admin.admin.organization.projects.spend_limit.update(
        project.public_id, currency="USD", interval="month", threshold_amount=2500
    )
    assert (limit.threshold_amount, limit.enforcement.status) == (2500, "inactive")
    body = (await http.get(path, headers=bearer(admin_key))).json()
    validate_schema("ProjectSpendLimitResource", body)
    await sync_to_async(project.refresh_from_db)()
    assert project.monthly_budget_micros == 25_000_000  # 25 USD
    deleted = await http.delete(path, headers=bearer(admin_key))
    validate_schema("ProjectSpendLimitDeletedResource", deleted.json())
    assert deleted.json() == {"object": "project.spend_limit.deleted", "deleted": True}
    assert (await http.get(path, headers=bearer(admin_key))).status_code == 404


async def test_bad_limits_and_other_tenants_limits_get_openai_errors(
    http: httpx.AsyncClient, admin_key: str, org: Organization, other_org: Organization, default_model: None
) -> None:
    theirs = await sync_to_async(default_project)(organization=other_org)
    mine = await sync_to_async(default_project)(organization=org)
    limits = f"/v1/organization/projects/{mine.public_id}/rate_limits"
    spend = f"/v1/organization/projects/{mine.public_id}/spend_limit"
    good = {"currency": "USD", "interval": "month"}
    cases = [
        ("GET", f"/v1/organization/projects/{theirs.public_id}/rate_limits", None, 404, "project_id"),
        ("POST", f"/v1/organization/projects/{theirs.public_id}/rate_limits/rl-gemma-3-270m",
         {"max_requests_per_1_minute": 1}, 404, "project_id"),
        ("GET", f"/v1/organization/projects/{theirs.public_id}/spend_limit", None, 404, "project_id"),
        ("POST", f"/v1/organization/projects/{theirs.public_id}/spend_limit", {"threshold_amount": 1, **good}, 404,
         "project_id"),
        ("POST", f"{limits}/rl-no-such-model", {"max_requests_per_1_minute": 1}, 404, "rate_limit_id"),
        ("POST", f"{limits}/rl-gemma-3-270m", {"max_requests_per_1_minute": 0}, 400, "max_requests_per_1_minute"),
        ("POST", f"{limits}/rl-gemma-3-270m", {"max_requests_per_1_minute": -5}, 400, "max_requests_per_1_minute"),
        ("POST", f"{limits}/rl-gemma-3-270m", {"max_requests_per_1_minute": 10**13}, 400,
         "max_requests_per_1_minute"),
        ("POST", f"{limits}/rl-gemma-3-270m", {"max_tokens_per_1_minute": "100"}, 400, "max_tokens_per_1_minute"),
        ("POST", f"{limits}/rl-gemma-3-270m", {"max_tokens_per_1_minute": True}, 400, "max_tokens_per_1_minute"),
        ("POST", f"{limits}/rl-gemma-3-270m", {"max_tokens_per_1_minute": 1.5}, 400, "max_tokens_per_1_minute"),
        ("POST", f"{limits}/rl-gemma-3-270m", {"max_images_per_1_minute": 5}, 400, "max_images_per_1_minute"),
        ("POST", f"{limits}/rl-gemma-3-270m", {"burst": 5}, 400, "burst"),
        ("POST", f"{limits}/rl-gemma-3-270m", [1], 400, None),
        ("GET", f"{limits}?limit=1000", None, 400, "limit"),
        ("GET", f"{limits}?after=rl-nope", None, 400, "after"),
        ("POST", spend, {"threshold_amount": 0, **good}, 400, "threshold_amount"),
        ("POST", spend, {"threshold_amount": 10**20, **good}, 400, "threshold_amount"),
        ("POST", spend, {"threshold_amount": "100", **good}, 400, "threshold_amount"),
        ("POST", spend, {"threshold_amount": 100, "currency": "EUR", "interval": "month"}, 400, "currency"),
        ("POST", spend, {"threshold_amount": 100, "currency": "USD", "interval": "week"}, 400, "interval"),
        ("POST", spend, {"threshold_amount": 100}, 400, "currency"),
        ("DELETE", spend, None, 404, "project_id"),
    ]
    for method, path, body, status, param in cases:
        response = await http.request(method, path, json=body, headers=bearer(admin_key))
        error = response.json()["error"]
        assert response.status_code == status, (path, body, response.text)
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, (path, body, error)


async def test_audit_logs_are_openai_events_paginated_newest_first(
    http: httpx.AsyncClient, admin_key: str, validate_schema: Validate
) -> None:
    for name in ("a", "b", "c"):
        await http.post("/v1/organization/projects", json={"name": name}, headers=bearer(admin_key))
    first = (await http.get("/v1/organization/audit_logs?limit=2&event_types[]=project.created",
                            headers=bearer(admin_key))).json()
    for event in first["data"]:
        validate_schema("AuditLog", event)
    assert [e["project.created"]["data"]["name"] for e in first["data"]] == ["c", "b"] and first["has_more"]
    assert first["data"][0]["actor"]["type"] == "api_key"
    query = f"limit=2&event_types[]=project.created&after={first['last_id']}"
    rest = (await http.get(f"/v1/organization/audit_logs?{query}", headers=bearer(admin_key))).json()
    assert [e["project.created"]["data"].get("name") for e in rest["data"]] == ["a", "Default project"]


async def test_openapi_document_is_valid_and_lists_the_management_paths(http: httpx.AsyncClient) -> None:
    from openapi_spec_validator import validate

    response = await http.get("/v1/organization/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    assert document["openapi"] == "3.1.0"
    assert {
        "/v1/organization/admin_api_keys", "/v1/organization/admin_api_keys/{key_id}", "/v1/organization/users",
        "/v1/organization/users/{user_id}", "/v1/organization/invites", "/v1/organization/projects",
        "/v1/organization/projects/{project_id}/api_keys", "/v1/organization/projects/{project_id}/api_keys/{key_id}",
        "/v1/organization/audit_logs", "/v1/organization/projects/{project_id}/rate_limits",
        "/v1/organization/projects/{project_id}/rate_limits/{rate_limit_id}",
        "/v1/organization/projects/{project_id}/spend_limit",
    } <= set(document["paths"])
    created = document["paths"]["/v1/organization/projects/{project_id}/api_keys"]["post"]
    assert "value" in created["responses"]["200"]["content"]["application/json"]["schema"]["properties"]
    assert document["components"]["securitySchemes"]["AdminApiKeyAuth"]["scheme"] == "bearer"



def test_a_signed_in_owner_uses_it_with_csrf_and_a_reader_may_not(org: Organization) -> None:
    from django.test import Client

    owner = get_user_model().objects.create_user("olga", email="olga@example.com", password="x" * 12)
    reader = get_user_model().objects.create_user("ray", email="ray@example.com", password="x" * 12)
    membership_set(organization=org, user=owner, role=Role.OWNER)
    membership_set(organization=org, user=reader, role=Role.READER)
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    assert [p["name"] for p in client.get("/v1/organization/projects").json()["data"]] == ["Default project"]
    refused = client.post("/v1/organization/projects", {"name": "x"}, content_type="application/json")
    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]["message"]
    client.force_login(reader)
    denied = client.get("/v1/organization/projects")
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"


async def test_the_management_api_is_rate_limited_per_caller_with_an_openai_429(
    org: Organization, admin_key: str, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dashboard.admin_api.base import ManagementApi

    monkeypatch.setattr(ManagementApi, "rate", "2/m")
    for _ in range(2):
        assert (await http.get("/v1/organization/projects", headers=bearer(admin_key))).status_code == 200
    refused = await http.get("/v1/organization/usage/completions?start_time=0", headers=bearer(admin_key))
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    other = await sync_to_async(apikey_create)(organization=org, name="ops 2", scopes=["admin"], actor_label="test")
    assert (await http.get("/v1/organization/projects", headers=bearer(other[1]))).status_code == 200
