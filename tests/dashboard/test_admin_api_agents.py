"""The management API of connectors, agents and hooks (and a project key's connectors): created, read and
deleted with an admin key; secrets shown once and stored encrypted; every bad field named; every tenant
walled off; every change audited."""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
import pytest
from django.test import Client
from django.utils import timezone

from agents.models import Agent, Connector, ConnectorGrant, Hook, HookDelivery
from apikeys.models import ApiKey
from apikeys.services import apikey_create
from completions.selectors import model_ids_enabled
from platform_site.access import Actor
from platform_site.crypto import decrypt_secret
from platform_site.exceptions import NotPermitted
from platform_site.models import AuditLog, Organization, Project, Role
from platform_site.selectors import default_project

pytestmark = pytest.mark.django_db

BASE = "/v1/organization/projects"


class Api:
    """A client of the management API holding one admin key."""

    def __init__(self, raw_key: str) -> None:
        self.client = Client()
        self.headers = {"Authorization": f"Bearer {raw_key}"}

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = b"" if body is None else orjson.dumps(body)
        response = self.client.generic(method, path, data, content_type="application/json", headers=self.headers)
        return response.status_code, response.json()

    def get(self, path: str) -> tuple[int, Any]:
        return self.call("GET", path)

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        return self.call("POST", path, body)

    def delete(self, path: str) -> tuple[int, Any]:
        return self.call("DELETE", path)


def admin_of(organization: Organization) -> Api:
    return Api(apikey_create(organization=organization, name="ops", scopes=["admin"], actor_label="test")[1])


@pytest.fixture
def api(org: Organization) -> Api:
    return admin_of(org)


@pytest.fixture
def project(org: Organization) -> Project:
    return default_project(organization=org)


@pytest.fixture
def model(default_model: None) -> str:
    return model_ids_enabled()[0]


HTTP_CONNECTOR = {
    "type": "http",
    "name": "lookup_order",
    "description": "Look an order up by its number.",
    "url": "https://tools.example.com/orders",
    "parameters": {"type": "object", "properties": {"number": {"type": "string"}}, "required": ["number"]},
    "timeout_ms": 5000,
}


def make_connector(api: Api, project: Project, **changes: Any) -> dict[str, Any]:
    status, body = api.post(f"{BASE}/{project.public_id}/connectors", {**HTTP_CONNECTOR, **changes})
    assert status == 200, body
    return body


def make_agent(api: Api, project: Project, model: str, **changes: Any) -> dict[str, Any]:
    status, body = api.post(f"{BASE}/{project.public_id}/agents", {"slug": "support", "name": "Support",
                                                                    "model": model, **changes})
    assert status == 200, body
    return body


def assert_error(answer: tuple[int, Any], status: int, param: str | None, code: str | None = None) -> None:
    got, body = answer
    assert got == status, body
    assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body


def test_an_http_connector_is_created_with_its_secret_once_listed_read_and_deleted(
    api: Api, org: Organization, project: Project
) -> None:
    created = make_connector(api, project)
    secret = created["secret"]
    assert secret.startswith("whsec_") and len(secret) > 30
    assert created["id"].startswith("conn_") and created["object"] == "organization.project.connector"
    assert created["parameters"] == HTTP_CONNECTOR["parameters"]
    assert (created["timeout_ms"], created["max_response_bytes"]) == (5000, 65_536)
    assert isinstance(created["created_at"], int)

    row = Connector.objects.get(public_id=created["id"])
    assert secret not in row.secret_encrypted and decrypt_secret(row.secret_encrypted) == secret

    status, listed = api.get(f"{BASE}/{project.public_id}/connectors")
    assert status == 200 and [item["id"] for item in listed["data"]] == [created["id"]]
    status, got = api.get(f"{BASE}/{project.public_id}/connectors/{created['id']}")
    assert status == 200 and got == {k: v for k, v in created.items() if k != "secret"}
    assert secret not in str(listed) + str(got)

    status, deleted = api.delete(f"{BASE}/{project.public_id}/connectors/{created['id']}")
    assert status == 200 and deleted == {"object": "organization.project.connector.deleted", "id": created["id"],
                                         "deleted": True}
    assert_error(api.get(f"{BASE}/{project.public_id}/connectors/{created['id']}"), 404, "connector_id")
    audit = AuditLog.objects.filter(organization=org, action__startswith="connector.")
    assert sorted(audit.values_list("action", flat=True)) == ["connector.created", "connector.deleted"]
    assert all(secret not in str(row.details) for row in audit)


