"""The isolation matrix of the REST APIs: every route with an id in its path (the model API, the management API,
the billing API), found by walking the URLconf, called with every method by a second organization's key with
the first organization's ids: always 404 (or 403/405), and nothing of the first organization in the answer.
The same for the ids a request names elsewhere (the billing API's and export's query parameters), for the
dashboard's pages, and for the realtime WebSocket (a session naming another session's items).

A new route with an id this file does not know fails the test until its id is added to OWNED_IDS: no route
escapes the matrix by being new.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.urls import URLPattern, URLResolver, get_resolver

from apikeys.services import apikey_create
from completions.services import provider_upsert_openai_compatible
from platform_site.models import Organization, Role
from platform_site.services import membership_set
from tests.conftest import bearer

pytestmark = pytest.mark.django_db(transaction=True)

# Path parameters that are not another tenant's ids: a catalog model (shared by every organization), a
# calendar month (`month` in the billing API, `period` on the dashboard's statements), a catch-all of unknown
# paths, and an invitation's secret token (its own test).
NOT_TENANT_IDS = {"model_id", "month", "period", "rest", "token"}
# Prefixes served by the session-only dashboard and the admin site, which this REST matrix does not call.
# Webhook ingress (hooks/<name>) is reached by a signature, not a key: its own tests pair tenants' hooks.
NOT_REST = ("admin/", "accounts/", "settings/", "organizations/", "invite/", "billing/", "usage", "playground",
            "models", "metrics", "health", "status", "agents", "hooks/")


def _routes(patterns: list[Any], prefix: str = "") -> Iterator[str]:
    for entry in patterns:
        if isinstance(entry, URLResolver):
            yield from _routes(entry.url_patterns, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern):
            yield prefix + str(entry.pattern)


def _id_routes() -> list[str]:
    routes = []
    for route in dict.fromkeys(_routes(get_resolver().url_patterns)):
        names = re.findall(r"<(?:\w+:)?(\w+)>|\(\?P<(\w+)>", route)
        params = {a or b for a, b in names}
        if not params - NOT_TENANT_IDS or route.startswith(NOT_REST):
            continue
        routes.append(route)
    return routes


def _fill(route: str, ids: dict[str, str]) -> str:
    unknown = {name for name in re.findall(r"<(?:\w+:)?(\w+)>", route) if name not in ids}
    assert not unknown, f"{route}: add an id of the first organization for {unknown} to the isolation matrix"
    return "/" + re.sub(r"<(?:\w+:)?(\w+)>", lambda match: ids[match[1]], route)


@pytest.fixture
async def owned(org: Organization, upstream: tuple[int, Any], asgi_client: Any) -> dict[str, str]:
    """The first organization's objects of every kind a route names, made through its own APIs."""
    port, _ = upstream

    def setup() -> tuple[str, str]:
        provider_upsert_openai_compatible(name="fake", base_url=f"http://127.0.0.1:{port}/v1", models=["ok"])
        admin = apikey_create(organization=org, name="admin", scopes=["admin"], actor_label="test")[1]
        user = get_user_model().objects.create_user(username="ada", email="ada@acme.test", password="x" * 16)
        membership_set(organization=org, user=user, role=Role.MEMBER, actor_label="test")
        return admin, user.keyway_profile.public_id

    admin, user_id = await sync_to_async(setup)()
    raw_key = await sync_to_async(lambda: apikey_create(organization=org, name="k", actor_label="test")[1])()
    key = bearer(raw_key)
    project = (await asgi_client.post("/v1/organization/projects", json={"name": "Secret project"},
                                      headers=bearer(admin))).json()
    invite = (await asgi_client.post("/v1/organization/invites", json={"email": "bob@acme.test", "role": "reader"},
                                     headers=bearer(admin))).json()
    admin_keys = (await asgi_client.get("/v1/organization/admin_api_keys", headers=bearer(admin))).json()["data"]
    project_keys = (await asgi_client.get(f"/v1/organization/projects/{project['id']}/api_keys",
                                          headers=bearer(admin))).json()["data"]
    if not project_keys:
        in_project = await sync_to_async(lambda: org.projects.get(public_id=project["id"]))()
        await sync_to_async(apikey_create)(organization=org, name="in project", actor_label="test", project=in_project)
        project_keys = (await asgi_client.get(f"/v1/organization/projects/{project['id']}/api_keys",
                                              headers=bearer(admin))).json()["data"]
    await asgi_client.post(f"/v1/organization/projects/{project['id']}/spend_limit", headers=bearer(admin),
                           json={"currency": "USD", "interval": "month", "threshold_amount": 2500})
    limits = (await asgi_client.get(f"/v1/organization/projects/{project['id']}/rate_limits",
                                    headers=bearer(admin))).json()["data"]
    conversation = (await asgi_client.post("/v1/conversations", headers=key, json={
        "items": [{"type": "message", "role": "user", "content": "the first organization's secret"}]})).json()
    items = (await asgi_client.get(f"/v1/conversations/{conversation['id']}/items", headers=key)).json()["data"]
    response = (await asgi_client.post("/v1/responses", json={"model": "ok", "input": "secret"}, headers=key)).json()
    in_project = f"/v1/organization/projects/{project['id']}"
    connector = (await asgi_client.post(f"{in_project}/connectors", headers=bearer(admin), json={
        "type": "http", "name": "secret_tool", "url": "https://tools.example.com/x"})).json()
    agent = (await asgi_client.post(f"{in_project}/agents", headers=bearer(admin), json={
        "slug": "secret-agent", "name": "Secret agent", "model": "ok", "connectors": [connector["id"]]})).json()
    hook = (await asgi_client.post(f"{in_project}/hooks", headers=bearer(admin), json={
        "name": "secret-hook", "agent": "secret-agent", "mode": "sync"})).json()
    session = (await asgi_client.post("/v1/sessions", headers=key, json={})).json()
    return {
        "project_id": project["id"], "key_id": project_keys[0]["id"], "admin_key_id": admin_keys[0]["id"],
        "user_id": user_id, "invite_id": invite["id"], "rate_limit_id": limits[0]["id"] if limits else "rl-ok",
        "conversation_id": conversation["id"], "item_id": items[0]["id"], "response_id": response["id"],
        "connector_id": connector["id"], "agent_id": agent["id"], "hook_id": hook["id"], "session_id": session["id"],
        "_key": raw_key, "_admin": admin,
    }


