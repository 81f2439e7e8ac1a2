"""Agents end to end, on a real uvicorn server with two worker processes: an agent with an MCP connector (a
real MCP server) answers through the official SDK, streams its tool progress to a client that asks and
nothing extra to one that does not, continues its conversation by `session_id` on whichever worker takes
the next call, and answers a signed webhook. The model is the scripted tool-calling model on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import orjson
import pytest

from agents.connectors import sign
from tests.agents import scripted_model
from tests.agents.conftest import mcp_server  # noqa: F401 - the real MCP server, a fixture
from tests.e2e import server

pytestmark = pytest.mark.e2e

SETUP = """
from agents.models import Agent, Connector
from agents.services import agent_create, connector_create, connector_grants_set, hook_create
from apikeys.scopes import ALL_SCOPES, CONNECTORS
from apikeys.services import apikey_create
from platform_site.access import system_actor
from platform_site.models import Organization
org = Organization.objects.get(slug="demo")
by = system_actor(org)
project = org.projects.first()
shop, _ = connector_create(by=by, project=project, type="mcp", name="shop", url="{mcp_url}")
agent = agent_create(by=by, project=project, slug="support", name="Support", model="scripted",
                     instructions="Answer customers.", connectors=[shop])
key, raw = apikey_create(organization=org, project=project, name="agents e2e", scopes=[*ALL_SCOPES, CONNECTORS],
                         actor_label="e2e")
connector_grants_set(by=by, key=key, connectors=[shop])
hook, secret = hook_create(by=by, project=project, name="orders", agent=agent, mode="sync")
print(raw)
print(secret)
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mcp_server: Any) -> Iterator[dict[str, Any]]:  # noqa: F811
    var_dir = tmp_path_factory.mktemp("keyway-agents")
    env, database = server.make_environment(var_dir)
    process = None
    with scripted_model.in_thread() as (model_url, model_app):
        try:
            env.update(KEYWAY_UPSTREAM_BASE_URL=model_url, KEYWAY_UPSTREAM_MODELS="scripted",
                       KEYWAY_UPSTREAM_NAME="scripted", KEYWAY_FETCH_ALLOW_PRIVATE="1")
            server.manage(env, "bootstrap")
            key, secret = server.django_shell(env, SETUP.replace("{mcp_url}", mcp_server.url)).split()[-2:]
            process, url = server.start_keyway(env, var_dir / "server.log", uvicorn=True, workers=2)
            yield {"url": url, "key": key, "hook_secret": secret, "model": model_app}
        finally:
            if process is not None:
                server.stop(process)
            server.drop_database(database)


@pytest.fixture
def client(stack: dict[str, Any]) -> Iterator[openai.OpenAI]:
    # No kept-alive connections: consecutive calls land on either worker.
    http = httpx2.Client(limits=httpx2.Limits(max_keepalive_connections=0), timeout=60)
    yield openai.OpenAI(base_url=f"{stack['url']}/v1", api_key=stack["key"], http_client=http, max_retries=0)
    http.close()


def test_an_agent_answers_streams_its_progress_only_when_asked_and_continues_its_session(
    client: openai.OpenAI, stack: dict[str, Any]
) -> None:
    assert "agent:support" in [model.id for model in client.models.list().data]
    ask = [{"role": "user", "content": 'call shop__lookup_order {"order_id": "B12"}'}]
    completion = client.chat.completions.create(model="agent:support", messages=ask)
    assert completion.choices[0].message.content == "result: order B12: shipped"
    session_id = completion.model_extra["session_id"]

    seen: dict[bool, tuple[str, list[Any]]] = {}
    for wanted in (False, True):
        options: dict[str, Any] = {"include_usage": True, **({"include_tool_progress": True} if wanted else {})}
        text, progress = "", []
        with client.chat.completions.create(model="agent:support", messages=ask, stream=True,
                                            stream_options=options) as stream:
            for chunk in stream:
                if chunk.choices is None:
                    progress.append(chunk.model_extra)
                elif chunk.choices:
                    text += chunk.choices[0].delta.content or ""
        seen[wanted] = (text, progress)
    assert seen[False] == ("result: order B12: shipped", [])
    assert seen[True][0] == "result: order B12: shipped"
    assert [(event["type"], event["tool_name"], event["label"]) for event in seen[True][1]] == [
        ("tool.started", "lookup_order", "shop"), ("tool.completed", "lookup_order", "shop")]

    # The session goes on, whichever worker takes each call.
    for turn in range(1, 4):
        again = client.chat.completions.create(model="agent:support", messages=[{"role": "user", "content": "ok"}],
                                               extra_body={"session_id": session_id})
        assert again.choices[0].message.content == f"echo {4 + 2 * turn - 1}: ok"
    listed = httpx2.get(f"{stack['url']}/v1/sessions/{session_id}",
                        headers={"Authorization": f"Bearer {stack['key']}"}).json()
    assert listed["message_count"] == 4 + 2 * 3


def test_a_signed_webhook_is_answered_and_a_replay_refused(stack: dict[str, Any]) -> None:
    body = orjson.dumps({"text": 'call shop__add {"a": 20, "b": 22}', "from": "customer-7", "action": "chat"})
    headers = {"X-Keyway-Signature": sign(stack["hook_secret"], int(time.time()), body),
               "Content-Type": "application/json"}
    answer = httpx2.post(f"{stack['url']}/hooks/orders", content=body, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["reply"] == "result: 42"
    replay = httpx2.post(f"{stack['url']}/hooks/orders", content=body, headers=headers, timeout=60)
    assert replay.status_code == 409