def test_an_mcp_connector_keeps_its_authorization_encrypted_and_never_shows_it(
    api: Api, project: Project
) -> None:
    status, created = api.post(f"{BASE}/{project.public_id}/connectors", {
        "type": "mcp", "name": "crm", "url": "https://mcp.example.com/mcp", "authorization": "Bearer tok-123",
        "max_response_bytes": 2048,
    })
    assert status == 200, created
    assert "secret" not in created and "parameters" not in created and "tok-123" not in str(created)
    assert created["max_response_bytes"] == 2048 and created["timeout_ms"] == 10_000
    row = Connector.objects.get(public_id=created["id"])
    assert "tok-123" not in row.secret_encrypted and decrypt_secret(row.secret_encrypted) == "Bearer tok-123"
    assert "tok-123" not in str(api.get(f"{BASE}/{project.public_id}/connectors")[1])


@pytest.mark.parametrize(
    ("changes", "status", "param"),
    [
        ({"url": "ftp://tools.example.com/x"}, 400, "url"),
        ({"url": "https://"}, 400, "url"),
        ({"url": "not a url"}, 400, "url"),
        ({"url": "https://user:pw@tools.example.com/"}, 400, "url"),
        ({"url": "https://tools.example.com/" + "a" * 2000}, 400, "url"),
        ({"url": "https://tools.example.com:99999/"}, 400, "url"),
        ({"url": 7}, 400, "url"),
        ({"parameters": {"type": "string"}}, 400, "parameters"),
        ({"parameters": {"properties": {}}}, 400, "parameters"),
        ({"parameters": [1, 2]}, 400, "parameters"),
        ({"parameters": {"type": "object", "description": "x" * 70_000}}, 400, "parameters"),
        ({"timeout_ms": 99}, 400, "timeout_ms"),
        ({"timeout_ms": 120_001}, 400, "timeout_ms"),
        ({"timeout_ms": True}, 400, "timeout_ms"),
        ({"max_response_bytes": 1023}, 400, "max_response_bytes"),
        ({"max_response_bytes": 1_048_577}, 400, "max_response_bytes"),
        ({"name": "1lookup"}, 400, "name"),
        ({"name": "a" * 49}, 400, "name"),
        ({"name": "look up"}, 400, "name"),
        ({"type": "ftp"}, 400, "type"),
        ({"description": "x" * 1025}, 400, "description"),
        ({"authorization": "Bearer x"}, 400, "authorization"),
        ({"type": "mcp"}, 400, "parameters"),
    ],
)
def test_a_bad_connector_is_refused_naming_the_field(
    api: Api, project: Project, changes: dict[str, Any], status: int, param: str
) -> None:
    assert_error(api.post(f"{BASE}/{project.public_id}/connectors", {**HTTP_CONNECTOR, **changes}), status, param)
    assert not Connector.objects.exists()


def test_a_connector_name_is_unique_in_its_project_only(api: Api, org: Organization, project: Project) -> None:
    make_connector(api, project)
    assert_error(api.post(f"{BASE}/{project.public_id}/connectors", HTTP_CONNECTOR), 409, "name", "name_taken")
    assert_error(api.post(f"{BASE}/{project.public_id}/connectors", {**HTTP_CONNECTOR, "type": "mcp",
                                                                     "parameters": None}), 409, "name")
    status, other = api.post(f"{BASE}", {"name": "Other"})
    assert status == 200
    assert api.post(f"{BASE}/{other['id']}/connectors", HTTP_CONNECTOR)[0] == 200


def test_agents_are_created_listed_updated_and_deleted(
    api: Api, org: Organization, project: Project, model: str
) -> None:
    connector = make_connector(api, project)
    created = make_agent(api, project, model, instructions="Be brief.", connectors=[connector["id"]],
                         max_iterations=5)
    assert created["id"].startswith("agent_") and created["object"] == "organization.project.agent"
    assert created["model_id"] == "agent:support" and created["model"] == model
    assert created["connectors"] == [connector["id"]] and created["max_iterations"] == 5
    assert created["instructions"] == "Be brief." and isinstance(created["created_at"], int)

    status, listed = api.get(f"{BASE}/{project.public_id}/agents")
    assert status == 200 and listed["data"] == [created]
    path = f"{BASE}/{project.public_id}/agents/{created['id']}"
    assert api.get(path) == (200, created)

    status, updated = api.post(path, {"name": "Support desk", "connectors": [], "max_iterations": 50})
    assert status == 200, updated
    assert (updated["name"], updated["connectors"], updated["max_iterations"]) == ("Support desk", [], 50)
    assert updated["instructions"] == "Be brief." and updated["slug"] == "support"
    assert_error(api.post(path, {"slug": "renamed"}), 400, "slug")

    status, deleted = api.delete(path)
    assert status == 200 and deleted["deleted"] is True
    assert_error(api.get(path), 404, "agent_id")
    actions = set(AuditLog.objects.filter(organization=org, target=created["id"]).values_list("action", flat=True))
    assert actions == {"agent.created", "agent.updated", "agent.deleted"}


