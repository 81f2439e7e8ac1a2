"""The Responses API through the official SDK, against a real HTTP upstream on loopback (bench/fake_upstream.py,
whose answers are known to the byte) and against the embedded Gemma 3 270M (structure and limits)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx
import openai
import pytest
from asgiref.sync import sync_to_async

from apikeys.models import ApiKey
from apikeys.services import apikey_create
from billing import metering
from billing.models import UsageEvent
from completions.services import provider_upsert_openai_compatible
from conversations.models import StoredResponse
from platform_site.models import Organization
from tests.conftest import bearer

pytestmark = pytest.mark.django_db(transaction=True)

GEMMA = "gemma-3-270m"
TEXT = "".join(f"t{i} " for i in range(20))  # the fake upstream's streamed answer
PLAIN = "Hello from the fake upstream."  # and its whole one
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}


@pytest.fixture
async def sdk(sdk: openai.AsyncOpenAI, upstream: tuple[int, Any], default_model: None) -> openai.AsyncOpenAI:
    port, _ = upstream
    await sync_to_async(provider_upsert_openai_compatible)(
        name="fake", base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-upstream-secret",
        models=["ok", "drip", "tools", "stream-break", "slow-stream-3"],
    )
    return sdk


@pytest.fixture(autouse=True)
async def _background_runs_end_with_their_test() -> AsyncIterator[None]:
    """A background response settles into the ledger when it ends: it must end before the test's rows go."""
    yield
    from completions.api import responses

    tasks = [job.task for job in responses._background.values() if job.task is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=30)


def seen(upstream: tuple[int, Any]) -> dict[str, Any]:
    from bench import fake_upstream

    body: dict[str, Any] = upstream[1][fake_upstream.SEEN][-1]
    return body


async def usage_event(call_id: str) -> UsageEvent:
    await metering.flush()
    return await sync_to_async(UsageEvent.objects.get)(call_id=call_id)


async def events_of(stream: Any) -> list[dict[str, Any]]:
    return [event.model_dump(exclude_unset=True) async for event in stream]


# Create ------------------------------------------------------------------------------------------------------


