"""The HTTP provider against a real fake upstream on loopback, driven by the official SDK in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

import openai
import pytest
from asgiref.sync import sync_to_async

from apikeys.models import ApiKey
from bench import fake_upstream
from billing import metering
from billing.models import UsageEvent
from completions.models import Provider
from completions.providers.openai_compatible import upstream_gates
from completions.services import provider_upsert_openai_compatible

pytestmark = pytest.mark.django_db(transaction=True)

MODELS = ["ok", "slow", "http500", "http429", "http400", "http401", "badjson", "stream-break", "no-usage"]


@pytest.fixture
async def sdk(sdk: openai.AsyncOpenAI, upstream: tuple[int, Any]) -> openai.AsyncOpenAI:
    port, _ = upstream
    await sync_to_async(provider_upsert_openai_compatible)(
        name="fake", base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-upstream-secret", models=MODELS
    )
    await sync_to_async(Provider.objects.filter(name="fake").update)(timeout_seconds=1.0)
    return sdk


MESSAGES = [{"role": "user", "content": "hi"}]


async def test_json_completion_is_proxied_with_our_id_and_public_model(
    sdk: openai.AsyncOpenAI, upstream: tuple[int, Any], validate_schema
) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(model="ok", messages=MESSAGES)
    body = raw.http_response.json()
    validate_schema("CreateChatCompletionResponse", body)
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from the fake upstream."
    assert completion.id.startswith("chatcmpl-") and completion.id != "chatcmpl-upstream"
    assert completion.usage is not None and completion.usage.total_tokens == 16
    assert raw.headers["x-keyway-provider"] == "fake" and raw.headers["x-keyway-model"] == "ok"
    seen = upstream[1][fake_upstream.SEEN][-1]
    assert seen["model"] == "ok" and seen["messages"] == MESSAGES


async def test_stream_is_reframed_and_usage_only_sent_when_asked(
    sdk: openai.AsyncOpenAI, upstream: tuple[int, Any], validate_schema
) -> None:
    chunks = [chunk async for chunk in await sdk.chat.completions.create(model="ok", messages=MESSAGES, stream=True)]
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.choices[0].delta.role is None for chunk in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(f"t{i} " for i in range(20))
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The gateway asks the upstream for usage whatever the client asked, for metering.
    assert upstream[1][fake_upstream.SEEN][-1]["stream_options"] == {"include_usage": True}

    stream = await sdk.chat.completions.create(
        model="ok", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    for chunk in chunks:
        validate_schema("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20


async def test_a_stream_whose_upstream_reports_no_usage_ends_with_the_usage_it_was_charged_for(
    sdk: openai.AsyncOpenAI, validate_schema
) -> None:
    stream = await sdk.chat.completions.create(
        model="no-usage", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    validate_schema("CreateChatCompletionStreamResponse", chunks[-1].model_dump(exclude_unset=True))
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    await metering.flush()
    event = await UsageEvent.objects.filter(model="no-usage").afirst()
    assert event is not None and event.usage_source == UsageEvent.UsageSource.ESTIMATED  # no tokenizer for it
    assert (event.prompt_tokens, event.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)


async def test_stream_helper_of_the_sdk_accumulates_one_role(sdk: openai.AsyncOpenAI) -> None:
    async with sdk.chat.completions.stream(model="ok", messages=MESSAGES) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.role == "assistant"
    assert final.choices[0].message.content == "".join(f"t{i} " for i in range(20))


@pytest.mark.parametrize(
    ("model", "error_class", "status", "code"),
    [
        ("http500", openai.InternalServerError, 502, "upstream_error"),
        ("badjson", openai.InternalServerError, 502, "upstream_error"),
        ("http401", openai.InternalServerError, 502, "upstream_error"),
        ("http400", openai.BadRequestError, 400, "fake_400"),
        ("http429", openai.RateLimitError, 429, "fake_429"),
        ("slow", openai.InternalServerError, 504, "upstream_timeout"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_failures_become_openai_errors(
    sdk: openai.AsyncOpenAI, model: str, error_class: type, status: int, code: str, stream: bool
) -> None:
    with pytest.raises(error_class) as caught:
        await sdk.chat.completions.create(model=model, messages=MESSAGES, stream=stream)
    assert caught.value.status_code == status  # type: ignore[attr-defined]
    assert caught.value.code == code  # type: ignore[attr-defined]
    assert "sk-upstream-secret" not in str(caught.value.body)  # type: ignore[attr-defined]
    # The upstream's own words reach the client only where the client is at fault (a 4xx).
    passed_on = "fake upstream error" in str(caught.value.body)  # type: ignore[attr-defined]
    assert passed_on == (400 <= status < 500 and status != 504)


async def test_unreachable_upstream_is_a_502(api_key: tuple[ApiKey, str], asgi_client) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    await sync_to_async(provider_upsert_openai_compatible)(
        name="gone", base_url=f"http://127.0.0.1:{closed_port}/v1", models=["gone-model"]
    )
    response = await asgi_client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key[1]}"},
        json={"model": "gone-model", "messages": MESSAGES},
    )
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"


async def test_upstream_that_breaks_mid_stream_ends_with_an_error_event(sdk: openai.AsyncOpenAI) -> None:
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in await sdk.chat.completions.create(model="stream-break", messages=MESSAGES, stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "t0 t1 "
    assert "upstream" in str(caught.value.message).lower()


def test_provider_key_is_encrypted_at_rest(db: None) -> None:
    provider = provider_upsert_openai_compatible(
        name="enc", base_url="http://127.0.0.1:1/v1", api_key="sk-upstream-very-secret", models=[]
    )
    stored = Provider.objects.filter(pk=provider.pk).values_list("api_key_encrypted", flat=True).get()
    assert "sk-upstream-very-secret" not in stored and stored
    assert Provider.objects.get(pk=provider.pk).api_key == "sk-upstream-very-secret"


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


@pytest.fixture
async def tool_sdk(sdk: openai.AsyncOpenAI, upstream: tuple[int, Any]) -> openai.AsyncOpenAI:
    port, _ = upstream
    await sync_to_async(provider_upsert_openai_compatible)(
        name="fake-tools", base_url=f"http://127.0.0.1:{port}/v1",
        models=["tools-split", "tools-repeat", "tools-whole"],
    )
    return sdk


@pytest.mark.parametrize("model", ["tools-split", "tools-repeat", "tools-whole"])
async def test_tool_call_streams_are_reframed_whatever_the_upstream_sent(
    tool_sdk: openai.AsyncOpenAI, upstream: tuple[int, Any], model: str, validate_schema
) -> None:
    async with tool_sdk.chat.completions.stream(
        model=model, messages=[{"role": "user", "content": "Weather and time?"}], tools=TOOLS  # type: ignore[arg-type]
    ) as stream:
        async for event in stream:
            if event.type == "chunk":
                validate_schema("CreateChatCompletionStreamResponse", event.chunk.model_dump(exclude_unset=True))
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.role == "assistant"
    calls = [(c.id, c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
    assert calls == [("call_w", "get_weather", {"city": "Paris"}), ("call_t", "get_time", {})]
    assert upstream[1][fake_upstream.SEEN][-1]["tools"] == TOOLS


async def test_non_streamed_tool_calls_get_string_arguments_and_the_right_finish_reason(
    tool_sdk: openai.AsyncOpenAI, validate_schema
) -> None:
    raw = await tool_sdk.chat.completions.with_raw_response.create(
        model="tools-whole", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS  # type: ignore[arg-type]
    )
    validate_schema("CreateChatCompletionResponse", raw.http_response.json())
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "tool_calls"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[index,union-attr]


async def test_legacy_json_format_reaches_the_upstream_as_json_schema(
    sdk: openai.AsyncOpenAI, upstream: tuple[int, Any]
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    await sdk.chat.completions.create(
        model="ok", messages=MESSAGES, extra_body={"response_format": {"type": "json", "schema": schema, "name": "x"}}
    )
    sent = upstream[1][fake_upstream.SEEN][-1]
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                              "strict": True}}
    await sdk.chat.completions.create(model="ok", messages=MESSAGES, extra_body={"response_format": {"type": "json"}})
    assert upstream[1][fake_upstream.SEEN][-1]["response_format"] == {"type": "json_object"}


async def _held_calls(sdk: openai.AsyncOpenAI, count: int) -> list[asyncio.Task[Any]]:
    """`count` calls to the upstream that does not answer, each holding its place until the provider's 1 s
    timeout ends it."""

    async def hold() -> None:
        with contextlib.suppress(openai.APIStatusError):
            await sdk.chat.completions.create(model="slow", messages=MESSAGES)

    held = [asyncio.create_task(hold()) for _ in range(count)]
    await asyncio.sleep(0.3)
    return held


async def test_a_key_holding_its_share_of_upstream_calls_gets_429_not_a_timeout(
    sdk: openai.AsyncOpenAI, settings: Any
) -> None:
    settings.KEYWAY_UPSTREAM_MAX_PER_KEY = 2
    held = await _held_calls(sdk, 2)
    with pytest.raises(openai.RateLimitError) as refused:
        await sdk.chat.completions.create(model="ok", messages=MESSAGES)
    assert refused.value.code == "rate_limit_exceeded" and refused.value.response.headers["retry-after"] == "1"
    await asyncio.gather(*held)
    # The places are given back when the calls end.
    assert (await sdk.chat.completions.create(model="ok", messages=MESSAGES)).choices


async def test_a_full_upstream_pool_queues_briefly_then_answers_503(sdk: openai.AsyncOpenAI, settings: Any) -> None:
    settings.KEYWAY_UPSTREAM_POOL_SIZE = 2
    settings.KEYWAY_UPSTREAM_POOL_WAIT = 0.2
    await upstream_gates.close_current()  # this loop's gate is made again, with the pool size above
    held = await _held_calls(sdk, 2)
    with pytest.raises(openai.InternalServerError) as refused:
        await sdk.chat.completions.create(model="ok", messages=MESSAGES)
    assert refused.value.status_code == 503 and refused.value.code == "server_overloaded"
    # With a longer bound, a request waits for a place and gets in as soon as one is given back.
    settings.KEYWAY_UPSTREAM_POOL_WAIT = 5.0
    assert (await sdk.chat.completions.create(model="ok", messages=MESSAGES)).choices
    await asyncio.gather(*held)
    await upstream_gates.close_current()