def test_a_bad_agent_is_refused_naming_the_field(
    api: Api, org: Organization, project: Project, model: str
) -> None:
    make_agent(api, project, model)
    path = f"{BASE}/{project.public_id}/agents"
    good = {"slug": "sales", "name": "Sales", "model": model}
    assert_error(api.post(path, {**good, "slug": "support"}), 409, "slug", "slug_taken")
    # Unique in the organization: `agent:<slug>` names one agent whichever project's key calls it.
    status, other = api.post(BASE, {"name": "Other"})
    assert_error(api.post(f"{BASE}/{other['id']}/agents", {**good, "slug": "support"}), 409, "slug")
    assert_error(api.post(path, {**good, "slug": "Sales"}), 400, "slug")
    assert_error(api.post(path, {**good, "slug": "-sales"}), 400, "slug")
    assert_error(api.post(path, {**good, "max_iterations": 0}), 400, "max_iterations")
    assert_error(api.post(path, {**good, "max_iterations": 51}), 400, "max_iterations")
    assert_error(api.post(path, {**good, "model": "no-such-model"}), 400, "model", "model_not_found")
    assert_error(api.post(path, {**good, "model": "agent:support"}), 400, "model", "model_not_found")
    assert_error(api.post(path, {**good, "name": "  "}), 400, "name")
    assert_error(api.post(path, {**good, "name": "x" * 201}), 400, "name")
    assert_error(api.post(path, {**good, "connectors": "conn_x"}), 400, "connectors")
    assert_error(api.post(path, {**good, "connectors": ["conn_nope"]}), 400, "connectors", "connector_not_found")
    elsewhere = make_connector(api, Project.objects.get(public_id=other["id"]))
    assert_error(api.post(path, {**good, "connectors": [elsewhere["id"]]}), 400, "connectors")
    assert set(Agent.objects.values_list("slug", flat=True)) == {"support"}


def test_hooks_are_created_with_their_secret_and_key_listed_and_deleted_with_their_key(
    api: Api, org: Organization, project: Project, model: str
) -> None:
    make_agent(api, project, model)
    status, created = api.post(f"{BASE}/{project.public_id}/hooks",
                               {"name": "support-inbox", "agent": "support", "mode": "sync"})
    assert status == 200, created
    secret = created["secret"]
    assert secret.startswith("whsec_") and created["id"].startswith("hook_")
    assert created["url"] == "/hooks/support-inbox" and created["agent"] == "support"
    assert created["mode"] == "sync" and created["callback_url"] is None

    hook = Hook.objects.select_related("api_key").get(public_id=created["id"])
    assert secret not in hook.secret_encrypted and decrypt_secret(hook.secret_encrypted) == secret
    assert hook.api_key.name == "hook support-inbox" and hook.api_key.scopes == ["chat"]
    assert hook.api_key.project_id == project.pk and hook.api_key.revoked_at is None

    path = f"{BASE}/{project.public_id}/hooks/{created['id']}"
    status, listed = api.get(f"{BASE}/{project.public_id}/hooks")
    assert status == 200 and listed["data"] == [{k: v for k, v in created.items() if k != "secret"}]
    assert api.get(path) == (200, listed["data"][0])

    now = timezone.now()
    for minutes, sender in ((2, "old@example.com"), (1, "new@example.com")):
        HookDelivery.objects.create(hook=hook, organization=org, sender=sender, session_id="sess_1", signature=sender,
                                    status=HookDelivery.Status.ANSWERED, reply_json='{"text": "private reply"}',
                                    created_at=now - dt.timedelta(minutes=minutes), finished_at=now)
    status, deliveries = api.get(f"{path}/deliveries")
    assert status == 200 and [d["sender"] for d in deliveries["data"]] == ["new@example.com", "old@example.com"]
    assert deliveries["data"][0]["status"] == "answered" and "private reply" not in str(deliveries)

    status, deleted = api.delete(path)
    assert status == 200 and deleted["deleted"] is True
    assert not Hook.objects.exists()
    assert ApiKey.objects.get(pk=hook.api_key.pk).revoked_at is not None
    actions = AuditLog.objects.filter(organization=org, action__startswith="hook.")
    assert sorted(actions.values_list("action", flat=True)) == ["hook.created", "hook.deleted"]
    assert all(secret not in str(row.details) for row in actions)