async def test_a_response_is_one_metered_call_named_by_its_id_and_matches_the_schema(
    sdk: openai.AsyncOpenAI, upstream: tuple[int, Any], validate_schema: Any
) -> None:
    raw = await sdk.responses.with_raw_response.create(model="ok", input="hi", instructions="Be brief.",
                                                       metadata={"case": "one"})
    body = raw.http_response.json()
    validate_schema("Response", body)
    response = raw.parse()
    assert response.status == "completed" and response.output_text == PLAIN
    assert response.id.startswith("resp_") and response.output[0].type == "message"
    assert response.instructions == "Be brief." and response.metadata == {"case": "one"}
    assert response.usage is not None and (response.usage.input_tokens, response.usage.output_tokens) == (9, 7)
    assert raw.headers["x-keyway-model"] == "ok"
    # The instructions go first, as a system message; the string input is one user message.
    assert seen(upstream)["messages"] == [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": [{"type": "text", "text": "hi"}]}]

    event = await usage_event(response.id)
    assert event.endpoint == UsageEvent.Endpoint.RESPONSES and event.status == UsageEvent.Status.OK
    assert (event.prompt_tokens, event.completion_tokens) == (9, 7)

    again = await sdk.responses.retrieve(response.id)
    assert again.model_dump() == response.model_dump()
    items = await sdk.responses.input_items.list(response.id)
    assert [item.type for item in items.data] == ["message"]
    assert items.data[0].content[0].text == "hi"  # type: ignore[union-attr]
    validate_schema("ResponseItemList", (await sdk.responses.input_items.with_raw_response.list(response.id))
                    .http_response.json())


async def test_the_stream_follows_the_documented_order_and_replays_from_any_sequence_number(
    sdk: openai.AsyncOpenAI, validate_schema: Any
) -> None:
    live = await events_of(await sdk.responses.create(model="ok", input="hi", stream=True))
    kinds = [event["type"] for event in live]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * 20,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert [event["sequence_number"] for event in live] == list(range(len(live)))
    for event in live:
        validate_schema("ResponseStreamEvent", event)
    assert live[0]["response"]["status"] == "in_progress" and live[0]["response"]["output"] == []
    final = live[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == TEXT

    async with sdk.responses.stream(model="ok", input="hi") as helper:
        assert (await helper.get_final_response()).output_text == TEXT

    # Stored before `response.completed` was sent, and the stream replays exactly, after any sequence number.
    replayed = await events_of(await sdk.responses.retrieve(final["id"], stream=True, starting_after=10))
    assert replayed == live[11:]
    replayed = await events_of(await sdk.responses.retrieve(final["id"], stream=True))
    assert replayed == live


async def test_function_tools_in_the_flat_form_and_their_outputs_as_input(
    sdk: openai.AsyncOpenAI, upstream: tuple[int, Any], validate_schema: Any
) -> None:
    response = await sdk.responses.create(model="tools", input="Weather in Paris?", tools=[WEATHER, TIME],  # type: ignore[list-item]
                                          tool_choice="auto")
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(c.name, c.call_id, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", "call_w", {"city": "Paris"}), ("get_time", "call_t", {})]
    assert seen(upstream)["tools"][0] == {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER["parameters"], "strict": True}}
    validate_schema("Response", (await sdk.responses.with_raw_response.retrieve(response.id)).http_response.json())

    async with sdk.responses.stream(model="tools", input="Weather?", tools=[WEATHER, TIME]) as stream:  # type: ignore[list-item]
        kinds = [event.type async for event in stream]
        streamed = await stream.get_final_response()
    assert kinds.count("response.function_call_arguments.delta") == 4
    assert kinds.count("response.function_call_arguments.done") == 2
    assert [item.type for item in streamed.output] == ["function_call", "function_call"]

    # The outputs go back with the chain: a string, and an array of parts.
    follow = await sdk.responses.create(model="ok", previous_response_id=response.id, input=[
        {"type": "function_call_output", "call_id": "call_w", "output": "18 C and sunny"},
        {"type": "function_call_output", "call_id": "call_t", "output": [{"type": "input_text", "text": "noon"}]},
    ])
    assert follow.status == "completed"
    messages = seen(upstream)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["call_w", "call_t"]
    assert messages[2] == {"role": "tool", "tool_call_id": "call_w", "content": "18 C and sunny"}
    assert messages[3]["content"] == "noon"


async def test_a_chain_reads_every_predecessor_but_not_their_instructions(
    sdk: openai.AsyncOpenAI, upstream: tuple[int, Any]
) -> None:
    first = await sdk.responses.create(model="ok", input="one", instructions="first rules")
    # Chained at once: the predecessor was stored before its client had it.
    second = await sdk.responses.create(model="ok", input="two", previous_response_id=first.id)
    await sdk.responses.create(model="ok", input="three", previous_response_id=second.id, instructions="new rules")
    messages = seen(upstream)["messages"]
    assert [(m["role"], m["content"] if m["role"] == "assistant" else m["content"][0]["text"]
             if isinstance(m["content"], list) else m["content"]) for m in messages] == [
        ("system", "new rules"), ("user", "one"), ("assistant", PLAIN), ("user", "two"), ("assistant", PLAIN),
        ("user", "three")]


async def test_an_unknown_or_unstored_previous_response_is_a_400(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.responses.create(model="ok", input="x", previous_response_id="resp_nope")
    assert caught.value.code == "previous_response_not_found" and caught.value.param == "previous_response_id"
    assert "Previous response with id 'resp_nope' not found." in caught.value.message

    unstored = await sdk.responses.create(model="ok", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.responses.create(model="ok", input="x", previous_response_id=unstored.id)
    assert caught.value.code == "previous_response_not_found"
    # Metered all the same.
    assert (await usage_event(unstored.id)).status == UsageEvent.Status.OK


async def test_another_organizations_responses_and_conversations_are_not_found(
    sdk: openai.AsyncOpenAI, other_org: Organization
) -> None:
    response = await sdk.responses.create(model="ok", input="secret")
    conversation = await sdk.conversations.create(items=[{"type": "message", "role": "user", "content": "secret"}])
    _, raw = await sync_to_async(apikey_create)(organization=other_org, name="other", actor_label="test")
    from platform_site.asgi import application

    other = openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key=raw, max_retries=0,
                               http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=application)))
    for attempt in (
        other.responses.retrieve(response.id), other.responses.delete(response.id),
        other.responses.cancel(response.id), other.responses.input_items.list(response.id),
        other.conversations.retrieve(conversation.id), other.conversations.delete(conversation.id),
        other.conversations.items.list(conversation.id),
        other.conversations.update(conversation.id, metadata={"a": "b"}),
    ):
        with pytest.raises(openai.NotFoundError):
            await attempt
    with pytest.raises(openai.BadRequestError) as caught:
        await other.responses.create(model="ok", input="x", previous_response_id=response.id)
    assert caught.value.code == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        await other.responses.create(model="ok", input="x", conversation=conversation.id)
    await other.close()
    assert (await sdk.responses.retrieve(response.id)).output_text == PLAIN


async def test_delete_removes_a_stored_response(sdk: openai.AsyncOpenAI, api_key: tuple[ApiKey, str]) -> None:
    response = await sdk.responses.create(model="ok", input="x")
    assert await sdk.responses.delete(response.id) is None
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.delete(response.id)
    from platform_site.asgi import application

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://127.0.0.1") as client:
        again = await sdk.responses.create(model="ok", input="x")
        deleted = await client.delete(f"/v1/responses/{again.id}", headers=bearer(api_key[1]))
    assert deleted.json() == {"id": again.id, "object": "response", "deleted": True}


# Conversations ----------------------------------------------------------------------------------------------


async def test_a_response_in_a_conversation_reads_its_items_and_adds_its_input_and_output(
    sdk: openai.AsyncOpenAI, upstream: tuple[int, Any], validate_schema: Any
) -> None:
    raw = await sdk.conversations.with_raw_response.create(
        metadata={"topic": "demo"}, items=[{"type": "message", "role": "user", "content": "earlier"}])
    validate_schema("ConversationResource", raw.http_response.json())
    conversation = raw.parse()
    assert conversation.object == "conversation" and conversation.metadata == {"topic": "demo"}
    response = await sdk.responses.create(model="ok", input="now", conversation=conversation.id)
    assert response.conversation is not None and response.conversation.id == conversation.id
    assert [m["content"][0]["text"] for m in seen(upstream)["messages"]] == ["earlier", "now"]

    raw = await sdk.conversations.items.with_raw_response.list(conversation.id, order="asc")
    validate_schema("ConversationItemList", raw.http_response.json())
    items = raw.parse().data
    assert [(item.type, getattr(item, "role", None)) for item in items] == [
        ("message", "user"), ("message", "user"), ("message", "assistant")]
    assert items[2].id == response.output[0].id

    # The next response sees all of it; its call is metered in the conversation's session.
    await sdk.responses.create(model="ok", input="next", conversation={"id": conversation.id})
    assert len(seen(upstream)["messages"]) == 4
    event = await usage_event(response.id)
    assert event.session_id == conversation.id

    # Paginating newest first, one at a time, walks all five items.
    walked = [item.id async for item in sdk.conversations.items.list(conversation.id, limit=1)]
    assert len(walked) == 5 and walked[2] == items[2].id

    item = await sdk.conversations.items.retrieve(items[0].id, conversation_id=conversation.id)
    assert item.id == items[0].id
    after_delete = await sdk.conversations.items.delete(items[0].id, conversation_id=conversation.id)
    assert after_delete.id == conversation.id
    with pytest.raises(openai.NotFoundError):
        await sdk.conversations.items.retrieve(items[0].id, conversation_id=conversation.id)

    added = await sdk.conversations.items.create(conversation.id, items=[
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}]},
        {"type": "function_call_output", "call_id": "call_1", "output": "b"}])
    assert [item.type for item in added.data] == ["message", "function_call_output"]
    updated = await sdk.conversations.update(conversation.id, metadata={"topic": "changed"})
    assert updated.metadata == {"topic": "changed"}
    assert (await sdk.conversations.retrieve(conversation.id)).metadata == {"topic": "changed"}
    deleted_raw = await sdk.conversations.with_raw_response.delete(conversation.id)
    validate_schema("DeletedConversationResource", deleted_raw.http_response.json())
    deleted = deleted_raw.parse()
    assert deleted.deleted and deleted.id == conversation.id
    with pytest.raises(openai.NotFoundError):
        await sdk.conversations.retrieve(conversation.id)