async def test_every_route_with_an_id_is_walled_off_from_another_organization(
    asgi_client: Any, owned: dict[str, str], other_org: Organization
) -> None:
    other_key = await sync_to_async(lambda: apikey_create(
        organization=other_org, name="other", actor_label="test",
        scopes=["models:read", "chat", "embeddings", "responses", "realtime", "sessions", "usage:read"])[1])()
    other_admin = await sync_to_async(lambda: apikey_create(
        organization=other_org, name="other admin", scopes=["admin"], actor_label="test")[1])()
    routes = _id_routes()
    assert len(routes) >= 20, routes  # the walk found the APIs' routes
    credentials = {"_key", "_admin"}
    secrets = {value for name, value in owned.items() if name not in credentials} - {"rl-ok"}
    # A control: the ids are right, so the first organization's own keys read every route that reads.
    for route in routes:
        if route.endswith(("/cancel", "/archive", "/rotate", "/rate_limits/<path:rate_limit_id>")):
            continue  # routes that only write
        ids = {**owned, "key_id": owned["admin_key_id"]} if route.startswith("v1/organization/admin_api_keys") \
            else owned
        own = owned["_admin"] if route.startswith("v1/organization/") else owned["_key"]
        answer = await asgi_client.get(_fill(route, ids), headers=bearer(own))
        assert answer.status_code == 200, (route, answer.status_code, answer.text[:300])
    for route in routes:
        ids = dict(owned)
        # The admin key routes name admin keys; the project key routes name project keys.
        if route.startswith("v1/organization/admin_api_keys"):
            ids["key_id"] = owned["admin_key_id"]
        path = _fill(route, ids)
        credential = other_admin if route.startswith("v1/organization/") else other_key
        for method in ("GET", "POST", "DELETE"):
            answer = await asgi_client.request(method, path, headers=bearer(credential), json={})
            assert answer.status_code in (403, 404, 405), (method, path, answer.status_code, answer.text[:300])
            leaked = [secret for secret in secrets if secret in answer.text and secret not in path]
            assert not leaked, (method, path, leaked)
            assert "secret" not in answer.text.replace(path, ""), (method, path, answer.text[:300])
    # The first organization still has all of it.
    assert (await asgi_client.get(f"/v1/responses/{owned['response_id']}",
                                  headers=bearer(other_key))).status_code == 404