def test_a_callback_hook_needs_a_callback_url_and_a_sync_one_takes_none(
    api: Api, project: Project, model: str
) -> None:
    make_agent(api, project, model)
    path = f"{BASE}/{project.public_id}/hooks"
    good = {"name": "inbox", "agent": "support", "mode": "callback", "callback_url": "https://cb.example.com/in"}
    assert_error(api.post(path, {**good, "callback_url": None}), 400, "callback_url")
    assert_error(api.post(path, {**good, "callback_url": "ftp://cb.example.com"}), 400, "callback_url")
    assert_error(api.post(path, {**good, "mode": "sync"}), 400, "callback_url")
    assert_error(api.post(path, {**good, "mode": "later"}), 400, "mode")
    assert_error(api.post(path, {**good, "name": "Inbox"}), 400, "name")
    assert_error(api.post(path, {**good, "agent": "nobody"}), 400, "agent", "agent_not_found")
    status, created = api.post(path, good)
    assert status == 200 and created["callback_url"] == good["callback_url"], created
    assert_error(api.post(path, good), 409, "name", "name_taken")
    # No key is left behind by a refused hook: the one created belongs to the one hook.
    assert ApiKey.objects.filter(name__startswith="hook ").count() == 1


def test_a_hook_calls_only_an_agent_of_its_own_project(api: Api, project: Project, model: str) -> None:
    status, other = api.post(BASE, {"name": "Other"})
    make_agent(api, Project.objects.get(public_id=other["id"]), model)
    assert_error(api.post(f"{BASE}/{project.public_id}/hooks", {"name": "inbox", "agent": "support",
                                                                "mode": "sync"}), 400, "agent")


def test_deleting_an_agent_deletes_its_hooks_and_revokes_their_keys(
    api: Api, project: Project, model: str
) -> None:
    agent = make_agent(api, project, model)
    api.post(f"{BASE}/{project.public_id}/hooks", {"name": "inbox", "agent": "support", "mode": "sync"})
    key = Hook.objects.get().api_key
    assert api.delete(f"{BASE}/{project.public_id}/agents/{agent['id']}")[0] == 200
    assert not Hook.objects.exists()
    key.refresh_from_db()
    assert key.revoked_at is not None


def test_a_project_key_is_created_with_its_connectors_and_shows_them(
    api: Api, org: Organization, project: Project
) -> None:
    first, second = make_connector(api, project), make_connector(api, project, name="lookup_invoice")
    status, key = api.post(f"{BASE}/{project.public_id}/api_keys", {
        "name": "agent runner", "scopes": ["chat", "connectors"], "connectors": [second["id"], first["id"]],
    })
    assert status == 200, key
    assert key["value"].startswith("sk-kw-") and key["connectors"] == [second["id"], first["id"]]
    row = ApiKey.objects.get(name="agent runner")
    granted = ConnectorGrant.objects.filter(api_key=row).values_list("connector__public_id", flat=True)
    assert set(granted) == {first["id"], second["id"]}
    assert api.get(f"{BASE}/{project.public_id}/api_keys/{key['id']}")[1]["connectors"] == [
        second["id"], first["id"]
    ]
    listed = api.get(f"{BASE}/{project.public_id}/api_keys")[1]["data"]
    assert [item["connectors"] for item in listed] == [[second["id"], first["id"]]]
    audit = AuditLog.objects.get(organization=org, action="api_key.connectors_set")
    assert audit.target == row.public_id and sorted(audit.details["data"]["connectors"]) == sorted(granted)


def test_a_project_key_with_a_foreign_or_unscoped_connector_is_refused_and_not_created(
    api: Api, org: Organization, other_org: Organization, project: Project
) -> None:
    mine = make_connector(api, project)
    status, other_project = api.post(BASE, {"name": "Other"})
    elsewhere = make_connector(api, Project.objects.get(public_id=other_project["id"]))
    theirs = make_connector(admin_of(other_org), default_project(organization=other_org))
    keys_before = ApiKey.objects.count()
    path = f"{BASE}/{project.public_id}/api_keys"
    for connector in (elsewhere, theirs):
        assert_error(api.post(path, {"name": "k", "scopes": ["chat", "connectors"], "connectors": [connector["id"]]}),
                     400, "connectors", "connector_not_found")
    # Refused after the key was made (it lacks the scope): the transaction takes the key back too.
    assert_error(api.post(path, {"name": "k", "scopes": ["chat"], "connectors": [mine["id"]]}), 400, "connectors")
    assert_error(api.post(path, {"name": "k", "connectors": [7]}), 400, "connectors")
    assert ApiKey.objects.count() == keys_before and not ConnectorGrant.objects.exists()