async def test_conversation_items_are_checked_and_bounded(sdk: openai.AsyncOpenAI, settings: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.conversations.create(items=[{"type": "message", "role": "robot", "content": "x"}])
    assert caught.value.param == "items[0].role"
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.conversations.create(items=[{"type": "message", "role": "user", "content": "x"}] * 21)
    assert caught.value.param == "items"
    conversation = await sdk.conversations.create(items=[{"type": "message", "id": "msg_1", "role": "user",
                                                          "content": "x"}])
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.conversations.items.create(conversation.id, items=[
            {"type": "message", "id": "msg_1", "role": "user", "content": "again"}])
    assert caught.value.code == "duplicate_item_id"
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.responses.create(model="ok", conversation=conversation.id, input=[
            {"type": "message", "id": "msg_1", "role": "user", "content": "again"}])
    assert (caught.value.code, caught.value.param) == ("duplicate_item_id", "input[0].id")
    settings.KEYWAY_CONVERSATION_MAX_ITEMS = 2
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.responses.create(model="ok", input="x", conversation=conversation.id)
    assert (caught.value.code, caught.value.param) == ("conversation_full", "conversation")
    await metering.flush()
    assert await sync_to_async(UsageEvent.objects.count)() == 0
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.conversations.items.create(conversation.id, items=[
            {"type": "message", "role": "user", "content": "b"}, {"type": "message", "role": "user", "content": "c"}])
    assert caught.value.code == "conversation_full"
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.responses.create(model="ok", input="x", conversation=conversation.id, previous_response_id="resp_1")
    assert caught.value.code == "mutually_exclusive_parameters"


# Background --------------------------------------------------------------------------------------------------


async def _until(sdk: openai.AsyncOpenAI, response_id: str, done: tuple[str, ...]) -> Any:
    for _ in range(200):
        response = await sdk.responses.retrieve(response_id)
        if response.status in done:
            return response
        await asyncio.sleep(0.05)
    raise AssertionError(f"{response_id} never reached {done}")


async def test_a_background_response_is_queued_then_runs_to_completion_and_streams_from_storage(
    sdk: openai.AsyncOpenAI,
) -> None:
    started = await sdk.responses.create(model="drip", input="hi", background=True)
    assert started.status == "queued" and started.background
    running = await _until(sdk, started.id, ("in_progress",))
    assert running.status == "in_progress"
    # Resumed mid-way, the stream goes on from there to the end.
    tail = await events_of(await sdk.responses.retrieve(started.id, stream=True, starting_after=5))
    assert tail[0]["sequence_number"] == 6 and tail[-1]["type"] == "response.completed"
    finished = await _until(sdk, started.id, ("completed",))
    assert finished.output_text == TEXT and finished.usage is not None
    whole = await events_of(await sdk.responses.retrieve(started.id, stream=True))
    assert [e["type"] for e in whole[:3]] == ["response.created", "response.queued", "response.in_progress"]
    assert whole[6:] == tail
    event = await usage_event(started.id)
    assert event.status == UsageEvent.Status.OK and event.completion_tokens == 20


async def test_a_background_stream_goes_to_its_client_and_the_run_survives_it_leaving(
    sdk: openai.AsyncOpenAI,
) -> None:
    stream = await sdk.responses.create(model="drip", input="hi", background=True, stream=True)
    first = []
    async for event in stream:
        first.append(event)
        if len(first) == 5:
            break
    await stream.close()
    assert [e.type for e in first[:3]] == ["response.created", "response.queued", "response.in_progress"]
    finished = await _until(sdk, first[0].response.id, ("completed",))  # type: ignore[union-attr]
    assert finished.output_text == TEXT


async def test_cancelling_a_background_response_stops_and_settles_it(sdk: openai.AsyncOpenAI) -> None:
    started = await sdk.responses.create(model="drip", input="hi", background=True)
    await _until(sdk, started.id, ("in_progress",))
    await asyncio.sleep(0.3)
    cancelled = await sdk.responses.cancel(started.id)
    assert cancelled.status == "cancelled"
    stored = await sync_to_async(StoredResponse.objects.get)(id=started.id)
    assert stored.status == "cancelled"
    event = await usage_event(started.id)
    assert event.status == UsageEvent.Status.CLIENT_DISCONNECTED and 0 < event.completion_tokens < 20
    # Cancelling again changes nothing; a response that was not in the background cannot be cancelled.
    assert (await sdk.responses.cancel(started.id)).status == "cancelled"
    plain = await sdk.responses.create(model="ok", input="x")
    with pytest.raises(openai.BadRequestError):
        await sdk.responses.cancel(plain.id)


async def test_a_background_response_refused_at_admission_gets_its_error_at_once(
    sdk: openai.AsyncOpenAI, api_key: tuple[ApiKey, str]
) -> None:
    await sync_to_async(ApiKey.objects.filter(pk=api_key[0].pk).update)(allowed_models=["ok"])
    from apikeys.auth import invalidate_cached_key

    invalidate_cached_key(api_key[0].public_id)
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk.responses.create(model="drip", input="x", background=True)
    assert caught.value.status_code in (403, 404)
    assert await sync_to_async(StoredResponse.objects.count)() == 0


async def test_a_background_response_left_by_a_dead_worker_is_failed_when_read(
    sdk: openai.AsyncOpenAI, settings: Any
) -> None:
    from django.utils import timezone

    started = await sdk.responses.create(model="drip", input="hi", background=True)
    finished = await _until(sdk, started.id, ("completed",))
    # As a worker that died mid-run leaves it: running, and silent for longer than the stale limit.
    await sync_to_async(StoredResponse.objects.filter(id=finished.id).update)(
        status="in_progress",
        updated_at=timezone.now() - timezone.timedelta(seconds=settings.KEYWAY_RESPONSES_STALE_SECONDS + 1),
    )
    lost = await sdk.responses.retrieve(finished.id)
    assert lost.status == "failed" and lost.error is not None and lost.error.code == "server_error"


async def test_a_worker_shutting_down_fails_its_background_responses_and_settles_them(
    sdk: openai.AsyncOpenAI,
) -> None:
    from completions.api import responses

    started = await sdk.responses.create(model="drip", input="hi", background=True)
    await _until(sdk, started.id, ("in_progress",))
    await responses.cancel_all_background()
    stopped = await sdk.responses.retrieve(started.id)
    assert stopped.status == "failed" and stopped.error is not None and stopped.error.code == "server_error"
    event = await usage_event(started.id)
    assert event.status == UsageEvent.Status.CLIENT_DISCONNECTED and event.completion_tokens < 20


# Bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"model": "ok", "input": "x", "frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ({"model": "ok", "input": "x", "messages": []}, "messages", "unknown_parameter"),
    ({"model": "ok", "input": [{"type": "message", "role": "user", "content": [{"type": "text", "text": "x"}]}]},
     "input[0].content[0].type", "invalid_value"),
    ({"model": "ok", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "x"}, {"type": "input_image", "image_url": "data:image/png;base64,###"}]}]},
     "input[0].content[1].image_url", "invalid_content_part"),
    ({"model": "ok", "input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type", "unsupported_item_type"),
    ({"model": "ok", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_tool"),
    ({"model": "ok", "input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name",
     "invalid_value"),
    ({"model": "ok", "input": "x", "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name",
     "invalid_value"),
    ({"model": "ok", "input": "x", "max_output_tokens": 5}, "max_output_tokens", "integer_below_min_value"),
    ({"model": "ok", "input": "x", "temperature": 3}, "temperature", "invalid_value"),
    ({"model": "ok", "input": "x", "store": False, "background": True}, "background", "invalid_value"),
    ({"model": "ok", "input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name",
     "missing_required_parameter"),
    ({"model": "ok", "input": "x", "include": ["everything"]}, "include[0]", "invalid_value"),
    ({"model": "ok", "input": "x", "metadata": {"k": 5}}, "metadata", "invalid_value"),
    ({"model": "ok", "input": 5}, "input", "invalid_type"),
    ({"model": "ok", "input": [{"type": "item_reference", "id": "msg_nope"}]}, "input[0].id", "item_not_found"),
    ({"input": "x"}, "model", "missing_required_parameter"),
    ({"model": "ok", "input": "x", "service_tier": "turbo"}, "service_tier", "invalid_value"),
    ({"model": "ok", "input": "x", "conversation": {"id": 5}}, "conversation.id", "invalid_type"),
    ({"model": "ok", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]},
     "input[0].content[0].file_id", "unsupported_parameter"),
    ({"model": "ok", "input": "x", "reasoning": {"effort": "high"}}, "reasoning.effort", "unknown_parameter"),
])
async def test_bad_requests_get_an_error_naming_the_field_and_nothing_is_stored_or_metered(
    sdk: openai.AsyncOpenAI, api_key: tuple[ApiKey, str], body: dict[str, Any], param: str, code: str,
    validate_schema: Any,
) -> None:
    from platform_site.asgi import application

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://127.0.0.1") as client:
        answer = await client.post("/v1/responses", json=body, headers=bearer(api_key[1]))
    assert answer.status_code == 400, answer.text
    validate_schema("ErrorResponse", answer.json())
    assert (answer.json()["error"]["param"], answer.json()["error"]["code"]) == (param, code)
    await metering.flush()
    assert await sync_to_async(StoredResponse.objects.count)() == 0
    assert await sync_to_async(UsageEvent.objects.count)() == 0


async def test_a_key_without_the_responses_scope_is_refused(sdk: openai.AsyncOpenAI, org: Organization) -> None:
    _, raw = await sync_to_async(apikey_create)(organization=org, name="chat only", actor_label="test",
                                                scopes=["chat"])
    from platform_site.asgi import application

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://127.0.0.1") as client:
        for method, path in (("POST", "/v1/responses"), ("GET", "/v1/responses/resp_x"),
                             ("POST", "/v1/conversations"), ("GET", "/v1/conversations/conv_x/items")):
            answer = await client.request(method, path, json={"model": "ok", "input": "x"}, headers=bearer(raw))
            assert answer.status_code == 403, (path, answer.text)


async def test_a_stream_that_breaks_ends_failed_and_is_stored_so(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.responses.create(model="stream-break", input="x", stream=True)
    events = [event async for event in stream]
    assert events[-1].type == "response.failed"
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None
    assert (await sdk.responses.retrieve(failed.id)).status == "failed"
    event = await usage_event(failed.id)
    assert event.status == UsageEvent.Status.INCOMPLETE


# The embedded model ----------------------------------------------------------------------------------------------


async def test_gemma_answers_streams_and_stops_at_max_output_tokens(
    sdk: openai.AsyncOpenAI, validate_schema: Any
) -> None:
    raw = await sdk.responses.with_raw_response.create(model=GEMMA, input="Say hello", max_output_tokens=16,
                                                       temperature=0)
    validate_schema("Response", raw.http_response.json())
    response = raw.parse()
    assert response.output_text and response.usage is not None and response.usage.output_tokens <= 16
    if response.status == "incomplete":
        assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    stream = await sdk.responses.create(model=GEMMA, input="Say hello", max_output_tokens=16, temperature=0,
                                        stream=True)
    events = [event async for event in stream]
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.output_text == response.output_text  # type: ignore[union-attr]


@pytest.mark.embedded_model
async def test_gemma_structured_output_follows_the_schema(sdk: openai.AsyncOpenAI) -> None:
    import jsonschema
    from pydantic import BaseModel

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    response = await sdk.responses.create(model=GEMMA, input="A person as JSON.", max_output_tokens=48,
                                          temperature=0, text={"format": {"type": "json_schema", "name": "person",
                                                                          "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(response.output_text), schema)

    class Person(BaseModel):
        name: str
        age: int

    parsed = await sdk.responses.parse(model=GEMMA, input="A person.", max_output_tokens=48, temperature=0,
                                       text_format=Person)
    assert isinstance(parsed.output_parsed, Person)


@pytest.mark.embedded_model
async def test_gemma_calls_a_required_function_with_valid_arguments(sdk: openai.AsyncOpenAI) -> None:
    import jsonschema

    response = await sdk.responses.create(model=GEMMA, input="Weather in Paris?", tools=[WEATHER],  # type: ignore[list-item]
                                          tool_choice="required", parallel_tool_calls=False, max_output_tokens=100,
                                          temperature=0)
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    follow = await sdk.responses.create(model=GEMMA, previous_response_id=response.id, max_output_tokens=16,
                                        temperature=0, input=[{"type": "function_call_output",
                                                               "call_id": calls[0].call_id, "output": "Sunny."}])
    alone = await sdk.responses.create(model=GEMMA, max_output_tokens=16, temperature=0,
                                       input="Result of get_weather: Sunny.")
    # The chain brought the question and the call before the output.
    assert follow.usage is not None and alone.usage is not None
    assert follow.usage.input_tokens > alone.usage.input_tokens + 10


async def test_truncation_auto_drops_the_oldest_items_to_fit_the_context(sdk: openai.AsyncOpenAI) -> None:
    long = "word " * 5000
    with pytest.raises(openai.BadRequestError):
        await sdk.responses.create(model=GEMMA, input=[{"role": "user", "content": long},
                                                       {"role": "user", "content": "Hi"}], max_output_tokens=16)
    response = await sdk.responses.create(model=GEMMA, input=[{"role": "user", "content": long},
                                                              {"role": "user", "content": "Hi"}],
                                          max_output_tokens=16, truncation="auto", temperature=0)
    assert response.usage is not None and response.usage.input_tokens < 100


# Parts, limits, storage --------------------------------------------------------------------------------------


async def test_a_pdf_input_file_becomes_text_and_an_image_is_refused_by_a_model_without_vision(
    sdk: openai.AsyncOpenAI, upstream: tuple[int, Any]
) -> None:
    import base64

    from tests.completions.test_content_parts import make_pdf

    pdf = base64.b64encode(make_pdf("Quarterly revenue grew")).decode()
    raw = await sdk.responses.with_raw_response.create(model="ok", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Summarise"},
        {"type": "input_file", "filename": "report.pdf", "file_data": f"data:application/pdf;base64,{pdf}"}]}])
    assert raw.headers["x-keyway-file-conversion"] == "pdf-to-text; files=1"
    assert "Quarterly revenue grew" in seen(upstream)["messages"][0]["content"][1]["text"]
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.responses.create(model="ok", input=[{"role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": f"data:image/png;base64,{png}"}]}])
    assert caught.value.param == "input[0].content[1]" and caught.value.code == "unsupported_content_part"


async def test_responses_count_against_the_keys_rate_limit(
    sdk: openai.AsyncOpenAI, org: Organization, fresh_rate_window: None
) -> None:
    _, raw = await sync_to_async(apikey_create)(organization=org, name="rpm", rpm_limit=2)
    from platform_site.asgi import application

    limited = openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key=raw, max_retries=0,
                                 http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=application)))
    first = await limited.responses.with_raw_response.create(model="ok", input="x")
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    started = await limited.responses.create(model="ok", input="x", background=True)
    with pytest.raises(openai.RateLimitError) as caught:
        await limited.responses.create(model="ok", input="x", background=True)
    assert caught.value.response.headers.get("retry-after")
    await limited.close()
    # The run must end inside this test: its last writes, left to a thread after the test, would lock the next
    # test's first write out of SQLite's shared in-memory database.
    await _until(sdk, started.id, ("completed",))