def test_every_dashboard_page_with_an_id_is_walled_off_from_another_organizations_members() -> None:
    """The same for the dashboard's pages: an owner of another organization, signed in, gets 404 for every page
    and form that names one of the first organization's keys, projects, members or invitations."""
    from allauth.account.models import EmailAddress
    from django.test import Client

    from platform_site.access import system_actor
    from platform_site.services import invitation_create, organization_create, project_create

    def user(email: str) -> Any:
        made = get_user_model().objects.create_user(username=email.split("@")[0], email=email, password="x" * 16)
        EmailAddress.objects.create(user=made, email=email, verified=True, primary=True)
        return made

    alice, bob, mallory = user("alice@acme.test"), user("bob@acme.test"), user("mallory@globex.test")
    acme = organization_create(name="Acme secret org", owner=alice)
    membership_set(organization=acme, user=bob, role=Role.MEMBER, actor_label="test")
    organization_create(name="Globex", owner=mallory)
    project = project_create(by=system_actor(acme), name="Secret project")
    key, _ = apikey_create(organization=acme, name="Secret key", actor_label="test")
    invitation = invitation_create(by=system_actor(acme), email="carol@acme.test", role=Role.MEMBER,
                                   accept_url="http://testserver/invite/{token}")
    by_kind = {"api-keys": key.public_id, "projects": project.public_id, "invitations": invitation.public_id,
               "members": bob.keyway_profile.public_id}
    routes = [route for route in dict.fromkeys(_routes(get_resolver().url_patterns))
              if route.startswith("settings/") and "<" in route]
    assert len(routes) >= 5, routes

    def fill(route: str) -> str:
        kind = route.split("/")[1]
        assert kind in by_kind, f"{route}: add an id of the first organization for it to the isolation matrix"
        return "/" + re.sub(r"<(?:\w+:)?(\w+)>", by_kind[kind], route)

    intruder, owner = Client(), Client()
    intruder.force_login(mallory)
    owner.force_login(alice)
    for route in routes:
        path = fill(route)
        for method in ("get", "post"):
            answer = getattr(intruder, method)(path)
            assert answer.status_code in (403, 404, 405), (method, path, answer.status_code)
            assert b"Secret" not in answer.content and b"acme" not in answer.content.lower(), (method, path)
        # The control: the ids are the right ones (the owner reads the project and changes the member's role).
        if route.startswith("settings/projects/"):
            assert owner.get(path).status_code == 200, path
        if route.startswith("settings/members/"):
            assert owner.post(path, {"role": Role.READER}).status_code == 302, path
    bob.refresh_from_db()
    assert bob.memberships.get().role == Role.READER
    # Nothing the intruder posted changed anything: the key is not revoked or rotated, the invitation stands.
    key.refresh_from_db()
    assert key.revoked_at is None and key.previous_secret_hash == ""
    invitation.refresh_from_db()


async def test_ids_in_query_parameters_of_the_billing_api_and_its_export_are_walled_off(
    asgi_client: Any, org: Organization, other_org: Organization
) -> None:
    """The usage API and CSV export filter by `api_key` and name an organization by `organization`: another
    organization's key, naming the first organization's key or slug, gets 404 and none of its rows."""
    first_key, first_raw = await sync_to_async(apikey_create)(
        organization=org, name="Secret first key", actor_label="test", scopes=["usage:read"])
    other_raw = (await sync_to_async(apikey_create)(
        organization=other_org, name="other", actor_label="test", scopes=["usage:read"]))[1]
    for path in ("/api/billing/usage", "/api/billing/usage.csv"):
        mine = await asgi_client.get(path, params={"api_key": first_key.public_id}, headers=bearer(first_raw))
        assert mine.status_code == 200, (path, mine.text[:300])  # the control: the id is the right one
        for params, param in (({"api_key": first_key.public_id}, "api_key"), ({"organization": org.slug}, None)):
            answer = await asgi_client.get(path, params=params, headers=bearer(other_raw))
            assert answer.status_code == 404, (path, params, answer.status_code, answer.text[:300])
            assert answer.json()["error"]["param"] == param
            assert "Secret" not in answer.text and org.name not in answer.text
    for path in ("/api/billing/balance", "/api/billing/credits", "/api/billing/statements/2026-01"):
        answer = await asgi_client.get(path, params={"organization": org.slug}, headers=bearer(other_raw))
        assert answer.status_code == 404, (path, answer.status_code)


async def test_a_realtime_session_cannot_reach_another_organizations_session(
    org: Organization, other_org: Organization, upstream: tuple[int, Any]
) -> None:
    """A realtime session knows only its own conversation: another organization's session, naming the first
    one's item ids in every event that takes an id, gets `item_not_found` and nothing of the item."""
    from tests.completions.test_realtime import Client, communicator

    port, _ = upstream
    await sync_to_async(provider_upsert_openai_compatible)(
        name="fake", base_url=f"http://127.0.0.1:{port}/v1", models=["ok"])
    first_raw = (await sync_to_async(apikey_create)(organization=org, name="first", actor_label="test"))[1]
    other_raw = (await sync_to_async(apikey_create)(organization=other_org, name="other", actor_label="test"))[1]
    first, other = (communicator("/v1/realtime?model=ok", key=raw) for raw in (first_raw, other_raw))
    try:
        for socket in (first, other):
            assert (await socket.connect())[0]
        owner, intruder = Client(first), Client(other)
        await owner.until("session.created")
        await intruder.until("session.created")
        await owner.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "the first secret"}]}})
        item_id = (await owner.until("conversation.item.done"))["item"]["id"]
        attempts = [
            {"type": "conversation.item.retrieve", "item_id": item_id},
            {"type": "conversation.item.delete", "item_id": item_id},
            {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 0},
            {"type": "conversation.item.create", "previous_item_id": item_id, "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}},
            {"type": "response.create", "response": {"conversation": "none", "input": [
                {"type": "item_reference", "id": item_id}]}},
        ]
        for attempt in attempts:
            await intruder.send(attempt)
            answer = await intruder.until("error")
            assert answer["error"]["code"] == "item_not_found", (attempt["type"], answer)
            assert "first secret" not in str(answer)
        # The control: the id is right, and the first session still has its item.
        await owner.send({"type": "conversation.item.retrieve", "item_id": item_id})
        retrieved = await owner.until("conversation.item.retrieved")
        assert retrieved["item"]["content"][0]["text"] == "the first secret"
    finally:
        await first.disconnect()
        await other.disconnect()
