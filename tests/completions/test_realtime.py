"""The realtime WebSocket, event by event, through Channels' WebsocketCommunicator against the real ASGI
application (platform_site.asgi) and a real HTTP upstream on loopback (bench/fake_upstream.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import override_settings

from apikeys.models import ApiKey
from apikeys.services import apikey_create, apikey_revoke
from bench import fake_upstream
from billing import metering
from billing.models import UsageEvent
from completions.services import provider_upsert_openai_compatible
from platform_site.models import Organization

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
async def fake(upstream: tuple[int, Any]) -> Any:
    port, app = upstream
    await sync_to_async(provider_upsert_openai_compatible)(
        name="fake", base_url=f"http://127.0.0.1:{port}/v1",
        models=["ok", "drip", "tools-split", "http400", "stream-break"],
    )
    return app


class Client:
    """A communicator that speaks JSON and waits for events by type."""

    def __init__(self, communicator: WebsocketCommunicator) -> None:
        self.ws = communicator
        self.seen: list[dict[str, Any]] = []

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send_to(text_data=orjson.dumps(event).decode())

    async def next(self, timeout: float = 10) -> dict[str, Any]:
        message = await self.ws.receive_output(timeout)
        if message["type"] == "websocket.close":
            raise ConnectionError(f"closed with {message.get('code')}")
        event: dict[str, Any] = orjson.loads(message["text"])
        self.seen.append(event)
        return event

    async def until(self, kind: str, timeout: float = 10) -> dict[str, Any]:
        while True:
            event = await self.next(timeout)
            if event["type"] == kind:
                return event

    async def collect_until(self, kind: str) -> list[dict[str, Any]]:
        events = []
        while True:
            event = await self.next()
            events.append(event)
            if event["type"] == kind:
                return events

    async def closed(self) -> int:
        while True:
            message = await self.ws.receive_output(10)
            if message["type"] == "websocket.close":
                return int(message.get("code", 1000))


async def _say(client: Client, text: str, **fields: Any) -> dict[str, Any]:
    await client.send({"type": "conversation.item.create", **fields, "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    return (await client.until("conversation.item.done"))["item"]


async def _session_with_new_key(org: Organization, model: str, **key_settings: Any) -> Client:
    """A session opened with a key of its own (limits set on it), past session.created."""
    _, raw = await sync_to_async(apikey_create)(organization=org, name="own", actor_label="test", **key_settings)
    ws = communicator(f"/v1/realtime?model={model}", key=raw)
    await ws.connect()
    client = Client(ws)
    await client.until("session.created")
    return client


def communicator(path: str, *, key: str | None = None, subprotocols: list[str] | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None) -> WebsocketCommunicator:
    from platform_site.asgi import application

    all_headers = list(headers or [])
    if key is not None:
        all_headers.append((b"authorization", f"Bearer {key}".encode()))
    return WebsocketCommunicator(application, path, headers=all_headers, subprotocols=subprotocols)


@pytest.fixture
async def connect(api_key: tuple[ApiKey, str]) -> AsyncIterator[Any]:
    opened: list[WebsocketCommunicator] = []

    async def open_session(model: str = "ok", *, key: str | None = None, **options: Any) -> Client:
        ws = communicator(f"/v1/realtime?model={model}", key=key or api_key[1], **options)
        connected, _ = await ws.connect()
        assert connected
        opened.append(ws)
        return Client(ws)

    yield open_session
    for ws in opened:
        await ws.disconnect()


async def _ledger() -> list[UsageEvent]:
    await metering.flush()
    return await sync_to_async(lambda: list(UsageEvent.objects.order_by("id")))()


async def test_a_text_turn_streams_ga_events_in_order_and_is_metered_with_the_session_id(
    fake: Any, connect: Any
) -> None:
    client = await connect()
    created = await client.next()
    assert created["type"] == "session.created"
    session = created["session"]
    assert session["type"] == "realtime" and session["model"] == "ok" and session["output_modalities"] == ["text"]
    assert session["id"].startswith("sess_")

    await client.send({"type": "conversation.item.create", "event_id": "c1", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hi"}]}})
    added = await client.next()
    assert added["type"] == "conversation.item.added" and added["item"]["role"] == "user"
    assert (await client.next())["type"] == "conversation.item.done"

    await client.send({"type": "response.create"})
    events = await client.collect_until("response.done")
    kinds = [event["type"] for event in events]
    assert kinds[:6] == ["response.created", "rate_limits.updated", "response.output_item.added",
                         "conversation.item.added", "response.content_part.added", "response.output_text.delta"]
    assert kinds[-5:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "conversation.item.done", "response.done"]
    text = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["object"] == "realtime.response"
    assert done["output"][0]["content"] == [{"type": "output_text", "text": text}]
    assert done["usage"]["input_tokens"] > 0 and done["usage"]["output_tokens"] > 0
    assert len({event["event_id"] for event in client.seen}) == len(client.seen)

    ledger = await _ledger()
    assert len(ledger) == 1
    assert ledger[0].endpoint == UsageEvent.Endpoint.REALTIME and ledger[0].session_id == session["id"]
    assert ledger[0].prompt_tokens == done["usage"]["input_tokens"]
    assert ledger[0].completion_tokens == done["usage"]["output_tokens"]


async def test_a_bad_event_gets_an_error_that_echoes_its_event_id_and_the_socket_stays_open(
    fake: Any, connect: Any
) -> None:
    client = await connect()
    await client.until("session.created")
    bad = [
        ({"type": "nope", "event_id": "e1"}, "type", "invalid_value"),
        ({"event_id": "e2"}, "type", "missing_required_parameter"),
        ({"type": "session.update", "event_id": "e3", "session": {"instructions": 5}}, "session.instructions",
         "invalid_type"),
        ({"type": "session.update", "event_id": "e4", "session": {"tools": [{"type": "function", "name": "a b"}]}},
         "session.tools[0].name", "invalid_value"),
        ({"type": "session.update", "event_id": "e5", "session": {"bogus": 1}}, "session.bogus",
         "unknown_parameter"),
        ({"type": "session.update", "event_id": "e6", "session": {"output_modalities": ["audio"]}},
         "session.output_modalities", "audio_not_supported"),
        ({"type": "conversation.item.create", "event_id": "e7", "item": {"type": "message", "role": "user",
                                                                         "content": []}}, "item.content",
         "invalid_value"),
        ({"type": "conversation.item.retrieve", "event_id": "e8", "item_id": "missing"}, "item_id",
         "item_not_found"),
        ({"type": "response.cancel", "event_id": "e9"}, None, "response_cancel_not_active"),
        ({"type": "input_audio_buffer.append", "event_id": "e10", "audio": "AAAA"}, "type", "audio_not_supported"),
        ({"type": "response.create", "event_id": "e11", "response": {"max_output_tokens": 0}},
         "response.max_output_tokens", "invalid_value"),
        ({"type": "session.update", "event_id": "x" * 513}, "event_id", "string_above_max_length"),
    ]
    for event, param, code in bad:
        await client.send(event)
        error = await client.next()
        assert error["type"] == "error", event
        assert error["error"]["param"] == param and error["error"]["code"] == code, (event, error)
        if len(event.get("event_id", "")) <= 512:
            assert error["error"]["event_id"] == event.get("event_id")
    await client.ws.send_to(text_data="{not json")
    assert (await client.next())["error"]["code"] == "invalid_json"
    deep = '{"type": "conversation.item.create", "item": ' + "[" * 300 + "]" * 300 + "}"
    await client.ws.send_to(text_data=deep)
    assert (await client.next())["error"]["code"] == "invalid_json"
    await client.ws.send_to(bytes_data=b"\x00\x01")
    assert (await client.next())["error"]["code"] == "invalid_event"
    # Still usable after all that.
    await client.send({"type": "session.update", "session": {"instructions": "Be brief."}})
    assert (await client.next())["session"]["instructions"] == "Be brief."
    # A session.update with one bad field changes nothing.
    await client.send({"type": "session.update", "session": {"instructions": "Other", "tool_choice": "maybe"}})
    assert (await client.next())["type"] == "error"
    await client.send({"type": "session.update", "session": {}})
    assert (await client.next())["session"]["instructions"] == "Be brief."


async def test_wrong_key_missing_scope_and_forbidden_model_are_refused_with_an_error_then_closed(
    fake: Any, org: Organization, api_key: tuple[ApiKey, str]
) -> None:
    chat_only, chat_only_raw = await sync_to_async(apikey_create)(
        organization=org, name="chat only", actor_label="test", scopes=["chat"])
    ok_only, ok_only_raw = await sync_to_async(apikey_create)(
        organization=org, name="ok only", actor_label="test", allowed_models=["ok"])
    # Closed with 4000 + the error's HTTP status (servers may not send RFC 6455's 1008).
    cases = [
        ("/v1/realtime?model=ok", "sk-kw-aaaaaaaaaaaa-" + "b" * 44, "invalid_api_key", 4401),
        ("/v1/realtime?model=ok", None, "invalid_api_key", 4401),
        ("/v1/realtime?model=ok", chat_only_raw, "missing_scope", 4403),
        ("/v1/realtime?model=drip", ok_only_raw, "model_not_allowed", 4403),
        ("/v1/realtime?model=nope", api_key[1], "model_not_found", 4404),
        ("/v1/realtime", api_key[1], "missing_required_parameter", 4400),
        ("/v1/realtime?model=ok&call_id=rtc_1", api_key[1], "unsupported_parameter", 4400),
    ]
    for path, key, code, close_code in cases:
        ws = communicator(path, key=key)
        connected, _ = await ws.connect()
        assert connected
        client = Client(ws)
        error = await client.next()
        assert error["type"] == "error" and error["error"]["code"] == code, (path, error)
        assert await client.closed() == close_code
        await ws.disconnect()


async def test_a_websocket_to_any_other_path_is_refused_at_the_handshake(db: None) -> None:
    for path in ("/", "/v1/chat/completions", "/v1/realtimeX", "/ws"):
        ws = communicator(path)
        connected, code = await ws.connect()
        assert not connected, path
        await ws.disconnect()


async def test_the_browser_subprotocols_authenticate_and_only_realtime_is_selected(
    fake: Any, api_key: tuple[ApiKey, str]
) -> None:
    ws = communicator("/v1/realtime?model=ok",
                      subprotocols=["realtime", f"openai-insecure-api-key.{api_key[1]}"])
    connected, subprotocol = await ws.connect()
    assert connected and subprotocol == "realtime"
    client = Client(ws)
    assert (await client.next())["type"] == "session.created"
    await ws.disconnect()


async def test_the_beta_dialect_is_chosen_by_header_or_subprotocol(fake: Any, api_key: tuple[ApiKey, str]) -> None:
    for options in ({"headers": [(b"openai-beta", b"realtime=v1")]},
                    {"subprotocols": ["realtime", "openai-beta.realtime-v1"]}):
        ws = communicator("/v1/realtime?model=ok", key=api_key[1], **options)
        connected, _ = await ws.connect()
        assert connected
        client = Client(ws)
        session = (await client.next())["session"]
        assert session["modalities"] == ["text"] and session["max_response_output_tokens"] == "inf"
        assert "output_modalities" not in session
        await client.send({"type": "session.update", "session": {"modalities": ["text", "audio"],
                                                                 "temperature": 0.7}})
        updated = (await client.next())["session"]
        assert updated["modalities"] == ["text"] and updated["temperature"] == 0.7
        await client.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
        assert (await client.next())["type"] == "conversation.item.created"
        await client.send({"type": "response.create"})
        events = await client.collect_until("response.done")
        kinds = {event["type"] for event in events}
        assert "response.text.delta" in kinds and "response.output_text.delta" not in kinds
        assert events[-1]["response"]["output"][0]["content"][0]["type"] == "text"
        await ws.disconnect()


async def test_response_cancel_stops_generation_and_the_response_ends_cancelled(fake: Any, connect: Any) -> None:
    client = await connect("drip")
    await client.until("session.created")
    await _say(client, "count")
    await client.send({"type": "response.create", "event_id": "r1"})
    created = await client.until("response.created")
    await client.until("response.output_text.delta")
    await client.send({"type": "response.cancel", "response_id": created["response"]["id"]})
    events = await client.collect_until("response.done")
    done = events[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
    assert done["output"][0]["status"] == "incomplete"
    produced = sum(1 for event in client.seen if event["type"] == "response.output_text.delta")
    assert produced < 20  # the drip sends 20 chunks, 0.1 s apart
    ledger = await _ledger()
    assert [event.status for event in ledger] == [UsageEvent.Status.CLIENT_DISCONNECTED]
    # The session goes on: the next turn works.
    await client.send({"type": "response.create"})
    assert (await client.until("response.created"))["type"] == "response.created"


async def test_function_calls_become_items_and_their_outputs_feed_the_next_response(
    fake: Any, connect: Any
) -> None:
    client = await connect("tools-split")
    await client.until("session.created")
    await client.send({"type": "session.update", "session": {"tools": [
        {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}},
        {"type": "function", "name": "get_time"}]}})
    await client.until("session.updated")
    await _say(client, "Weather in Paris?")
    await client.send({"type": "response.create"})
    events = await client.collect_until("response.done")
    done = events[-1]["response"]
    calls = [item for item in done["output"] if item["type"] == "function_call"]
    assert [call["name"] for call in calls] == ["get_weather", "get_time"]
    assert orjson.loads(calls[0]["arguments"]) == {"city": "Paris"}
    argument_events = [event for event in events if event["type"] == "response.function_call_arguments.done"]
    assert [event["call_id"] for event in argument_events] == [call["call_id"] for call in calls]

    await client.send({"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": calls[0]["call_id"], "output": '{"temp": 21}'}})
    await client.until("conversation.item.done")
    seen_before = len(fake[fake_upstream.SEEN])
    await client.send({"type": "response.create"})
    await client.until("response.done")
    sent = fake[fake_upstream.SEEN][seen_before:]
    messages = sent[-1]["messages"]
    assert messages[1]["role"] == "assistant" and len(messages[1]["tool_calls"]) == 2
    assert messages[2] == {"role": "tool", "tool_call_id": calls[0]["call_id"], "content": '{"temp": 21}'}


async def test_a_rate_limited_response_gets_an_error_and_rate_limits_updated(
    fake: Any, org: Organization, fresh_rate_window: None
) -> None:
    client = await _session_with_new_key(org, "ok", rpm_limit=1)
    await _say(client, "hi")
    await client.send({"type": "response.create"})
    await client.until("response.done")
    await client.send({"type": "response.create", "event_id": "second"})
    error = await client.until("error")
    assert error["error"]["code"] == "rate_limit_exceeded" and error["error"]["event_id"] == "second"
    limits = await client.next()
    assert limits["type"] == "rate_limits.updated"
    requests = next(limit for limit in limits["rate_limits"] if limit["name"] == "requests")
    assert requests["limit"] == 1 and requests["remaining"] == 0 and 0 < requests["reset_seconds"] <= 60
    await client.ws.disconnect()


async def test_revoking_the_key_closes_its_open_session(fake: Any, connect: Any, api_key: tuple[ApiKey, str]) -> None:
    client = await connect()
    await client.until("session.created")
    await sync_to_async(apikey_revoke)(key=api_key[0], actor_label="test")
    error = await client.next()
    assert error["type"] == "error" and error["error"]["code"] == "invalid_api_key"
    assert await client.closed() == 4401


@override_settings(KEYWAY_REALTIME_SESSIONS_PER_KEY=2)
async def test_a_key_holds_at_most_its_number_of_open_sessions(fake: Any, connect: Any) -> None:
    first, second = await connect(), await connect()
    await first.until("session.created")
    await second.until("session.created")
    third = await connect()
    error = await third.next()
    assert error["error"]["code"] == "concurrent_sessions_exceeded"
    assert await third.closed() == 4429
    await first.ws.disconnect()
    await asyncio.sleep(0.1)
    fourth = await connect()
    assert (await fourth.next())["type"] == "session.created"


@override_settings(KEYWAY_REALTIME_IDLE_TIMEOUT=1.0)
async def test_an_idle_session_is_closed(fake: Any, connect: Any) -> None:
    client = await connect()
    await client.until("session.created")
    error = await client.next(timeout=5)
    assert error["error"]["code"] == "session_idle_timeout"
    assert await client.closed() == 1000


@override_settings(KEYWAY_REALTIME_MAX_MESSAGE_BYTES=2048)
async def test_an_oversized_message_is_refused_and_the_socket_stays_open(fake: Any, connect: Any) -> None:
    client = await connect()
    await client.until("session.created")
    await client.send({"type": "session.update", "event_id": "big", "session": {"instructions": "x" * 4000}})
    error = await client.next()
    assert error["error"]["code"] == "message_too_large"
    await client.send({"type": "session.update", "session": {"instructions": "short"}})
    assert (await client.next())["type"] == "session.updated"


# Relayed sessions: a model with the `realtime` capability goes to the upstream's realtime WebSocket.

@pytest.fixture
async def voice(upstream: tuple[int, Any]) -> Any:
    port, app = upstream
    await sync_to_async(provider_upsert_openai_compatible)(
        name="voice-upstream", base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-upstream-secret",
        models=["voice", "voice-vad"], capabilities=["realtime"], context_length=32000,
    )
    return app


AUDIO = {"type": "input_audio_buffer.append", "audio": "AAAAAAAAAAAAAAAA"}


async def test_a_relayed_session_passes_the_upstream_events_and_meters_its_reported_usage(
    voice: Any, connect: Any, api_key: tuple[ApiKey, str]
) -> None:
    client = await connect("voice")
    created = await client.next()
    assert created["type"] == "session.created" and created["session"]["model"] == "voice"
    await client.send(AUDIO)
    await client.send({"type": "input_audio_buffer.commit"})
    assert (await client.next())["type"] == "input_audio_buffer.committed"
    await client.send({"type": "response.create", "response": {"max_output_tokens": 200}})
    events = await client.collect_until("response.done")
    kinds = [event["type"] for event in events]
    assert kinds[:2] == ["response.created", "rate_limits.updated"]
    limits = {limit["name"]: limit for limit in events[1]["rate_limits"]}
    assert limits["requests"]["limit"] == 600  # the key's limit, not the upstream's 99999
    assert kinds.count("response.output_audio.delta") == fake_upstream.REALTIME_DELTAS
    assert all(event["rate_limits"][0]["limit"] != 99999 for event in client.seen
               if event["type"] == "rate_limits.updated")
    seen = voice[fake_upstream.REALTIME_SEEN][-1]
    assert seen["authorization"] == "Bearer sk-upstream-secret" and seen["model"] == "voice"
    ledger = await _ledger()
    assert len(ledger) == 1
    event = ledger[0]
    # The client knows the session by Keyway's id, the one its usage carries, not the upstream's.
    assert (event.endpoint, event.model, event.session_id) == (UsageEvent.Endpoint.REALTIME, "voice",
                                                                created["session"]["id"])
    assert event.session_id.startswith("sess_") and event.session_id != "sess_upstream"
    assert (event.prompt_tokens, event.cached_tokens, event.completion_tokens) == (20, 4, 50)
    assert event.usage_source == UsageEvent.UsageSource.REPORTED


async def test_a_relayed_response_is_cancelled_upstream_and_charged_for_what_it_produced(
    voice: Any, connect: Any
) -> None:
    client = await connect("voice")
    await client.until("session.created")
    await client.send({"type": "response.create"})
    first = await client.until("response.output_audio.delta")
    await client.send({"type": "response.cancel", "response_id": first["response_id"]})
    done = (await client.until("response.done"))["response"]
    assert done["status"] == "cancelled"
    ledger = await _ledger()
    assert [event.status for event in ledger] == [UsageEvent.Status.CLIENT_DISCONNECTED]
    assert 0 < ledger[0].completion_tokens < 50


async def test_a_response_the_upstream_starts_itself_is_admitted_and_metered(voice: Any, connect: Any) -> None:
    client = await connect("voice-vad")
    await client.until("session.created")
    await client.send(AUDIO)
    await client.send({"type": "input_audio_buffer.commit"})
    await client.until("response.done")
    assert len(await _ledger()) == 1


async def test_a_rate_limited_relayed_response_never_reaches_the_upstream(
    voice: Any, org: Organization, fresh_rate_window: None
) -> None:
    client = await _session_with_new_key(org, "voice", rpm_limit=1)
    await client.send({"type": "response.create"})
    await client.until("response.done")
    await client.send({"type": "response.create", "event_id": "again"})
    error = await client.until("error")
    assert error["error"]["code"] == "rate_limit_exceeded" and error["error"]["event_id"] == "again"
    assert (await client.next())["type"] == "rate_limits.updated"
    await client.send({"type": "session.update", "session": {"instructions": "x"}})
    assert (await client.next())["type"] == "session.updated"  # the upstream never saw a second response
    assert len(await _ledger()) == 1
    await client.ws.disconnect()


async def test_a_client_that_leaves_mid_response_is_charged_from_the_upstreams_report(
    voice: Any, connect: Any
) -> None:
    client = await connect("voice")
    await client.until("session.created")
    await client.send({"type": "response.create"})
    await client.until("response.output_audio.delta")
    await client.ws.disconnect()
    ledger = await _ledger()
    assert [event.usage_source for event in ledger] == [UsageEvent.UsageSource.REPORTED]
    assert ledger[0].status == UsageEvent.Status.CLIENT_DISCONNECTED


async def test_an_unreachable_realtime_upstream_is_an_error_event_then_a_close(
    db: None, api_key: tuple[ApiKey, str]
) -> None:
    await sync_to_async(provider_upsert_openai_compatible)(
        name="gone", base_url="http://127.0.0.1:9/v1", models=["voice"], capabilities=["realtime"])
    ws = communicator("/v1/realtime?model=voice", key=api_key[1])
    await ws.connect()
    client = Client(ws)
    error = await client.next()
    assert error["type"] == "error" and error["error"]["type"] == "upstream_error"
    assert await client.closed() == 4502
    await ws.disconnect()  # as a server says the client is gone: the consumer ends


async def test_items_are_retrieved_deleted_and_inserted_where_asked(fake: Any, connect: Any) -> None:
    client = await connect()
    await client.until("session.created")
    first = await _say(client, "one")
    second = await _say(client, "two")
    await client.send({"type": "conversation.item.create", "previous_item_id": "root", "item": {
        "id": "my_item", "type": "message", "role": "system", "content": [{"type": "input_text", "text": "zero"}]}})
    added = await client.next()
    assert added["item"]["id"] == "my_item" and added["previous_item_id"] is None
    await client.until("conversation.item.done")
    await client.send({"type": "conversation.item.create", "previous_item_id": first["id"], "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "one and a half"}]}})
    assert (await client.next())["previous_item_id"] == first["id"]
    await client.until("conversation.item.done")
    await client.send({"type": "conversation.item.create", "event_id": "dup", "item": {
        "id": "my_item", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}})
    assert (await client.next())["error"]["code"] == "duplicate_item_id"
    await client.send({"type": "conversation.item.create", "previous_item_id": "nope", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}})
    assert (await client.next())["error"]["code"] == "item_not_found"

    await client.send({"type": "conversation.item.retrieve", "item_id": second["id"]})
    retrieved = await client.next()
    assert retrieved["type"] == "conversation.item.retrieved" and retrieved["item"] == second
    await client.send({"type": "conversation.item.delete", "item_id": second["id"]})
    assert await client.next() == {"type": "conversation.item.deleted", "item_id": second["id"],
                                   "event_id": client.seen[-1]["event_id"]}
    await client.send({"type": "conversation.item.retrieve", "item_id": second["id"]})
    assert (await client.next())["error"]["code"] == "item_not_found"

    seen_before = len(fake[fake_upstream.SEEN])
    await client.send({"type": "response.create"})
    await client.until("response.done")
    messages = fake[fake_upstream.SEEN][seen_before]["messages"]
    assert [message["content"] for message in messages] == ["zero", "one", "one and a half"]


async def test_an_out_of_band_response_reads_its_own_input_and_leaves_the_conversation_alone(
    fake: Any, connect: Any
) -> None:
    client = await connect()
    await client.until("session.created")
    kept = await _say(client, "kept")
    seen_before = len(fake[fake_upstream.SEEN])
    await client.send({"type": "response.create", "response": {
        "conversation": "none", "instructions": "Classify.", "metadata": {"topic": "triage"},
        "input": [{"type": "item_reference", "id": kept["id"]},
                  {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "extra"}]}]}})
    events = await client.collect_until("response.done")
    done = events[-1]["response"]
    assert done["conversation_id"] is None and done["metadata"] == {"topic": "triage"}
    assert not any(event["type"].startswith("conversation.item") for event in events)
    messages = fake[fake_upstream.SEEN][seen_before]["messages"]
    assert messages == [{"role": "system", "content": "Classify."}, {"role": "user", "content": "kept"},
                        {"role": "user", "content": "extra"}]
    # The assistant's answer did not join the conversation.
    await client.send({"type": "conversation.item.retrieve", "item_id": done["output"][0]["id"]})
    assert (await client.next())["error"]["code"] == "item_not_found"
    await client.send({"type": "response.create", "response": {"input": [{"type": "item_reference", "id": "gone"}]}})
    error = await client.next()
    assert error["error"]["code"] == "item_not_found" and error["error"]["param"] == "response.input[0].id"


async def test_one_response_at_a_time_in_the_conversation_and_a_bounded_number_out_of_band(
    fake: Any, connect: Any
) -> None:
    client = await connect("drip")
    await client.until("session.created")
    await _say(client, "go")
    await client.send({"type": "response.create"})
    await client.until("response.created")
    await client.send({"type": "response.create", "event_id": "second"})
    error = await client.until("error")
    assert error["error"]["code"] == "conversation_already_has_active_response"
    for _ in range(3):
        await client.send({"type": "response.create", "response": {"conversation": "none"}})
    await client.send({"type": "response.create", "event_id": "fifth", "response": {"conversation": "none"}})
    error = await client.until("error")
    assert error["error"]["code"] == "too_many_active_responses" and error["error"]["event_id"] == "fifth"
    done = 0
    while done < 4:
        done += (await client.next(timeout=15))["type"] == "response.done"


async def test_an_output_limit_ends_the_response_incomplete_and_an_empty_conversation_is_refused(
    fake: Any, connect: Any
) -> None:
    client = await connect()
    await client.until("session.created")
    await client.send({"type": "response.create", "event_id": "empty"})
    error = await client.next()
    assert error["error"]["code"] == "empty_conversation" and error["error"]["event_id"] == "empty"
    await _say(client, "hi")
    seen_before = len(fake[fake_upstream.SEEN])
    await client.send({"type": "session.update", "session": {"max_output_tokens": 5}})
    assert (await client.next())["session"]["max_output_tokens"] == 5
    await client.send({"type": "response.create"})
    await client.until("response.done")
    assert fake[fake_upstream.SEEN][seen_before]["max_tokens"] == 5


async def test_an_upstream_that_breaks_mid_answer_ends_the_response_failed(fake: Any, connect: Any) -> None:
    client = await connect("stream-break")
    await client.until("session.created")
    await _say(client, "hi")
    await client.send({"type": "response.create", "event_id": "r"})
    events = await client.collect_until("response.done")
    assert any(event["type"] == "error" and event["error"]["event_id"] == "r" for event in events)
    done = events[-1]["response"]
    assert done["status"] == "failed" and done["status_details"]["error"]["type"] == "upstream_error"
    assert done["output"][0]["status"] == "incomplete"
    assert [event.status for event in await _ledger()] == [UsageEvent.Status.INCOMPLETE]


async def test_truncation_needs_assistant_audio_and_cuts_it(fake: Any, connect: Any) -> None:
    import base64

    client = await connect()
    await client.until("session.created")
    user = await _say(client, "hi")
    await client.send({"type": "conversation.item.truncate", "item_id": user["id"], "content_index": 0,
                       "audio_end_ms": 0})
    assert (await client.next())["error"]["param"] == "item_id"
    audio = base64.b64encode(bytes(48 * 1000)).decode()  # one second of PCM16 at 24 kHz
    await client.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "assistant", "content": [{"type": "output_audio", "audio": audio,
                                                             "transcript": "hello there"}]}})
    error = await client.next()
    assert error["error"]["code"] == "audio_not_supported"  # a text model takes no audio
    await client.send({"type": "conversation.item.create", "item": {
        "id": "spoken", "type": "message", "role": "assistant",
        "content": [{"type": "output_text", "text": "hello"}, {"type": "output_audio", "transcript": "there"}]}})
    await client.until("conversation.item.done")
    for index, end, param in ((5, 0, "content_index"), (0, 0, "content_index"), (1, -1, "audio_end_ms"),
                              (1, 10, "content_index")):
        await client.send({"type": "conversation.item.truncate", "item_id": "spoken", "content_index": index,
                           "audio_end_ms": end})
        assert (await client.next())["error"]["param"] == param


@override_settings(KEYWAY_REALTIME_MAX_ITEMS=2)
async def test_the_conversation_is_bounded(fake: Any, connect: Any) -> None:
    client = await connect()
    await client.until("session.created")
    await _say(client, "one")
    await _say(client, "two")
    await client.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "three"}]}})
    assert (await client.next())["error"]["code"] == "conversation_full"
    await client.send({"type": "response.create"})
    assert (await client.next())["error"]["code"] == "conversation_full"


@override_settings(KEYWAY_REALTIME_MAX_LIFETIME=1.0)
async def test_a_session_ends_at_its_lifetime(fake: Any, connect: Any) -> None:
    client = await connect()
    created = await client.until("session.created")
    await client.send({"type": "session.update", "session": {}})
    await client.until("session.updated")
    error = await client.next(timeout=5)
    assert error["error"]["code"] == "session_expired" and created["session"]["expires_at"] > 0
    assert await client.closed() == 1000


async def test_status_counts_open_realtime_sockets_for_staff(fake: Any, connect: Any, asgi_client: Any) -> None:
    def staff_session_cookie() -> str:
        from django.contrib.auth import get_user_model
        from django.test import Client as PageClient

        page_client = PageClient()
        page_client.force_login(get_user_model().objects.create_user("ops", password="x" * 16, is_staff=True))
        return str(page_client.cookies["sessionid"].value)

    cookie = await sync_to_async(staff_session_cookie)()

    def count() -> Any:
        return asgi_client.get("/status", headers={"Cookie": f"sessionid={cookie}"})

    before = (await count()).json()["open_websockets"]
    first, second = await connect(), await connect()
    await first.until("session.created")
    await second.until("session.created")
    assert (await count()).json()["open_websockets"] == before + 2
    await first.ws.disconnect()
    await asyncio.sleep(0.1)
    assert (await count()).json()["open_websockets"] == before + 1


@pytest.fixture
async def audio_chat_model(fake: Any, upstream: tuple[int, Any]) -> None:
    """`ok-audio`: a chat model that takes audio, on the fake upstream."""
    await sync_to_async(provider_upsert_openai_compatible)(
        name="fake-audio", base_url=f"http://127.0.0.1:{upstream[0]}/v1", models=["ok-audio"],
        capabilities=["chat", "audio"])


async def test_assistant_audio_is_truncated_where_the_client_stopped_playing_it(
    audio_chat_model: None, connect: Any
) -> None:
    import base64

    client = await connect("ok-audio")
    await client.until("session.created")
    audio = base64.b64encode(bytes(48 * 1000)).decode()  # one second of PCM16 at 24 kHz
    await client.send({"type": "conversation.item.create", "item": {
        "id": "spoken", "type": "message", "role": "assistant",
        "content": [{"type": "output_audio", "audio": audio, "transcript": "hello there"}]}})
    await client.until("conversation.item.done")
    await client.send({"type": "conversation.item.truncate", "item_id": "spoken", "content_index": 0,
                       "audio_end_ms": 1500})
    assert (await client.next())["error"]["param"] == "audio_end_ms"
    await client.send({"type": "conversation.item.truncate", "item_id": "spoken", "content_index": 0,
                       "audio_end_ms": 500})
    truncated = await client.next()
    assert truncated["type"] == "conversation.item.truncated" and truncated["audio_end_ms"] == 500
    await client.send({"type": "conversation.item.retrieve", "item_id": "spoken"})
    part = (await client.next())["item"]["content"][0]
    assert len(base64.b64decode(part["audio"])) == 48 * 500 and part["transcript"] is None


async def test_user_audio_reaches_an_audio_chat_model_as_a_wav_file(
    fake: Any, audio_chat_model: None, connect: Any
) -> None:
    import base64
    import io
    import wave

    client = await connect("ok-audio")
    await client.until("session.created")
    pcm = bytes(range(256)) * 48
    await client.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_audio", "audio": base64.b64encode(pcm).decode()}]}})
    await client.until("conversation.item.done")
    await client.send({"type": "conversation.item.create", "event_id": "bad", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_audio", "audio": "not base64!"}]}})
    assert (await client.next())["error"]["param"] == "item.content[0].audio"
    seen_before = len(fake[fake_upstream.SEEN])
    await client.send({"type": "response.create"})
    await client.until("response.done")
    part = fake[fake_upstream.SEEN][seen_before]["messages"][0]["content"][0]
    assert part["type"] == "input_audio" and part["input_audio"]["format"] == "wav"
    with wave.open(io.BytesIO(base64.b64decode(part["input_audio"]["data"]))) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.readframes(10**6)) == (24000, 1, pcm)


async def test_many_sessions_open_at_once(fake: Any, connect: Any) -> None:
    clients = await asyncio.gather(*(connect() for _ in range(30)))
    created = await asyncio.gather(*(client.next() for client in clients))
    assert {event["type"] for event in created} == {"session.created"}


@pytest.mark.skipif(not settings.REDIS_URL, reason="the channel layer is channels_redis only with REDIS_URL")
async def test_a_session_outlives_the_channel_layers_blocking_read(fake: Any, connect: Any) -> None:
    """channels_redis waits on Redis in 5 s blocking pops; a socket timeout at or below that (redis-py 8's
    default) tore every quiet session down after ~5 s. A quiet session must stay open, and close at once."""
    client = await connect()
    await client.until("session.created")
    await asyncio.sleep(6.5)
    await client.send({"type": "session.update", "session": {"instructions": "still here"}})
    assert (await client.next())["session"]["instructions"] == "still here"
    started = time.monotonic()
    await client.ws.disconnect(timeout=10)
    assert time.monotonic() - started < 0.5


async def test_a_relayed_session_cannot_switch_to_another_upstream_model(voice: Any, connect: Any) -> None:
    client = await connect("voice")
    await client.until("session.created")
    await client.send({"type": "session.update", "event_id": "swap", "session": {"model": "gpt-realtime-max"}})
    error = await client.next()
    assert error["error"]["param"] == "session.model" and error["error"]["event_id"] == "swap"
    await client.send({"type": "response.create", "response": {"model": "gpt-realtime-max"}})
    assert (await client.next())["error"]["param"] == "response.model"
    await client.send({"type": "session.update", "session": {"model": "voice"}})
    assert (await client.next())["type"] == "session.updated"
    assert len(await _ledger()) == 0


def _prepaid_without_credit(org: Organization) -> None:
    from billing.models import Plan, Price
    from billing.services import billing_plan_set

    billing_plan_set(organization=org, plan=Plan.objects.create(name="prepaid", billing_mode=Plan.Mode.PREPAID),
                     actor_label="test")
    Price.objects.create(model="ok", input_per_million_micros=1_000_000, output_per_million_micros=1_000_000)
    Price.objects.create(model="voice", input_per_million_micros=1_000_000, output_per_million_micros=1_000_000)


@pytest.mark.parametrize("model", ["ok", "voice"])
async def test_an_out_of_credit_response_gets_an_error_and_rate_limits_updated(
    fake: Any, voice: Any, connect: Any, org: Organization, model: str
) -> None:
    await sync_to_async(_prepaid_without_credit)(org)
    client = await connect(model)
    await client.until("session.created")
    await client.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
    await client.send({"type": "response.create", "event_id": "broke"})
    error = await client.until("error")
    assert error["error"]["code"] == "insufficient_quota" and error["error"]["event_id"] == "broke"
    assert (await client.next())["type"] == "rate_limits.updated"
    assert await _ledger() == []
