"""The embedded llama.cpp provider on the real Gemma 3 270M. Structure, limits and determinism, not wisdom."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from asgiref.sync import sync_to_async

from apikeys.models import ApiKey
from completions.providers import llamacpp
from completions.providers.base import ChatCall, ProviderConfig
from completions.services import GEMMA_PACKAGE

# The embedded model's own behaviour: it touches no database or Redis, so CI runs it on one leg only.
pytestmark = pytest.mark.embedded_model

PROVIDER = llamacpp.LlamaCppProvider(ProviderConfig(name="local", kind="llamacpp"))


def call(content: str = "Name a colour.", **options: Any) -> ChatCall:
    """A call as the engine hands it over: the wire body, and the parsed output limit and choice count."""
    body = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": content}], **options}
    return ChatCall(upstream_model=GEMMA_PACKAGE, body=body, request_id="req_test",
                    max_tokens=options.get("max_tokens"), n=options.get("n", 1))


async def test_same_seed_gives_the_same_answer_and_max_tokens_is_a_hard_limit() -> None:
    first = await PROVIDER.chat(call(max_tokens=6, seed=7, temperature=0.8))
    second = await PROVIDER.chat(call(max_tokens=6, seed=7, temperature=0.8))
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    assert first["usage"]["completion_tokens"] <= 6
    assert first["choices"][0]["finish_reason"] in ("length", "stop")


async def test_stream_reports_the_same_usage_as_the_plain_call() -> None:
    plain = await PROVIDER.chat(call(max_tokens=5, seed=3, temperature=0))
    batches = [batch async for batch in PROVIDER.chat_stream(call(max_tokens=5, seed=3, temperature=0))]
    assert all(batches)  # a batch is never empty
    chunks = [chunk for batch in batches for chunk in batch]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


async def test_system_messages_reach_the_model() -> None:
    with_system = call(max_tokens=3, seed=1, temperature=0)
    with_system.body["messages"].insert(0, {"role": "system", "content": "Answer only in French."})
    result = await PROVIDER.chat(with_system)
    assert result["usage"]["prompt_tokens"] > (await PROVIDER.chat(call(max_tokens=3, seed=1)))["usage"][
        "prompt_tokens"
    ]


async def test_concurrent_requests_queue_instead_of_crashing() -> None:
    results = await asyncio.gather(*(PROVIDER.chat(call(f"Count to {n}.", max_tokens=4, seed=n)) for n in range(4)))
    assert all(r["usage"]["completion_tokens"] >= 1 for r in results)


async def test_a_client_that_goes_away_stops_its_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    meters: list[llamacpp._Meter] = []
    original = llamacpp._Meter

    def recording_meter(*args: Any, **kwargs: Any) -> llamacpp._Meter:
        meters.append(original(*args, **kwargs))
        return meters[-1]

    monkeypatch.setattr(llamacpp, "_Meter", recording_meter)
    stream = PROVIDER.chat_stream(call("Tell a very long story.", max_tokens=400, seed=5))
    for _ in range(3):
        await anext(stream)
    await stream.aclose()
    loaded = llamacpp.models.get_sync(GEMMA_PACKAGE)
    # Once the model's slots are idle again, the abandoned generation must have stopped early.
    for _ in range(200):
        if loaded.slots.depth() == (0, 0):
            break
        await asyncio.sleep(0.05)
    assert loaded.slots.depth() == (0, 0)
    assert meters[0].cancel.is_set()
    assert meters[0].completion_tokens < 100


@pytest.fixture
def sdk(sdk: openai.AsyncOpenAI, default_model: None) -> openai.AsyncOpenAI:
    return sdk


@pytest.mark.django_db(transaction=True)
async def test_chat_through_the_api_matches_the_openai_schema(sdk: openai.AsyncOpenAI, validate_schema) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "Hello"}], max_tokens=4, seed=11
    )
    validate_schema("CreateChatCompletionResponse", raw.http_response.json())
    completion = raw.parse()
    assert completion.model == "gemma-3-270m" and completion.usage is not None
    assert completion.usage.completion_tokens <= 4


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.django_db(transaction=True)
async def test_json_schema_output_is_enforced_and_parses_with_the_sdk(sdk: openai.AsyncOpenAI) -> None:
    import jsonschema
    from pydantic import BaseModel

    completion = await sdk.chat.completions.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=60,
        seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    )
    jsonschema.validate(json.loads(completion.choices[0].message.content or ""), PERSON)

    class Person(BaseModel):
        name: str
        age: int

    parsed = await sdk.chat.completions.parse(
        model="gemma-3-270m", messages=[{"role": "user", "content": "A person."}], max_tokens=60, seed=4,
        response_format=Person,
    )
    assert isinstance(parsed.choices[0].message.parsed, Person)


@pytest.mark.django_db(transaction=True)
async def test_json_object_and_legacy_json_formats_give_json(sdk: openai.AsyncOpenAI) -> None:
    import jsonschema

    plain = await sdk.chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "JSON please."}], max_tokens=40, seed=1,
        response_format={"type": "json_object"},
    )
    if plain.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(plain.choices[0].message.content or ""), dict | list)
    legacy = await sdk.chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "A person."}], max_tokens=60, seed=3,
        response_format={"type": "json", "schema": PERSON},  # type: ignore[arg-type,typeddict-item]
    )
    jsonschema.validate(json.loads(legacy.choices[0].message.content or ""), PERSON)


@pytest.mark.django_db(transaction=True)
async def test_tools_are_refused_by_a_model_without_the_capability(sdk: openai.AsyncOpenAI) -> None:
    from completions.models import Deployment, Model, Provider

    def text_only_model() -> None:
        model = Model.objects.create(public_id="text-only", capabilities=["chat"])
        local = Provider.objects.get(name="local")
        Deployment.objects.create(model=model, provider=local, upstream_model=GEMMA_PACKAGE)

    await sync_to_async(text_only_model)()
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(
            model="text-only", messages=[{"role": "user", "content": "time?"}], tools=[tool]  # type: ignore[list-item]
        )
    assert caught.value.code == "unsupported_parameter" and caught.value.param == "tools"  # type: ignore[attr-defined]


async def test_n_choices_differ_by_seed_and_share_one_prompt_in_usage() -> None:
    result = await PROVIDER.chat(call(max_tokens=5, seed=9, temperature=1.0, n=3))
    assert [choice["index"] for choice in result["choices"]] == [0, 1, 2]
    single = await PROVIDER.chat(call(max_tokens=5, seed=9, temperature=1.0))
    assert result["choices"][0]["message"]["content"] == single["choices"][0]["message"]["content"]
    assert result["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    assert result["usage"]["completion_tokens"] <= 15


async def test_logprobs_cover_every_completion_token_with_sorted_alternatives() -> None:
    result = await PROVIDER.chat(call(max_tokens=6, seed=1, temperature=0, logprobs=True, top_logprobs=3))
    content = result["choices"][0]["logprobs"]["content"]
    assert len(content) == result["usage"]["completion_tokens"]
    text = result["choices"][0]["message"]["content"]
    assert "".join(entry["token"] for entry in content) == text
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        alternatives = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert alternatives == sorted(alternatives, reverse=True)
        # At temperature 0 the chosen token is the most likely one.
        assert entry["token"] == entry["top_logprobs"][0]["token"]
        assert bytes(entry["bytes"]).decode("utf-8", errors="replace") == entry["token"]


@pytest.mark.django_db(transaction=True)
async def test_stream_with_n_and_logprobs_through_the_sdk(sdk: openai.AsyncOpenAI, validate_schema) -> None:
    stream = await sdk.chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, seed=5, n=2,
        logprobs=True, top_logprobs=2, stream=True,
    )
    roles: dict[int, list[str]] = {0: [], 1: []}
    tokens: dict[int, int] = {0: 0, 1: 0}
    async for chunk in stream:
        validate_schema("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
        for choice in chunk.choices:
            if choice.delta.role:
                roles[choice.index].append(choice.delta.role)
            if choice.logprobs and choice.logprobs.content:
                assert all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)
                tokens[choice.index] += len(choice.logprobs.content)
    assert roles == {0: ["assistant"], 1: ["assistant"]}
    assert tokens[0] >= 1 and tokens[1] >= 1
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, seed=5, logprobs=True,
        top_logprobs=2,
    )
    validate_schema("CreateChatCompletionResponse", raw.http_response.json())


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}}, "required": ["zone"],
    "additionalProperties": False}}}
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def assert_valid_calls(calls: Any) -> list[str]:
    import jsonschema

    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return [call.function.name for call in calls]


@pytest.mark.django_db(transaction=True)
async def test_required_tool_calls_are_valid_for_their_schemas(sdk: openai.AsyncOpenAI, validate_schema) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gemma-3-270m", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", seed=3,  # type: ignore[list-item]
        max_tokens=80,
    )
    validate_schema("CreateChatCompletionResponse", raw.http_response.json())
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert set(assert_valid_calls(choice.message.tool_calls)) <= {"get_weather", "get_time"}


@pytest.mark.django_db(transaction=True)
async def test_a_named_function_is_the_one_called_and_parallel_false_gives_one_call(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="gemma-3-270m", messages=ASK, tools=[WEATHER, TIME], seed=5, max_tokens=80,  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False,
    )
    assert assert_valid_calls(completion.choices[0].message.tool_calls) == ["get_time"]


@pytest.mark.django_db(transaction=True)
async def test_auto_either_answers_or_calls_validly(sdk: openai.AsyncOpenAI) -> None:
    for seed in (1, 2, 3):
        choice = (await sdk.chat.completions.create(
            model="gemma-3-270m", messages=ASK, tools=[WEATHER], seed=seed, max_tokens=40,  # type: ignore[list-item]
        )).choices[0]
        if choice.finish_reason == "tool_calls":
            assert set(assert_valid_calls(choice.message.tool_calls)) == {"get_weather"}
        else:
            assert choice.message.tool_calls is None and isinstance(choice.message.content, str)


@pytest.mark.django_db(transaction=True)
async def test_stream_helper_accumulates_tool_calls_and_parses_strict_pydantic_tools(sdk: openai.AsyncOpenAI) -> None:
    from pydantic import BaseModel

    async with sdk.chat.completions.stream(
        model="gemma-3-270m", messages=ASK, tools=[WEATHER], tool_choice="required", seed=7, max_tokens=120,  # type: ignore[list-item]
        parallel_tool_calls=False,
    ) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert assert_valid_calls(final.choices[0].message.tool_calls)

    class GetWeather(BaseModel):
        city: str

    # A strict pydantic tool has no length limits on its strings; one call and room to finish it keep a small
    # base model from running into max_tokens.
    parsed = await sdk.chat.completions.parse(
        model="gemma-3-270m", messages=ASK, tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required", parallel_tool_calls=False, seed=2, max_tokens=150,
    )
    call = (parsed.choices[0].message.tool_calls or [])[0]
    assert isinstance(call.function.parsed_arguments, GetWeather)


@pytest.mark.django_db(transaction=True)
async def test_tool_results_in_history_reach_the_model(sdk: openai.AsyncOpenAI) -> None:
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    without = await sdk.chat.completions.create(model="gemma-3-270m", messages=ASK, max_tokens=2, seed=1)
    answer = await sdk.chat.completions.create(
        model="gemma-3-270m", messages=history, tools=[WEATHER], tool_choice="none", max_tokens=8, seed=1,  # type: ignore[arg-type,list-item]
    )
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.tool_calls is None
    assert answer.usage and without.usage and answer.usage.prompt_tokens > without.usage.prompt_tokens + 10


async def test_stop_sequences_end_the_answer_without_being_included() -> None:
    free = await PROVIDER.chat(call("Count: one two three four", max_tokens=12, seed=1, temperature=0))
    text = free["choices"][0]["message"]["content"]
    words = text.split()
    assert len(words) >= 2, text
    stop = words[1]
    stopped = await PROVIDER.chat(call("Count: one two three four", max_tokens=12, seed=1, temperature=0, stop=[stop]))
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stop not in stopped["choices"][0]["message"]["content"]
    assert text.startswith(stopped["choices"][0]["message"]["content"])


@pytest.mark.django_db(transaction=True)
async def test_a_pinned_organization_model_answers_whatever_the_request_names(
    sdk: openai.AsyncOpenAI, api_key: tuple[ApiKey, str]
) -> None:
    from platform_site.models import Organization

    await sync_to_async(Organization.objects.filter(pk=api_key[0].organization_id).update)(pinned_model="gemma-3-270m")
    reply = await sdk.chat.completions.create(model="anything", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=2)
    assert reply.model == "gemma-3-270m"
    raw = await sdk.chat.completions.with_raw_response.create(
        model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert raw.headers["x-keyway-model"] == "gemma-3-270m"


async def test_a_schema_that_does_not_compile_in_time_is_refused_before_it_takes_a_slot(settings: Any) -> None:
    # Some 50 ms of compiling (the thread switch interval is 5 ms), against a limit of 1 ms.
    settings.KEYWAY_LLAMA_GRAMMAR_TIMEOUT = 0.001
    schema = {"type": "object", "properties": {f"field_{n}": {"type": "string", "pattern": "^[a-z]{1,9}$"}
                                               for n in range(400)}}
    response_format = {"type": "json_schema", "json_schema": {"name": "wide", "schema": schema}}
    with pytest.raises(llamacpp.InvalidForModel) as refused:
        await PROVIDER.chat(call(max_tokens=2, response_format=response_format))
    assert refused.value.status == 400 and refused.value.param == "response_format"
    assert "too complex" in refused.value.message
    assert llamacpp.models.get_sync(GEMMA_PACKAGE).slots.depth() == (0, 0)


async def test_n_times_max_tokens_is_capped_and_without_a_limit_each_choice_gets_its_share(settings: Any) -> None:
    settings.KEYWAY_LLAMA_MAX_OUTPUT_TOKENS = 8
    with pytest.raises(llamacpp.InvalidForModel) as refused:
        await PROVIDER.chat(call(max_tokens=5, n=2))
    assert refused.value.param == "max_tokens"
    result = await PROVIDER.chat(call("Tell a very long story.", n=2, seed=4))
    assert all(choice["finish_reason"] in ("length", "stop") for choice in result["choices"])
    assert result["usage"]["completion_tokens"] <= 8


@pytest.mark.django_db(transaction=True)
async def test_a_generation_stopped_at_the_deployment_timeout_is_charged_what_it_computed(
    sdk: openai.AsyncOpenAI,
) -> None:
    from billing import metering
    from billing.models import UsageEvent
    from completions.engine.catalog import catalog_invalidate
    from completions.models import Provider

    async def provider_timeout(seconds: float | None) -> None:
        await sync_to_async(Provider.objects.filter(kind="llamacpp").update)(timeout_seconds=seconds)
        catalog_invalidate()

    await sdk.chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "Hi"}],
                                      max_tokens=1)  # loaded, so the limit below is spent generating
    # Long enough that even a machine under load has produced a token, far short of 400 tokens' time.
    await provider_timeout(1.5)
    long = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Tell a very long story."}],
            "max_tokens": 400, "seed": 3}
    try:
        with pytest.raises(openai.APIStatusError) as stopped:
            await sdk.chat.completions.create(**long)
        assert stopped.value.status_code == 504 and stopped.value.code == "upstream_timeout"
        with pytest.raises(openai.APIError):  # the stream has begun: the error comes as its last event
            async for _ in await sdk.chat.completions.create(**long, stream=True):
                pass
    finally:
        await provider_timeout(None)
    await metering.flush()
    streamed, plain = await sync_to_async(list)(UsageEvent.objects.order_by("-id").values(
        "status", "prompt_tokens", "completion_tokens")[:2])
    assert plain["status"] == UsageEvent.Status.ERROR
    assert streamed["status"] == UsageEvent.Status.INCOMPLETE
    for row in (plain, streamed):
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0, row


async def test_a_long_prompt_is_evaluated_in_turns_and_does_not_hold_up_a_short_request() -> None:
    """A 2,700-token prompt takes ~10 s to evaluate here. Evaluated in one step, it held every other slot for
    all of it, and a short request started beside it finished after it; in turns, the short one is done
    long before."""
    finished: list[str] = []
    long_prompt = " ".join(f"word{n}" for n in range(700))

    async def run(name: str, content: str, key: str, delay: float) -> None:
        await asyncio.sleep(delay)
        request = call(content, max_tokens=3, seed=1)
        request.key = request.organization = key
        await PROVIDER.chat(request)
        finished.append(name)

    await PROVIDER.chat(call(max_tokens=1))  # loaded
    await asyncio.gather(run("long", long_prompt, "a", 0), run("short", "Say hello.", "b", 0.3))
    assert finished == ["short", "long"]


def conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a terse assistant for a shipping company."}]
    for turn in range(turns):
        messages += [{"role": "user", "content": f"Where is parcel {turn}? " + "It left the depot on Monday. " * 6},
                     {"role": "assistant", "content": f"Parcel {turn} is in transit."}]
    return messages


async def test_a_prompt_reuses_what_the_last_one_left_and_answers_as_a_fresh_instance_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The next turn of a conversation evaluates only what its last turn did not, and the same prompt again
    nothing (its last token's logits are kept); a fixed seed gives the same answer as on an instance that holds
    nothing."""
    await PROVIDER.chat(call(max_tokens=1))  # loaded
    loaded = llamacpp.models.items()[GEMMA_PACKAGE]
    evaluated: list[int] = []
    from llama_cpp import Llama

    real_eval = Llama.eval
    monkeypatch.setattr(Llama, "eval", lambda self, tokens: (evaluated.append(len(tokens)), real_eval(self, tokens))[1])

    def turn(turns: int) -> ChatCall:
        request = call(max_tokens=5, seed=11, temperature=0.9)
        request.body["messages"] = [*conversation(turns), {"role": "user", "content": "And the next one?"}]
        return request

    def forget_everything() -> None:
        for instance in loaded.instances:
            llamacpp._forget_prompt(instance)

    async def answer(request: ChatCall) -> tuple[str, int, int]:
        """(the answer, its prompt tokens, the prompt tokens evaluated: each generated token but the last is
        evaluated too)."""
        evaluated.clear()
        result = await PROVIDER.chat(request)
        usage = result["usage"]
        return (result["choices"][0]["message"]["content"], usage["prompt_tokens"],
                sum(evaluated) - (usage["completion_tokens"] - 1))

    forget_everything()
    await answer(turn(3))
    warm, prompt_tokens, warm_cost = await answer(turn(4))
    again, _, again_cost = await answer(turn(4))
    forget_everything()
    cold, _, cold_cost = await answer(turn(4))

    assert cold_cost == prompt_tokens > 250
    assert warm_cost < prompt_tokens // 2  # the first three turns came from the cache
    assert again_cost == 0  # the same prompt: its logits were kept
    assert warm == again == cold


