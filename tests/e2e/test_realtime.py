"""End to end: the realtime WebSocket on real server processes (daphne as `make run` serves it, and uvicorn),
driven by the official openai SDK's realtime client and by a plain WebSocket client speaking the browser's
subprotocols, against the embedded Gemma model and a real HTTP upstream on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import websockets

from tests.e2e import server

pytestmark = pytest.mark.e2e

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
USER_TURN = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    var_dir = tmp_path_factory.mktemp("keyway-realtime")
    log = var_dir / "servers.log"
    env, database = server.make_environment(var_dir)
    # Sessions re-check their key every second: without Redis that is how a revocation made by another
    # process reaches them.
    env["KEYWAY_REALTIME_KEY_RECHECK"] = "1"
    processes = []
    try:
        upstream, upstream_url = server.start_fake_upstream(log)
        processes.append(upstream)
        env.update(KEYWAY_UPSTREAM_BASE_URL=f"{upstream_url}/v1", KEYWAY_UPSTREAM_NAME="fake",
                   KEYWAY_UPSTREAM_MODELS="drip")
        bootstrap = server.manage(env, "bootstrap")
        # An audio model, relayed to the fake upstream's realtime WebSocket.
        server.django_shell(env, (
            "from completions.services import provider_upsert_openai_compatible as upsert; "
            f"upsert(name='voice-upstream', base_url='{upstream_url}/v1', api_key='sk-upstream', "
            "models=['voice'], capabilities=['realtime'], context_length=32000)"
        ))
        daphne, daphne_url = server.start_keyway(env, log)
        processes.append(daphne)
        uvicorn, uvicorn_url = server.start_keyway(env, log, uvicorn=True)
        processes.append(uvicorn)
        match = re.search(r"sk-kw-[a-z0-9]+-[A-Za-z0-9]+", bootstrap)
        assert match, bootstrap
        yield {"env": env, "daphne": daphne_url, "uvicorn": uvicorn_url, "key": match.group(0), "log": log,
               "staff": server.staff_cookies(env)}
    finally:
        for process in processes:
            server.stop(process)
        server.drop_database(database)


def _client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


async def _until(connection: Any, kind: str, *, timeout: float = 60) -> tuple[list[Any], Any]:
    seen = []
    async with asyncio.timeout(timeout):
        async for event in connection:
            seen.append(event)
            if event.type == kind:
                return seen, event
    raise AssertionError(f"the socket closed before {kind}: {[event.type for event in seen]}")


@pytest.mark.parametrize("served_by", ["daphne", "uvicorn"])
async def test_the_sdk_holds_a_text_conversation_with_the_embedded_model(
    stack: dict[str, Any], served_by: str
) -> None:
    client = _client(stack[served_by], stack["key"])
    async with client.realtime.connect(model="gemma-3-270m") as connection:
        _, created = await _until(connection, "session.created")
        assert created.session.model == "gemma-3-270m"
        await connection.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                                  "instructions": "Answer in a few words."})
        _, updated = await _until(connection, "session.updated")
        assert updated.session.instructions == "Answer in a few words."
        for _turn in range(2):
            await connection.conversation.item.create(item=USER_TURN)
            await connection.response.create(response={"max_output_tokens": 8})
            events, done = await _until(connection, "response.done")
            deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
            assert done.response.status in ("completed", "incomplete"), done.response.status_details
            assert deltas and done.response.output[0].content[0].text == "".join(deltas)
            assert done.response.usage.output_tokens <= 8 and done.response.usage.input_tokens > 0
    await client.close()


async def test_the_sdk_authenticates_with_the_browser_subprotocol_instead_of_the_header(
    stack: dict[str, Any]
) -> None:
    # The SDK always sends its api_key as a header; here that header is removed, and the key rides in the
    # subprotocols as a browser sends it.
    client = openai.AsyncOpenAI(base_url=f"{stack['daphne']}/v1", api_key="unused", max_retries=0)
    async with client.realtime.connect(
        model="gemma-3-270m", extra_headers={"Authorization": openai.omit},
        websocket_connection_options={"subprotocols": ["realtime", f"openai-insecure-api-key.{stack['key']}"]},
    ) as connection:
        _, created = await _until(connection, "session.created")
        await connection.conversation.item.create(item=USER_TURN)
        await connection.response.create(response={"max_output_tokens": 4})
        _, done = await _until(connection, "response.done")
        assert done.response.status in ("completed", "incomplete")
    await client.close()


async def test_the_sdks_beta_client_gets_beta_events(stack: dict[str, Any]) -> None:
    # The beta client always dials wss:// unless told the WebSocket base URL.
    client = openai.AsyncOpenAI(base_url=f"{stack['uvicorn']}/v1", api_key=stack["key"], max_retries=0,
                                websocket_base_url=stack["uvicorn"].replace("http://", "ws://") + "/v1")
    async with client.beta.realtime.connect(model="gemma-3-270m") as connection:
        _, created = await _until(connection, "session.created")
        assert created.session.modalities == ["text"]
        await connection.session.update(session={"modalities": ["text", "audio"], "instructions": "Be brief."})
        await _until(connection, "session.updated")
        await connection.conversation.item.create(item={"type": "message", "role": "user",
                                                        "content": [{"type": "input_text", "text": "Hi"}]})
        _, item = await _until(connection, "conversation.item.created")
        await connection.response.create(response={"max_response_output_tokens": 4})
        events, done = await _until(connection, "response.done")
        assert any(event.type == "response.text.delta" for event in events)
        assert done.response.output[0].content[0].type == "text"
    await client.close()


async def test_the_sdk_cancels_a_turn_and_it_ends_cancelled(stack: dict[str, Any]) -> None:
    client = _client(stack["daphne"], stack["key"])
    async with client.realtime.connect(model="drip") as connection:
        await _until(connection, "session.created")
        await connection.conversation.item.create(item=USER_TURN)
        await connection.response.create()
        _, first = await _until(connection, "response.output_text.delta")
        await connection.response.cancel(response_id=first.response_id)
        events, done = await _until(connection, "response.done")
        assert done.response.status == "cancelled"
        # The drip sends 20 chunks 0.1 s apart: it was stopped well before the end.
        assert sum(1 for event in events if event.type == "response.output_text.delta") < 15
    await client.close()


async def test_the_sdk_gets_a_function_call_and_answers_it(stack: dict[str, Any]) -> None:
    client = _client(stack["daphne"], stack["key"])
    async with client.realtime.connect(model="gemma-3-270m") as connection:
        await _until(connection, "session.created")
        await connection.session.update(session={"type": "realtime", "tools": [WEATHER_TOOL],
                                                  "tool_choice": {"type": "function", "name": "get_weather"}})
        await _until(connection, "session.updated")
        await connection.conversation.item.create(item={
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]})
        await connection.response.create(response={"max_output_tokens": 48})
        events, done = await _until(connection, "response.done")
        call = done.response.output[-1]
        assert call.type == "function_call" and call.name == "get_weather"
        assert isinstance(json.loads(call.arguments), dict)
        assert any(event.type == "response.function_call_arguments.done" for event in events)
        await connection.conversation.item.create(item={"type": "function_call_output", "call_id": call.call_id,
                                                        "output": '{"celsius": 21}'})
        await connection.response.create(response={"tool_choice": "none", "max_output_tokens": 8})
        _, answered = await _until(connection, "response.done")
        assert answered.response.status in ("completed", "incomplete")
        assert answered.response.output[0].type == "message"
    await client.close()


@pytest.mark.parametrize("served_by", ["daphne", "uvicorn"])
async def test_the_sdk_speaks_to_a_relayed_audio_model(stack: dict[str, Any], served_by: str) -> None:
    client = _client(stack[served_by], stack["key"])
    async with client.realtime.connect(model="voice") as connection:
        _, created = await _until(connection, "session.created")
        assert created.session.model == "voice" and created.session.id.startswith("sess_")
        await connection.input_audio_buffer.append(audio=base64.b64encode(bytes(9600)).decode())
        await connection.input_audio_buffer.commit()
        await connection.response.create()
        events, done = await _until(connection, "response.done")
        audio = [event for event in events if event.type == "response.output_audio.delta"]
        assert len(audio) == 10 and all(base64.b64decode(event.delta) for event in audio)
        assert done.response.usage.output_tokens == 50
        limits = next(event for event in events if event.type == "rate_limits.updated")
        assert limits.rate_limits[0].limit != 99999  # Keyway's limits, not the upstream's
    await client.close()


@pytest.mark.parametrize("served_by", ["daphne", "uvicorn"])
async def test_a_plain_websocket_client_authenticates_with_the_browser_subprotocols(
    stack: dict[str, Any], served_by: str
) -> None:
    url = stack[served_by].replace("http://", "ws://") + "/v1/realtime?model=gemma-3-270m"
    protocols = ["realtime", f"openai-insecure-api-key.{stack['key']}"]
    async with websockets.connect(url, subprotocols=protocols) as socket:  # type: ignore[arg-type]
        assert socket.subprotocol == "realtime"
        created = json.loads(await socket.recv())
        assert created["type"] == "session.created"
        await socket.send(json.dumps({"type": "conversation.item.create", "item": USER_TURN}))
        await socket.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 4}}))
        while (event := json.loads(await asyncio.wait_for(socket.recv(), 60)))["type"] != "response.done":
            assert event["type"] != "error", event
        assert event["response"]["usage"]["output_tokens"] <= 4


async def test_a_websocket_to_another_path_is_refused_not_a_500(stack: dict[str, Any]) -> None:
    for served_by in ("daphne", "uvicorn"):
        url = stack[served_by].replace("http://", "ws://") + "/v1/chat/completions"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url):
                pass
        assert refused.value.response.status_code == 403


def _open_sockets(url: str, cookies: dict[str, str]) -> int:
    status = httpx2.get(f"{url}/status", cookies=cookies, timeout=10).json()
    return int(status["open_websockets"])


async def test_revoking_a_key_closes_its_sessions_on_every_worker(stack: dict[str, Any]) -> None:
    key = server.manage(stack["env"], "createapikey", "demo", "--name", "realtime-revoked").strip()
    sockets = []
    for served_by in ("daphne", "uvicorn"):
        url = stack[served_by].replace("http://", "ws://") + "/v1/realtime?model=drip"
        socket = await websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"})
        assert json.loads(await socket.recv())["type"] == "session.created"
        sockets.append(socket)
    if server.os.environ.get("REDIS_URL"):
        # Counted across both workers.
        assert _open_sockets(stack["daphne"], stack["staff"]) >= 2
    # Revoked by a third process, the CLI: the channel layer (Redis) or the sessions' own re-check reaches
    # both servers.
    await asyncio.to_thread(server.manage, stack["env"], "revokeapikey", key)
    revoked_at = time.monotonic()
    bound = 2.0 if server.os.environ.get("REDIS_URL") else 3.0
    for socket in sockets:
        error = json.loads(await asyncio.wait_for(socket.recv(), 10))
        assert error["type"] == "error" and error["error"]["code"] == "invalid_api_key"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    assert time.monotonic() - revoked_at < bound


@pytest.mark.skipif(not server.os.environ.get("REDIS_URL"), reason="needs REDIS_URL: workers share the count there")
async def test_status_counts_open_sockets_across_workers(stack: dict[str, Any]) -> None:
    before = _open_sockets(stack["uvicorn"], stack["staff"])
    sockets = []
    for served_by in ("daphne", "daphne", "uvicorn"):
        url = stack[served_by].replace("http://", "ws://") + "/v1/realtime?model=drip"
        socket = await websockets.connect(url, additional_headers={"Authorization": f"Bearer {stack['key']}"})
        await socket.recv()
        sockets.append(socket)
    assert _open_sockets(stack["uvicorn"], stack["staff"]) == before + 3
    assert _open_sockets(stack["daphne"], stack["staff"]) == before + 3
    # A tenant's key learns nothing of the deployment's sockets.
    keyed = httpx2.get(f"{stack['daphne']}/status", headers={"Authorization": f"Bearer {stack['key']}"}).json()
    assert "open_websockets" not in keyed and "loaded_models" not in keyed
    for socket in sockets:
        await socket.close()
    deadline = time.monotonic() + 5
    while _open_sockets(stack["daphne"], stack["staff"]) != before:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


def test_the_log_holds_no_key(stack: dict[str, Any]) -> None:
    assert stack["key"] not in Path(stack["log"]).read_text(errors="replace")
