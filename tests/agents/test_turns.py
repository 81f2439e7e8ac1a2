"""Sessions and agents on /v1/chat/completions, through the official SDK and raw HTTP, against a scripted
tool-calling model on loopback, a real MCP server (FastMCP) and a real HTTP tool server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx
import openai
import orjson
import pytest
from asgiref.sync import sync_to_async

from agents.models import Agent, ChatSession, Connector, ConnectorGrant, SessionMessage, ToolRun
from apikeys.models import ApiKey
from apikeys.scopes import ALL_SCOPES, CONNECTORS
from apikeys.services import apikey_create
from billing import metering
from billing.models import UsageEvent
from completions.services import provider_upsert_openai_compatible
from platform_site.crypto import encrypt_secret
from platform_site.models import Organization
from platform_site.services import organization_create
from tests.agents import scripted_model
from tests.conftest import bearer

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
async def model() -> AsyncIterator[Any]:
    runner, port, app = await scripted_model.start()
    await sync_to_async(provider_upsert_openai_compatible)(
        name="scripted", base_url=f"http://127.0.0.1:{port}/v1", models=["scripted"]
    )
    yield app
    await runner.cleanup()


@pytest.fixture
def private_ok(settings: Any) -> None:
    settings.KEYWAY_FETCH_ALLOW_PRIVATE = True  # the tool servers are on loopback


def _project_key(org: Organization, *, connectors: list[Connector] = (), scopes: tuple[str, ...] = ALL_SCOPES
                 ) -> tuple[ApiKey, str]:
    key, raw = apikey_create(organization=org, name="agent key", actor_label="test",
                             scopes=[*scopes, CONNECTORS] if connectors else list(scopes))
    for connector in connectors:
        ConnectorGrant.objects.create(connector=connector, api_key=key)
    return key, raw


def _connector(org: Organization, *, type: str, name: str, url: str, secret: str = "", **fields: Any) -> Connector:
    return Connector.objects.create(
        organization=org, project=org.projects.first(), type=type, name=name, url=url,
        secret_encrypted=encrypt_secret(secret), **fields,
    )


def _agent(org: Organization, slug: str, connectors: list[Connector] = (), **fields: Any) -> Agent:
    agent = Agent.objects.create(organization=org, project=org.projects.first(), slug=slug, name=slug.title(),
                                 model="scripted", **fields)
    agent.connectors.set(connectors)
    return agent


def _client(raw: str) -> openai.AsyncOpenAI:
    from platform_site.asgi import application

    return openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key=raw, max_retries=0,
                              http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=application)))


def _raw_client() -> httpx.AsyncClient:
    from platform_site.asgi import application

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://127.0.0.1")


async def _ledger() -> list[UsageEvent]:
    await metering.flush()
    return await sync_to_async(lambda: list(UsageEvent.objects.order_by("id")))()


def _frames(body: bytes) -> list[tuple[str | None, Any]]:
    """(event name, data) of each SSE frame."""
    frames = []
    for block in body.decode().split("\n\n"):
        if not block.strip():
            continue
        event, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        frames.append((event, data if data == "[DONE]" else orjson.loads(data or "null")))
    return frames


async def test_a_plain_model_call_keeps_no_session_and_says_nothing_of_one(model: Any, org: Organization) -> None:
    _, raw = await sync_to_async(_project_key)(org)
    async with _raw_client() as client:
        answer = await client.post("/v1/chat/completions", headers=bearer(raw),
                                   json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200
    assert "session_id" not in answer.json() and "x-session-id" not in answer.headers
    assert await sync_to_async(ChatSession.objects.count)() == 0


async def test_an_agent_with_an_mcp_connector_answers_in_two_steps_through_the_sdk(
    model: Any, mcp_server: Any, org: Organization, private_ok: None
) -> None:
    def build() -> str:
        shop = _connector(org, type="mcp", name="shop", url=mcp_server.url)
        _agent(org, "support", [shop], instructions="You help customers.")
        return _project_key(org, connectors=[shop])[1]

    raw = await sync_to_async(build)()
    sdk = _client(raw)
    completion = await sdk.chat.completions.create(
        model="agent:support", messages=[{"role": "user", "content": 'call shop__lookup_order {"order_id": "A7"}'}],
    )
    assert completion.choices[0].message.content == "result: order A7: shipped"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "agent:support"
    session_id = completion.model_extra["session_id"]
    # Two steps, each a metered engine call in the session; the answer's usage is their sum.
    events = await _ledger()
    assert [event.session_id for event in events] == [session_id, session_id]
    assert completion.usage.prompt_tokens == sum(event.prompt_tokens for event in events)
    assert completion.usage.completion_tokens == sum(event.completion_tokens for event in events) == 6
    first, second = model[scripted_model.SEEN]
    assert first["messages"][0] == {"role": "system", "content": "You help customers."}
    assert "shop__lookup_order" in [tool["function"]["name"] for tool in first["tools"]]
    assert second["messages"][-1]["role"] == "tool"
    (run,) = await sync_to_async(list)(ToolRun.objects.all())
    assert (run.tool_name, run.outcome, run.session_id, run.iteration) == ("shop__lookup_order", "ok", session_id, 1)
    assert run.call_id == events[0].call_id  # recorded with the usage of the step that asked for it
    # The conversation continues by session_id: the model reads the earlier turn.
    again = await sdk.chat.completions.create(model="agent:support", messages=[{"role": "user", "content": "thanks"}],
                                              extra_body={"session_id": session_id})
    assert again.model_extra["session_id"] == session_id
    # system + (user, assistant tool call, tool result, assistant answer) + the new user message
    assert again.choices[0].message.content == "echo 5: thanks"
    await sdk.close()


async def test_tool_progress_comes_only_when_asked_and_the_chunks_are_the_same_either_way(
    model: Any, tool_server: Any, org: Organization, private_ok: None
) -> None:
    def build() -> str:
        echo = _connector(org, type="http", name="echo", url=tool_server.url("/ok"), secret=tool_server.secret,
                          parameters_json='{"type": "object", "properties": {"q": {"type": "string"}}}')
        _agent(org, "helper", [echo])
        return _project_key(org, connectors=[echo])[1]

    raw = await sync_to_async(build)()
    request = {"model": "agent:helper", "stream": True,
               "messages": [{"role": "user", "content": 'call echo {"q": "hello"}'}]}
    async with _raw_client() as client:
        plain = await client.post("/v1/chat/completions", headers=bearer(raw), json=request)
        asked = await client.post("/v1/chat/completions", headers=bearer(raw), json={
            **request, "stream_options": {"include_tool_progress": True}})
        by_header = await client.post("/v1/chat/completions", headers={**bearer(raw), "X-Hermes-Tool-Progress": "1"},
                                      json=request)
    assert plain.status_code == asked.status_code == by_header.status_code == 200
    plain_frames, asked_frames = _frames(plain.content), _frames(asked.content)
    assert b"event:" not in plain.content
    assert all(event is None for event, _ in plain_frames)
    progress = [data for event, data in asked_frames if event == "tool.progress"]
    assert [event["type"] for event in progress] == ["tool.started", "tool.completed"]
    assert progress[0] == {"type": "tool.started", "tool_name": "echo", "label": "echo", "iteration": 1}
    assert progress[1]["success"] is True and isinstance(progress[1]["duration_ms"], int)
    assert [data for event, data in _frames(by_header.content) if event == "tool.progress"][0]["type"] == "tool.started"

    def comparable(frames: list[tuple[str | None, Any]]) -> list[Any]:
        return [data if data == "[DONE]" else {**data, "id": "", "created": 0, "session_id": ""}
                for event, data in frames if event is None]

    assert comparable(asked_frames) == comparable(plain_frames)
    chunks = [data for _, data in plain_frames if data != "[DONE]"]
    session_ids = {chunk["session_id"] for chunk in chunks}
    assert len(session_ids) == 1 and session_ids == {plain.headers["x-session-id"]}
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert text.startswith("result: ") and '"hello"' in text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any("tool_calls" in chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"])
    # /status counts the organization's active sessions and its agents' recent tool runs, and no one else's.
    _, outsider = await sync_to_async(_project_key)(await sync_to_async(organization_create)(
        name="Initech", slug="initech", actor_label="test"))
    async with _raw_client() as client:
        status = (await client.get("/status", headers=bearer(raw))).json()
        other = (await client.get("/status", headers=bearer(outsider))).json()
    assert status["active_sessions"] == 3 and status["agent_tool_runs_last_hour"] == {"total": 3, "ok": 3}
    assert other["active_sessions"] == 0 and other["agent_tool_runs_last_hour"] == {"total": 0}


async def test_the_official_sdk_streams_an_agents_answer_with_its_progress_beside_the_chunks(
    model: Any, mcp_server: Any, org: Organization, private_ok: None
) -> None:
    def build() -> str:
        shop = _connector(org, type="mcp", name="shop", url=mcp_server.url)
        _agent(org, "support", [shop])
        return _project_key(org, connectors=[shop])[1]

    raw = await sync_to_async(build)()
    sdk = _client(raw)
    messages = [{"role": "user", "content": 'call shop__add {"a": 2, "b": 3}'}]
    texts, progress = [], []
    for options in ({"include_usage": True}, {"include_usage": True, "include_tool_progress": True}):
        stream = await sdk.chat.completions.create(model="agent:support", messages=messages, stream=True,
                                                   stream_options=options)
        text, usage = "", None
        async for chunk in stream:
            if not chunk.choices:
                # The usage chunk (choices == []), or a progress event (choices is None, `type` says which).
                usage = chunk.usage or usage
                if chunk.choices is None:
                    progress.append(chunk.model_extra)
                continue
            assert chunk.model_extra["session_id"]
            text += chunk.choices[0].delta.content or ""
        texts.append(text)
        assert usage is not None and usage.completion_tokens == 6  # two steps of 3
    assert texts == ["result: 5", "result: 5"]
    assert [event["type"] for event in progress] == ["tool.started", "tool.completed"]
    assert progress[0]["tool_name"] == "add" and progress[0]["label"] == "shop"
    await sdk.close()


async def test_a_failing_tool_and_a_slow_one_are_reported_to_the_model_and_audited(
    model: Any, tool_server: Any, org: Organization, private_ok: None
) -> None:
    def build() -> str:
        broken = _connector(org, type="http", name="broken", url=tool_server.url("/fail"), secret="s")
        slow = _connector(org, type="http", name="slow", url=tool_server.url("/slow"), secret="s", timeout_ms=300)
        _agent(org, "fragile", [broken, slow])
        return _project_key(org, connectors=[broken, slow])[1]

    raw = await sync_to_async(build)()
    sdk = _client(raw)
    failed = await sdk.chat.completions.create(model="agent:fragile",
                                               messages=[{"role": "user", "content": "call broken {}"}])
    assert failed.choices[0].message.content.startswith("result: ")
    timed_out = await sdk.chat.completions.create(model="agent:fragile",
                                                  messages=[{"role": "user", "content": "call slow {}"}])
    assert timed_out.choices[0].message.content.startswith("result: ")
    runs = await sync_to_async(lambda: list(ToolRun.objects.order_by("id").values_list("tool_name", "outcome",
                                                                                        "duration_ms")))()
    assert [(name, outcome) for name, outcome, _ in runs] == [("broken", "error"), ("slow", "timeout")]
    assert 250 <= runs[1][2] < 3000
    await sdk.close()


async def test_max_iterations_ends_the_turn_with_length_after_that_many_steps(
    model: Any, tool_server: Any, org: Organization, private_ok: None
) -> None:
    def build() -> str:
        echo = _connector(org, type="http", name="echo", url=tool_server.url("/ok"), secret=tool_server.secret)
        _agent(org, "looper", [echo], max_iterations=25)
        return _project_key(org, connectors=[echo])[1]

    raw = await sync_to_async(build)()
    sdk = _client(raw)
    completion = await sdk.chat.completions.create(
        model="agent:looper", messages=[{"role": "user", "content": "always echo {}"}],
        extra_body={"max_iterations": 3})
    assert completion.choices[0].finish_reason == "length"
    assert len(model[scripted_model.SEEN]) == 3  # three model steps, two rounds of tools between them
    assert await sync_to_async(ToolRun.objects.count)() == 2
    assert len(await _ledger()) == 3
    for bad, code in ((0, "invalid_value"), (51, "invalid_value"), ("3", "invalid_type"), (True, "invalid_type")):
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.chat.completions.create(model="agent:looper", messages=[{"role": "user", "content": "x"}],
                                              extra_body={"max_iterations": bad})
        assert refused.value.body["param"] == "max_iterations" and refused.value.body["code"] == code
    await sdk.close()


async def test_a_key_not_given_the_agents_connector_is_refused_before_any_model_call(
    model: Any, tool_server: Any, org: Organization, private_ok: None
) -> None:
    def build() -> tuple[str, str]:
        echo = _connector(org, type="http", name="echo", url=tool_server.url("/ok"), secret="s")
        other = _connector(org, type="http", name="other", url=tool_server.url("/ok"), secret="s")
        _agent(org, "guarded", [echo])
        return _project_key(org, connectors=[other])[1], _project_key(org)[1]

    given_other, no_scope = await sync_to_async(build)()
    for raw in (given_other, no_scope):
        sdk = _client(raw)
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await sdk.chat.completions.create(model="agent:guarded", messages=[{"role": "user", "content": "hi"}])
        assert refused.value.body["code"] == "connector_not_allowed" and refused.value.body["param"] == "model"
        await sdk.close()
    assert model[scripted_model.SEEN] == [] and tool_server.requests == []
    assert await _ledger() == []


async def test_another_tenants_session_and_agent_are_not_found(
    model: Any, org: Organization, other_org: Organization
) -> None:
    def build() -> tuple[str, str]:
        _agent(org, "mine")
        return _project_key(org)[1], _project_key(other_org)[1]

    mine, theirs = await sync_to_async(build)()
    sdk, intruder = _client(mine), _client(theirs)
    completion = await sdk.chat.completions.create(model="agent:mine", messages=[{"role": "user", "content": "hi"}])
    session_id = completion.model_extra["session_id"]
    with pytest.raises(openai.NotFoundError) as refused:
        await intruder.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}],
                                               extra_body={"session_id": session_id})
    assert refused.value.body["code"] == "session_not_found" and refused.value.body["param"] == "session_id"
    with pytest.raises(openai.NotFoundError) as unknown_agent:
        await intruder.chat.completions.create(model="agent:mine", messages=[{"role": "user", "content": "hi"}])
    assert unknown_agent.value.body["param"] == "model"
    async with _raw_client() as client:
        assert (await client.get(f"/v1/sessions/{session_id}", headers=bearer(theirs))).status_code == 404
        assert (await client.delete(f"/v1/sessions/{session_id}", headers=bearer(theirs))).status_code == 404
        listed = (await client.get("/v1/sessions", headers=bearer(theirs))).json()
        assert listed["data"] == []
        mine_listed = (await client.get("/v1/sessions", headers=bearer(mine))).json()
        assert [item["id"] for item in mine_listed["data"]] == [session_id]
        detail = (await client.get(f"/v1/sessions/{session_id}", headers=bearer(mine))).json()
        assert [message["role"] for message in detail["messages"]] == ["user", "assistant"]
        deleted = (await client.delete(f"/v1/sessions/{session_id}", headers=bearer(mine))).json()
        assert deleted == {"id": session_id, "object": "chat.session.deleted", "deleted": True}
    assert await sync_to_async(SessionMessage.objects.count)() == 0
    await sdk.close()
    await intruder.close()


async def test_a_plain_model_continues_a_session_it_names(model: Any, org: Organization) -> None:
    _, raw = await sync_to_async(_project_key)(org)
    async with _raw_client() as client:
        created = (await client.post("/v1/sessions", headers=bearer(raw), json={})).json()
        assert created["object"] == "chat.session" and created["message_count"] == 0
        for text, expected in (("one", "echo 1: one"), ("two", "echo 3: two")):
            answer = await client.post("/v1/chat/completions", headers=bearer(raw), json={
                "model": "scripted", "session_id": created["id"], "messages": [{"role": "user", "content": text}]})
            assert answer.json()["choices"][0]["message"]["content"] == expected
            assert answer.headers["x-session-id"] == created["id"]
        refused = await client.post("/v1/chat/completions", headers=bearer(raw), json={
            "model": "scripted", "max_iterations": 2, "messages": [{"role": "user", "content": "x"}]})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_iterations"


async def test_agents_are_listed_as_models_for_their_projects_keys(model: Any, org: Organization,
                                                                   other_org: Organization) -> None:
    def build() -> tuple[str, str]:
        _agent(org, "listed")
        return _project_key(org)[1], _project_key(other_org)[1]

    mine, theirs = await sync_to_async(build)()
    sdk, other = _client(mine), _client(theirs)
    assert "agent:listed" in [entry.id for entry in (await sdk.models.list()).data]
    assert (await sdk.models.retrieve("agent:listed")).id == "agent:listed"
    assert "agent:listed" not in [entry.id for entry in (await other.models.list()).data]
    with pytest.raises(openai.NotFoundError):
        await other.models.retrieve("agent:listed")
    await sdk.close()
    await other.close()