async def test_logprobs_are_included_when_asked(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(model=GEMMA, input="Say hello", max_output_tokens=16, temperature=0,
                                          include=["message.output_text.logprobs"], top_logprobs=2)
    part = response.output[0].content[0]  # type: ignore[union-attr]
    assert part.logprobs and len(part.logprobs) == response.usage.output_tokens  # type: ignore[union-attr]
    assert len(part.logprobs[0].top_logprobs) == 2


async def test_an_unstored_response_still_adds_to_its_conversation(
    sdk: openai.AsyncOpenAI, upstream: tuple[int, Any]
) -> None:
    conversation = await sdk.conversations.create()
    await sdk.responses.create(model="ok", input="remember", conversation=conversation.id, store=False)
    items = await sdk.conversations.items.list(conversation.id, order="asc")
    assert [getattr(item, "role", None) for item in items.data] == ["user", "assistant"]


async def test_stored_responses_expire_and_are_purged(sdk: openai.AsyncOpenAI, settings: Any) -> None:
    from django.core.management import call_command
    from django.utils import timezone

    old = await sdk.responses.create(model="ok", input="x")
    kept = await sdk.responses.create(model="ok", input="y")
    await sync_to_async(StoredResponse.objects.filter(id=old.id).update)(
        created_at=timezone.now() - timezone.timedelta(days=settings.KEYWAY_RESPONSES_RETENTION_DAYS, seconds=1))
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(old.id)
    with pytest.raises(openai.BadRequestError):
        await sdk.responses.create(model="ok", input="z", previous_response_id=old.id)
    await sync_to_async(call_command)("purge_responses", verbosity=0)
    assert await sync_to_async(list)(StoredResponse.objects.values_list("id", flat=True)) == [kept.id]


async def test_bad_query_parameters_of_the_read_routes_get_a_400_naming_them(
    sdk: openai.AsyncOpenAI, api_key: tuple[ApiKey, str]
) -> None:
    from platform_site.asgi import application

    response = await sdk.responses.create(model="ok", input="x")
    conversation = await sdk.conversations.create()
    cases = [
        (f"/v1/responses/{response.id}/input_items?limit=0", 400, "limit"),
        (f"/v1/responses/{response.id}/input_items?limit=abc", 400, "limit"),
        (f"/v1/responses/{response.id}/input_items?limit=99999999999999999999", 400, "limit"),
        (f"/v1/responses/{response.id}/input_items?order=sideways", 400, "order"),
        (f"/v1/responses/{response.id}/input_items?after=msg_nope", 404, "after"),
        (f"/v1/responses/{response.id}?stream=true&starting_after=abc", 400, "starting_after"),
        (f"/v1/conversations/{conversation.id}/items?limit=101", 400, "limit"),
        (f"/v1/conversations/{conversation.id}/items?after=msg_nope", 404, "after"),
        ("/v1/responses/" + "r" * 5000, 404, "response_id"),
    ]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://127.0.0.1") as c:
        for path, status, param in cases:
            answer = await c.get(path, headers=bearer(api_key[1]))
            assert (answer.status_code, answer.json()["error"]["param"]) == (status, param), (path, answer.text)
        for body in ({"metadata": "x"}, {"metadata": {"k": "v" * 600}}, {"items": "x"}, {"frobnicate": 1}):
            answer = await c.post("/v1/conversations", json=body, headers=bearer(api_key[1]))
            assert answer.status_code == 400 and answer.json()["error"]["param"], (body, answer.text)