async def test_a_repeated_prompt_samples_from_kept_logits_exactly_as_a_cold_instance_does() -> None:
    """The same prompt again is answered from the logits its last evaluation left (written back into llama.cpp's
    buffer): its logprobs and answer are those of an instance that holds nothing, and a different prompt in
    between is not answered from them."""
    await PROVIDER.chat(call(max_tokens=1))  # loaded
    loaded = llamacpp.models.items()[GEMMA_PACKAGE]

    def forget_everything() -> None:
        for instance in loaded.instances:
            llamacpp._forget_prompt(instance)

    async def answer(content: str) -> tuple[str, list[tuple[str, float]]]:
        result = await PROVIDER.chat(call(content, max_tokens=4, seed=3, temperature=0.8, logprobs=True,
                                          top_logprobs=2))
        choice = result["choices"][0]
        return choice["message"]["content"], [(entry["token"], entry["logprob"])
                                              for entry in choice["logprobs"]["content"]]

    forget_everything()
    cold = await answer("Name a colour.")
    other_cold = await answer("Name a river.")
    assert await answer("Name a colour.") == cold  # the instance held "a river" in between: evaluated again
    assert await answer("Name a colour.") == cold  # the same prompt again: from the kept logits
    assert await answer("Name a river.") == other_cold
    assert any(instance.prompt_logits is not None for instance in loaded.instances)
