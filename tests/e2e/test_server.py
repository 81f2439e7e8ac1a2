"""End to end: `bootstrap` as `make run` does it, a real daphne process, the official openai SDK (sync and
async, stream and not) against the real Gemma model, and through `openai_compatible` against llama.cpp's
own OpenAI server on loopback."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from completions.providers.llamacpp import resolve_model_path
from completions.services import GEMMA_PACKAGE
from tests.e2e import server

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    var_dir = tmp_path_factory.mktemp("keyway-var")
    log = var_dir / "servers.log"
    env, database = server.make_environment(var_dir)
    processes = []
    try:
        model_path = resolve_model_path(GEMMA_PACKAGE)
        upstream, upstream_url = server.start_llama_server(model_path, log, alias="gemma-upstream")
        processes.append(upstream)
        env.update(
            KEYWAY_UPSTREAM_BASE_URL=f"{upstream_url}/v1",
            KEYWAY_UPSTREAM_NAME="llamacpp-server",
            KEYWAY_UPSTREAM_MODELS="gemma-upstream",
        )
        server.manage(env, "migrate", "--no-input", "-v", "0")
        first = server.manage(env, "bootstrap")
        second = server.manage(env, "bootstrap")
        keyway, url = server.start_keyway(env, log)
        processes.append(keyway)
        yield {"env": env, "url": url, "bootstrap": (first, second), "log": log, "var_dir": var_dir}
    finally:
        for process in processes:
            server.stop(process)
        server.drop_database(database)


def demo_key(stack: dict[str, Any]) -> str:
    match = re.search(r"sk-kw-[a-z0-9]+-[A-Za-z0-9]+", stack["bootstrap"][0])
    assert match, stack["bootstrap"][0]
    return match.group(0)


def test_bootstrap_prints_a_key_and_snippet_once(stack: dict[str, Any]) -> None:
    first, second = stack["bootstrap"]
    assert "OpenAI(base_url=" in first and demo_key(stack) in first
    assert "sk-kw-" not in second


def test_readme_snippet_works_against_the_running_server(stack: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=f"{stack['url']}/v1", api_key=demo_key(stack))
    reply = client.chat.completions.create(model="gemma-3-270m", messages=MESSAGES, max_tokens=8, seed=1)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 8
    assert reply._request_id and reply._request_id.startswith("req_")  # type: ignore[attr-defined]


@pytest.mark.parametrize("model", ["gemma-3-270m", "gemma-upstream"])
def test_sync_sdk_json_and_stream_match_the_openai_schemas(stack: dict[str, Any], model: str, validate_schema) -> None:
    client = openai.OpenAI(base_url=f"{stack['url']}/v1", api_key=demo_key(stack))
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=6, seed=42, temperature=0.7
    )
    body = raw.http_response.json()
    validate_schema("CreateChatCompletionResponse", body)
    assert body["model"] == model and raw.headers["x-keyway-model"] == model

    with client.chat.completions.with_streaming_response.create(
        model=model, messages=MESSAGES, max_tokens=6, seed=42, temperature=0.7, stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    for chunk in chunks:
        validate_schema("CreateChatCompletionStreamResponse", chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    if model == "gemma-3-270m":
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 6
    else:
        # llama_cpp.server reports no usage in streams, and the gateway never invents numbers; counting with
        # the model's tokenizer is the metering issue's job.
        content_chunks = [c for c in chunks if c["choices"]]
        assert content_chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    # Same seed, same sampling: the stream says what the JSON answer said.
    assert streamed == body["choices"][0]["message"]["content"]


async def test_async_sdk_json_and_stream(stack: dict[str, Any]) -> None:
    async with openai.AsyncOpenAI(base_url=f"{stack['url']}/v1", api_key=demo_key(stack)) as client:
        for model in ("gemma-3-270m", "gemma-upstream"):
            reply = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, seed=3)
            assert reply.model == model and reply.choices[0].finish_reason in ("stop", "length")
            stream = await client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=4, seed=3, stream=True
            )
            chunks = [chunk async for chunk in stream]
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            assert all(chunk.usage is None for chunk in chunks)
            models = await client.models.list()
            assert {m.id for m in models.data} == {"gemma-3-270m", "gemma-upstream", "all-minilm-l6-v2"}
        embedded = await client.embeddings.create(model="all-minilm-l6-v2", input=["one", "two"])
        assert [len(item.embedding) for item in embedded.data] == [384, 384]


def test_revoked_key_is_refused_within_a_second(stack: dict[str, Any]) -> None:
    key = server.manage(stack["env"], "createapikey", "demo", "--name", "to-revoke").strip()
    client = openai.OpenAI(base_url=f"{stack['url']}/v1", api_key=key, max_retries=0)
    assert client.models.list().data  # the key is now cached by the server
    server.manage(stack["env"], "revokeapikey", key)
    revoked_at = time.monotonic()
    while True:
        try:
            client.models.list()
        except openai.AuthenticationError as error:
            assert error.code == "invalid_api_key"
            break
        assert time.monotonic() - revoked_at < 1.0, "a revoked key still worked after a second"
        time.sleep(0.05)


def test_client_disconnect_ends_the_stream_on_the_server(stack: dict[str, Any]) -> None:
    key = demo_key(stack)
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 400, "stream": True}
    with httpx2.stream("POST", f"{stack['url']}/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 5
    staff = server.staff_cookies(stack["env"])
    while True:
        status = httpx2.get(f"{stack['url']}/status", cookies=staff).json()
        if status["open_streams"] == 0:
            break
        assert time.monotonic() < deadline, "the server kept generating for a client that had gone"
        time.sleep(0.1)
    # The model is free again at once: a short request does not wait behind the 400 abandoned tokens.
    started = time.monotonic()
    client = openai.OpenAI(base_url=f"{stack['url']}/v1", api_key=key)
    client.chat.completions.create(model="gemma-3-270m", messages=MESSAGES, max_tokens=2)
    assert status["loaded_models"] and time.monotonic() - started < 8


@pytest.mark.skipif(not server.os.environ.get("REDIS_URL"), reason="needs REDIS_URL: workers share keys via Redis")
def test_revocation_reaches_every_worker_process_within_a_second(stack: dict[str, Any]) -> None:
    second, second_url = server.start_keyway(stack["env"], Path(stack["log"]))
    try:
        key = server.manage(stack["env"], "createapikey", "demo", "--name", "multi").strip()
        clients = [openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
                   for url in (stack["url"], second_url)]
        for client in clients:
            assert client.models.list().data
        server.manage(stack["env"], "revokeapikey", key)
        revoked_at = time.monotonic()
        pending = list(clients)
        while pending:
            for client in list(pending):
                try:
                    client.models.list()
                except openai.AuthenticationError:
                    pending.remove(client)
            assert time.monotonic() - revoked_at < 1.0, f"{len(pending)} worker(s) still accepted a revoked key"
            time.sleep(0.05)
    finally:
        server.stop(second)


@pytest.mark.skipif(not server.os.environ.get("REDIS_URL"), reason="needs REDIS_URL: limits are shared via Redis")
def test_an_rpm_limit_holds_across_two_server_processes(stack: dict[str, Any]) -> None:
    second, second_url = server.start_keyway(stack["env"], Path(stack["log"]))
    try:
        key = server.manage(stack["env"], "createapikey", "demo", "--name", "rpm20", "--rpm", "20").strip()
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "all-minilm-l6-v2", "input": "x"}

        def probe(url: str) -> httpx2.Response:
            return httpx2.post(f"{url}/v1/embeddings", json=body, headers=headers, timeout=30)

        first = probe(stack["url"])
        reset = first.headers["x-ratelimit-reset-requests"]
        seconds = float(reset[:-2]) / 1000 if reset.endswith("ms") else float(reset.rstrip("s").split("m")[-1])
        if seconds < 10:
            # Too close to the end of the window for 40 requests to land in it: start in the next one.
            time.sleep(seconds + 0.5)
            first = probe(stack["url"])
        assert first.status_code == 200

        async def burst() -> list[int]:
            async with httpx2.AsyncClient(timeout=30) as client:
                urls = [stack["url"], second_url] * 20
                responses = await asyncio.gather(*(
                    client.post(f"{url}/v1/embeddings", json=body, headers=headers) for url in urls[:39]
                ))
            return [response.status_code for response in responses]

        statuses = asyncio.run(burst())
        assert statuses.count(200) == 19, statuses  # 20 with the probe, not 40
        assert statuses.count(429) == 20
    finally:
        server.stop(second)