def test_another_organizations_admin_key_finds_none_of_these_objects(
    api: Api, org: Organization, other_org: Organization, project: Project, model: str
) -> None:
    connector = make_connector(api, project)
    agent = make_agent(api, project, model)
    status, hook = api.post(f"{BASE}/{project.public_id}/hooks", {"name": "inbox", "agent": "support",
                                                                  "mode": "sync"})
    assert status == 200
    theirs = admin_of(other_org)
    their_project = default_project(organization=other_org).public_id
    p = project.public_id
    for path, param in (
        (f"{BASE}/{p}/connectors", "project_id"),
        (f"{BASE}/{p}/agents", "project_id"),
        (f"{BASE}/{p}/hooks", "project_id"),
        (f"{BASE}/{p}/connectors/{connector['id']}", "project_id"),
        (f"{BASE}/{p}/agents/{agent['id']}", "project_id"),
        (f"{BASE}/{p}/hooks/{hook['id']}", "project_id"),
        (f"{BASE}/{p}/hooks/{hook['id']}/deliveries", "project_id"),
        (f"{BASE}/{their_project}/connectors/{connector['id']}", "connector_id"),
        (f"{BASE}/{their_project}/agents/{agent['id']}", "agent_id"),
        (f"{BASE}/{their_project}/hooks/{hook['id']}", "hook_id"),
        (f"{BASE}/{their_project}/hooks/{hook['id']}/deliveries", "hook_id"),
    ):
        for method in ("GET", "POST", "DELETE"):
            status, body = theirs.call(method, path, {})
            assert status in (404, 405), (method, path, body)
            if status == 404:
                assert body["error"]["param"] == param, (method, path, body)
            assert connector["name"] not in str(body) and "support" not in str(body)
    # An id of its own project's objects under another project of the same organization is as unknown.
    status, other = api.post(BASE, {"name": "Other"})
    assert_error(api.get(f"{BASE}/{other['id']}/connectors/{connector['id']}"), 404, "connector_id")
    assert (Connector.objects.count(), Agent.objects.count(), Hook.objects.count()) == (1, 1, 1)


def test_an_archived_project_takes_no_new_connector(api: Api, project: Project) -> None:
    status, other = api.post(BASE, {"name": "Old"})
    assert api.post(f"{BASE}/{other['id']}/archive", {})[0] == 200
    assert_error(api.post(f"{BASE}/{other['id']}/connectors", HTTP_CONNECTOR), 409, "project_id")


def test_members_and_readers_may_not_wire_connectors(org: Organization, project: Project) -> None:
    from agents.services import connector_create

    for role in (Role.MEMBER, Role.READER):
        with pytest.raises(NotPermitted):
            connector_create(by=Actor(organization=org, role=role, via="test"), project=project, type="http",
                             name="x", url="https://tools.example.com/")
    assert not Connector.objects.exists()


def test_a_project_keys_connectors_are_changed_after_it_was_created(
    api: Api, org: Organization, other_org: Organization, project: Project
) -> None:
    first, second = make_connector(api, project), make_connector(api, project, name="lookup_invoice")
    status, key = api.post(f"{BASE}/{project.public_id}/api_keys", {
        "name": "agent runner", "scopes": ["chat", "connectors"], "connectors": [first["id"]]})
    path = f"{BASE}/{project.public_id}/api_keys/{key['id']}"
    status, changed = api.post(path, {"connectors": [second["id"]]})
    assert status == 200 and changed["connectors"] == [second["id"]]
    assert list(ConnectorGrant.objects.values_list("connector__public_id", flat=True)) == [second["id"]]
    assert api.post(path, {"connectors": []})[1]["connectors"] == []
    theirs = make_connector(admin_of(other_org), default_project(organization=other_org))
    assert_error(api.post(path, {"connectors": [theirs["id"]]}), 400, "connectors", "connector_not_found")
    assert_error(api.post(path, {}), 400, "connectors")
    assert not ConnectorGrant.objects.exists()
