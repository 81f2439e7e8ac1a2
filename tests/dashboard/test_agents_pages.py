"""The agents pages through Django's test client: agents, connectors and hooks made and deleted by owners,
only seen by readers, secrets shown once, other tenants' ids a 404, and connectors given to a new key."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.test import Client

from agents.models import Agent, Connector, Hook, HookDelivery, ToolRun
from agents.services import agent_create, connector_create, hook_create
from apikeys.models import ApiKey
from platform_site.access import system_actor
from platform_site.models import Organization, Project, Role
from platform_site.selectors import default_project
from platform_site.services import membership_set, organization_create

pytestmark = pytest.mark.django_db

CONNECTOR_URL = "https://tools.example.com/weather"


def _user(email: str) -> User:
    from allauth.account.models import EmailAddress

    user = get_user_model().objects.create_user(username=email.split("@")[0], email=email, password="pw-" + "x" * 12)
    EmailAddress.objects.create(user=user, email=email, verified=True, primary=True)
    return user


def _client(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture(autouse=True)
def _catalog(db: None) -> None:
    from completions.services import catalog_ensure_default

    catalog_ensure_default()


@pytest.fixture
def alice() -> User:
    return _user("alice@example.com")


@pytest.fixture
def acme(alice: User) -> Organization:
    return organization_create(name="Acme", owner=alice)


@pytest.fixture
def project(acme: Organization) -> Project:
    return default_project(organization=acme)


def _connector(organization: Organization, project: Project, name: str = "weather") -> Connector:
    connector, _ = connector_create(
        by=system_actor(organization), project=project, type="http", name=name, url=CONNECTOR_URL
    )
    return connector


def _agent(organization: Organization, project: Project, slug: str = "helper") -> Agent:
    return agent_create(by=system_actor(organization), project=project, slug=slug, name="Helper",
                        model="gemma-3-270m")


def test_an_owner_sees_the_three_pages_and_the_nav_link(alice: User, project: Project) -> None:
    client = _client(alice)
    for path, heading in (("/agents", "Agents"), ("/agents/connectors", "Connectors"), ("/agents/hooks", "Hooks")):
        response = client.get(path)
        assert response.status_code == 200, path
        page = response.content.decode()
        assert f"<h1>{heading}</h1>" in page and 'href="/agents" aria-current="page"' in page
    page = client.get("/agents").content.decode()
    assert "Create an agent" in page and '<option value="gemma-3-270m"' in page and "Recent tool runs" in page


def test_an_owner_creates_edits_and_deletes_an_agent_with_a_connector(
    alice: User, acme: Organization, project: Project
) -> None:
    connector = _connector(acme, project)
    client = _client(alice)
    response = client.post("/agents", {"slug": "support", "name": "Support", "model": "gemma-3-270m",
                                       "instructions": "Be brief.", "connectors": [connector.public_id],
                                       "max_iterations": "7"})
    assert response.status_code == 302
    agent = Agent.objects.get(slug="support")
    assert (agent.project, agent.model, agent.instructions, agent.max_iterations) == (project, "gemma-3-270m",
                                                                                       "Be brief.", 7)
    assert list(agent.connectors.all()) == [connector]
    listing = client.get(response["Location"]).content.decode()
    assert "agent:support" in listing and "weather" in listing

    response = client.post(f"/agents/{agent.public_id}", {"slug": "ignored", "name": "Support desk",
                                                           "model": "gemma-3-270m", "instructions": "",
                                                           "max_iterations": "3"})
    assert response.status_code == 302
    agent.refresh_from_db()
    assert (agent.slug, agent.name, agent.max_iterations, agent.connectors.count()) == ("support", "Support desk", 3, 0)

    assert "This cannot be undone" in client.get(f"/agents/{agent.public_id}/delete").content.decode()
    assert client.post(f"/agents/{agent.public_id}/delete").status_code == 302
    assert not Agent.objects.filter(pk=agent.pk).exists()


def test_an_agents_model_must_be_in_the_catalog(alice: User, acme: Organization) -> None:
    response = _client(alice).post("/agents", {"slug": "ghost", "name": "Ghost", "model": "gpt-17",
                                               "max_iterations": "5"})
    assert response.status_code == 200 and "Select a valid choice" in response.content.decode()
    assert not Agent.objects.filter(slug="ghost").exists()


def test_a_service_refusal_is_shown_on_the_form(alice: User, acme: Organization, project: Project) -> None:
    _agent(acme, project, slug="taken")
    response = _client(alice).post("/agents", {"slug": "taken", "name": "Again", "model": "gemma-3-270m",
                                               "max_iterations": "5"})
    assert response.status_code == 200
    assert "already has an agent" in response.content.decode()


def test_an_http_connectors_secret_is_shown_once_and_never_again(alice: User, project: Project) -> None:
    client = _client(alice)
    response = client.post("/agents/connectors", {
        "type": "http", "name": "lookup", "url": CONNECTOR_URL, "description": "Looks things up.",
        "parameters": '{"type": "object", "properties": {"q": {"type": "string"}}}', "timeout_ms": "5000",
    })
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    secret = re.search(r'id="connector-secret" type="text" value="([^"]+)"', response.content.decode()).group(1)  # type: ignore[union-attr]
    assert secret.startswith("whsec_")
    connector = Connector.objects.get(name="lookup")
    assert connector.timeout_ms == 5000 and secret not in connector.secret_encrypted
    for path in ("/agents/connectors", "/agents", "/settings/audit-log"):
        assert secret not in client.get(path).content.decode()
    assert "lookup" in client.get("/agents/connectors").content.decode()


def test_an_mcp_connector_has_no_secret_page_and_bad_json_is_refused(alice: User, acme: Organization) -> None:
    client = _client(alice)
    response = client.post("/agents/connectors", {"type": "mcp", "name": "docs", "url": "https://mcp.example.com/mcp",
                                                  "authorization": "Bearer abc"})
    assert response.status_code == 302
    assert Connector.objects.get(name="docs").type == "mcp"
    bad = client.post("/agents/connectors", {"type": "http", "name": "broken", "url": CONNECTOR_URL,
                                             "parameters": "{not json"})
    assert bad.status_code == 200 and "Not valid JSON" in bad.content.decode()
    assert not Connector.objects.filter(name="broken").exists()


def test_an_owner_deletes_a_connector(alice: User, acme: Organization, project: Project) -> None:
    connector = _connector(acme, project)
    assert _client(alice).post(f"/agents/connectors/{connector.public_id}/delete").status_code == 302
    assert not Connector.objects.filter(pk=connector.pk).exists()


def test_a_hooks_secret_is_shown_once_with_its_absolute_url_and_how_to_sign(
    alice: User, acme: Organization, project: Project
) -> None:
    agent = _agent(acme, project)
    client = _client(alice)
    response = client.post("/agents/hooks", {"name": "inbox", "agent": agent.public_id, "mode": "sync"})
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    page = response.content.decode()
    secret = re.search(r'id="hook-secret" type="text" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    assert "http://testserver/hooks/inbox" in page and "X-Keyway-Signature: t=" in page and "5 minutes" in page
    hook = Hook.objects.get(name="inbox")
    assert hook.agent == agent
    for path in ("/agents/hooks", f"/agents/hooks/{hook.public_id}"):
        seen = client.get(path).content.decode()
        assert secret not in seen and "http://testserver/hooks/inbox" in seen
    assert secret not in client.get("/settings/audit-log").content.decode()

    refused = client.post("/agents/hooks", {"name": "late", "agent": agent.public_id, "mode": "callback"})
    assert refused.status_code == 200 and "needs its URL" in refused.content.decode()


def test_a_hooks_page_lists_its_deliveries_and_deleting_it_works(
    alice: User, acme: Organization, project: Project
) -> None:
    from django.utils import timezone

    agent = _agent(acme, project)
    hook, _ = hook_create(by=system_actor(acme), project=project, name="alerts", agent=agent, mode="callback",
                          callback_url="https://receiver.example.com/in")
    HookDelivery.objects.create(hook=hook, organization=acme, sender="pager-7", status="failed", attempts=6,
                                last_status_code=503, last_error="the receiver answered HTTP 503",
                                created_at=timezone.now(), finished_at=timezone.now())
    client = _client(alice)
    page = client.get(f"/agents/hooks/{hook.public_id}").content.decode()
    for needle in ("pager-7", "Failed", "HTTP 503", "the receiver answered HTTP 503", "https://receiver.example.com/in"):
        assert needle in page, needle
    assert client.post(f"/agents/hooks/{hook.public_id}/delete").status_code == 302
    assert not Hook.objects.filter(pk=hook.pk).exists()


def test_recent_tool_runs_show_on_the_agents_page(alice: User, acme: Organization, project: Project) -> None:
    from django.utils import timezone

    connector = _connector(acme, project)
    ToolRun.objects.create(organization=acme, project=project, agent_slug="helper", connector=connector,
                           tool_name="weather", session_id="sess_1", request_id="req_1", call_id="call_1",
                           iteration=1, outcome="timeout", error="no answer in 10 s", duration_ms=10_004,
                           started_at=timezone.now())
    page = _client(alice).get("/agents").content.decode()
    assert "Timeout" in page and "10004 ms" in page and "no answer in 10 s" in page


def test_a_reader_sees_the_lists_but_cannot_create_or_delete(
    alice: User, acme: Organization, project: Project
) -> None:
    connector = _connector(acme, project)
    agent = _agent(acme, project)
    rex = _user("rex@example.com")
    membership_set(organization=acme, user=rex, role=Role.READER)
    client = _client(rex)
    page = client.get("/agents").content.decode()
    assert "agent:helper" in page and "Create an agent" not in page and ">Delete<" not in page
    assert "Add a connector" not in client.get("/agents/connectors").content.decode()
    assert "Create a hook" not in client.get("/agents/hooks").content.decode()

    refused = client.post("/agents", {"slug": "rexs", "name": "Rex", "model": "gemma-3-270m", "max_iterations": "5"})
    assert refused.status_code == 403 and "Only owners and admins can create agents" in refused.content.decode()
    assert client.post("/agents/connectors", {"type": "http", "name": "rexs", "url": CONNECTOR_URL}).status_code == 403
    assert client.post("/agents/hooks", {"name": "rexs", "agent": agent.public_id, "mode": "sync"}).status_code == 403
    edit = {"name": "Renamed", "model": "gemma-3-270m", "max_iterations": "5"}
    assert client.post(f"/agents/{agent.public_id}", edit).status_code == 403
    deleted = client.post(f"/agents/{agent.public_id}/delete", follow=True)
    assert "Only owners and admins can delete agents" in deleted.content.decode()
    client.post(f"/agents/connectors/{connector.public_id}/delete")
    assert not Agent.objects.filter(slug="rexs").exists() and not Connector.objects.filter(name="rexs").exists()
    assert not Hook.objects.exists()
    assert Agent.objects.get(pk=agent.pk).name == "Helper" and Connector.objects.filter(pk=connector.pk).exists()


def test_another_tenants_agents_connectors_hooks_and_projects_are_not_found(
    alice: User, acme: Organization, project: Project
) -> None:
    agent = _agent(acme, project)
    connector = _connector(acme, project)
    hook, _ = hook_create(by=system_actor(acme), project=project, name="inbox", agent=agent, mode="sync")
    # Eve has an organization of her own and nothing to do with Acme.
    eve = _user("eve@example.com")
    organization_create(name="Eve Corp", owner=eve)
    client = _client(eve)
    for path in (f"/agents/{agent.public_id}", f"/agents/{agent.public_id}/delete",
                 f"/agents/connectors/{connector.public_id}/delete", f"/agents/hooks/{hook.public_id}",
                 f"/agents/hooks/{hook.public_id}/delete", f"/agents?project={project.public_id}"):
        assert client.get(path).status_code == 404, path
        assert client.post(path).status_code == 404, path
    for path in ("/agents", "/agents/connectors", "/agents/hooks"):
        page = client.get(path).content.decode()
        assert "helper" not in page and "weather" not in page and "inbox" not in page
    assert Agent.objects.filter(pk=agent.pk).exists() and Hook.objects.filter(pk=hook.pk).exists()


def test_a_project_is_chosen_by_its_id(alice: User, acme: Organization, project: Project) -> None:
    other = Project.objects.create(organization=acme, name="Research")
    _agent(acme, other, slug="researcher")
    client = _client(alice)
    assert "agent:researcher" not in client.get("/agents").content.decode()
    page = client.get(f"/agents?project={other.public_id}").content.decode()
    assert "agent:researcher" in page and "<strong>Research</strong>" in page
    client.post(f"/agents?project={other.public_id}", {"slug": "second", "name": "Second", "model": "gemma-3-270m",
                                                       "max_iterations": "5"})
    assert Agent.objects.get(slug="second").project == other


def test_a_new_key_is_given_the_connectors_chosen_with_the_connectors_scope(
    alice: User, acme: Organization, project: Project
) -> None:
    from agents.selectors import key_connectors

    connector = _connector(acme, project)
    client = _client(alice)
    form = client.get("/settings/api-keys/new").content.decode()
    assert "Connectors this key may run" in form and connector.public_id in form
    without_scope = client.post("/settings/api-keys/new", {"name": "no-scope", "project": project.public_id,
                                                           "permissions": "restricted", "scopes": ["chat"],
                                                           "connectors": [connector.public_id]})
    assert without_scope.status_code == 200 and "Choose the Connectors endpoint too" in without_scope.content.decode()
    assert not ApiKey.objects.filter(name="no-scope").exists()
    response = client.post("/settings/api-keys/new", {"name": "tools", "project": project.public_id,
                                                      "permissions": "restricted", "scopes": ["chat", "connectors"],
                                                      "connectors": [connector.public_id]})
    assert response.status_code == 200 and 'id="secret-key"' in response.content.decode()
    key = ApiKey.objects.get(name="tools")
    assert key_connectors(organization=acme, key=key) == [connector]


def test_a_connector_of_another_project_is_not_given_to_a_key(
    alice: User, acme: Organization, project: Project
) -> None:
    other = Project.objects.create(organization=acme, name="Research")
    connector = _connector(acme, other)
    response = _client(alice).post("/settings/api-keys/new", {
        "name": "wrong", "project": project.public_id, "permissions": "restricted",
        "scopes": ["connectors"], "connectors": [connector.public_id],
    })
    assert response.status_code == 200 and "in this project" in response.content.decode()
    assert not ApiKey.objects.filter(name="wrong").exists()
