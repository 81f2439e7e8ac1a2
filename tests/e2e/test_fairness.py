"""Sharing the embedded model between tenants, against a real server process and the real Gemma model.

One key keeps three long streams running; another organization's short request must still be answered
within seconds (before slots it waited for all three, first come first served), and the long streams keep
producing meanwhile. A second server with tight limits shows the refusals: a key that queues too much gets
429 with Retry-After, and a request asking for more output than the model gives one request gets 400.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.e2e import server

# How the embedded model's slots are shared: no database or Redis in it, so CI runs it on one leg only.
pytestmark = [pytest.mark.e2e, pytest.mark.embedded_model]

LONG = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
SHORT = [{"role": "user", "content": "Say hello."}]


def _stack(var_dir: Any, **settings: str) -> Iterator[dict[str, Any]]:
    env, database = server.make_environment(var_dir)
    env.update(settings)
    process = None
    try:
        server.manage(env, "bootstrap")
        server.manage(env, "createorg", "Other", "--slug", "other")
        keys = {
            "a": server.manage(env, "createapikey", "demo", "--name", "long").strip(),
            "a2": server.manage(env, "createapikey", "demo", "--name", "long too").strip(),
            "b": server.manage(env, "createapikey", "other", "--name", "short").strip(),
        }
        process, url = server.start_keyway(env, var_dir / "server.log")
        yield {"url": url, "keys": keys}
    finally:
        if process is not None:
            server.stop(process)
        server.drop_database(database)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from _stack(tmp_path_factory.mktemp("keyway-fair"))


def _client(stack: dict[str, Any], key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack['url']}/v1", api_key=stack["keys"][key], max_retries=0,
                              timeout=120)


async def _long_stream(client: openai.AsyncOpenAI, seed: int, arrivals: list[float]) -> None:
    stream = await client.chat.completions.create(
        model="gemma-3-270m", messages=LONG, max_tokens=300, seed=seed, temperature=1.0, stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())


def _rate(arrivals: list[list[float]], start: float, end: float) -> float:
    return sum(1 for stream in arrivals for moment in stream if start <= moment < end) / (end - start)


def test_a_short_request_is_not_stuck_behind_another_tenants_long_streams(stack: dict[str, Any]) -> None:
    async def scenario() -> tuple[float, float, float, list[list[float]]]:
        long_client, short_client = _client(stack, "a"), _client(stack, "b")
        # Load the model first, so the figures below are generation only.
        await short_client.chat.completions.create(model="gemma-3-270m", messages=SHORT, max_tokens=1)
        arrivals: list[list[float]] = [[], [], []]
        streams = [asyncio.create_task(_long_stream(long_client, seed, arrivals[seed])) for seed in range(3)]
        while not all(arrivals):
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)
        began = time.monotonic()
        reply = await short_client.chat.completions.create(
            model="gemma-3-270m", messages=SHORT, max_tokens=5, seed=1
        )
        answered = time.monotonic()
        assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 5
        alone = _rate(arrivals, began - 2.0, began)
        beside = _rate(arrivals, began, answered)
        await asyncio.gather(*streams)
        return answered - began, alone, beside, arrivals

    waited, alone, beside, arrivals = asyncio.run(scenario())
    print(f"\nshort request answered in {waited:.2f} s; the three long streams: {alone:.1f} tokens/s alone, "
          f"{beside:.1f} tokens/s beside it")
    assert waited < 5.0
    # The long streams were not starved meanwhile: each produced while the short request ran.
    assert beside > 0 and all(len(stream) > 20 for stream in arrivals)


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from _stack(
        tmp_path_factory.mktemp("keyway-tight"),
        KEYWAY_LLAMA_MAX_PER_KEY="1", KEYWAY_LLAMA_QUEUE_PER_KEY="1", KEYWAY_LLAMA_MAX_OUTPUT_TOKENS="64",
    )


def test_a_key_that_queues_too_much_is_told_to_retry_and_others_still_get_in(tight: dict[str, Any]) -> None:
    async def scenario() -> tuple[list[Any], Any]:
        greedy, other = _client(tight, "a"), _client(tight, "b")
        await other.chat.completions.create(model="gemma-3-270m", messages=SHORT, max_tokens=1)

        async def one() -> Any:
            try:
                return await greedy.chat.completions.create(model="gemma-3-270m", messages=LONG, max_tokens=40)
            except openai.APIStatusError as error:
                return error

        results = await asyncio.gather(*(one() for _ in range(5)), asyncio.sleep(0.3))
        polite = await other.chat.completions.create(model="gemma-3-270m", messages=SHORT, max_tokens=2)
        return list(results[:5]), polite

    results, polite = asyncio.run(scenario())
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    # One runs, one waits; the other three are the key's own excess.
    assert len(refused) == 3
    for error in refused:
        assert error.status_code == 429 and error.code == "rate_limit_exceeded"
        assert int(error.response.headers["retry-after"]) >= 1
    assert polite.usage is not None


def test_more_output_than_one_request_may_have_is_a_400_naming_the_parameter(tight: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=f"{tight['url']}/v1", api_key=tight["keys"]["a2"], max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gemma-3-270m", messages=SHORT, n=2, max_tokens=40)
    assert refused.value.code == "invalid_value"
    assert refused.value.param == "max_tokens" and "64" in refused.value.message
