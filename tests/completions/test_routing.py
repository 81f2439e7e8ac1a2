"""Routing between deployments against two real HTTP upstreams on loopback, one failing in each way."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from asgiref.sync import sync_to_async

from bench import fake_upstream
from completions.models import Model, Provider
from completions.services import deployment_add

pytestmark = pytest.mark.django_db(transaction=True)
MESSAGES = [{"role": "user", "content": "hi"}]


class Upstream:
    def __init__(self, runner: Any, port: int, app: Any) -> None:
        self.runner, self.port, self.app = runner, port, app

    @property
    def calls(self) -> int:
        return len(self.app[fake_upstream.SEEN])


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, Upstream]]:
    started = {name: Upstream(*await fake_upstream.start()) for name in ("a", "b")}
    yield started
    for upstream in started.values():
        await upstream.runner.cleanup()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _route(public_id: str, upstreams: dict[str, Upstream], *deployments: dict[str, Any]) -> None:
    model, _ = Model.objects.get_or_create(public_id=public_id, defaults={"capabilities": ["chat", "embeddings"]})
    for spec in deployments:
        name = spec["provider"]
        port = spec.pop("port", None) or upstreams[name].port
        provider, _ = Provider.objects.update_or_create(
            name=name, defaults={"kind": "openai_compatible", "base_url": f"http://127.0.0.1:{port}/v1"}
        )
        deployment_add(model=model, provider=provider, upstream_model=spec["upstream_model"],
                       weight=spec.get("weight", 1), priority=spec.get("priority", 0),
                       timeout_seconds=spec.get("timeout"))


async def _ask(sdk: openai.AsyncOpenAI, model: str = "routed", **extra: Any) -> Any:
    return await sdk.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, **extra)


async def test_traffic_splits_by_weight_within_a_priority(sdk: openai.AsyncOpenAI, upstreams) -> None:  # type: ignore[no-untyped-def]
    await sync_to_async(_route)("routed", upstreams, {"provider": "a", "upstream_model": "ok", "weight": 3},
                                {"provider": "b", "upstream_model": "ok", "weight": 1})
    await asyncio.gather(*(_ask(sdk) for _ in range(200)))
    share = upstreams["a"].calls / 200
    assert 0.6 < share < 0.9, share


async def test_lower_priority_number_wins_and_the_rest_stay_idle(sdk: openai.AsyncOpenAI, upstreams) -> None:  # type: ignore[no-untyped-def]
    await sync_to_async(_route)("routed", upstreams, {"provider": "a", "upstream_model": "ok", "priority": 1},
                                {"provider": "b", "upstream_model": "ok", "priority": 0})
    for _ in range(10):
        assert (await _ask(sdk)).headers["x-keyway-provider"] == "b"
    assert upstreams["a"].calls == 0


@pytest.mark.parametrize("failure", ["http500", "http429", "badjson", "slow", "closed"])
@pytest.mark.parametrize("stream", [False, True])
async def test_each_kind_of_failure_falls_back_to_the_next_deployment(
    sdk: openai.AsyncOpenAI, upstreams, failure: str, stream: bool  # type: ignore[no-untyped-def]
) -> None:
    primary: dict[str, Any] = {"provider": "a", "upstream_model": failure, "priority": 0, "timeout": 0.5}
    if failure == "closed":
        primary.update(upstream_model="ok", port=_closed_port())
    await sync_to_async(_route)("routed", upstreams, primary, {"provider": "b", "upstream_model": "ok", "priority": 1})
    raw = await _ask(sdk, stream=stream)
    assert raw.headers["x-keyway-provider"] == "b"
    if stream:
        chunks = [chunk async for chunk in raw.parse()]
        assert chunks[-1].choices[0].finish_reason == "stop"
    else:
        assert raw.parse().choices[0].message.content == "Hello from the fake upstream."


async def test_a_client_error_is_not_retried(sdk: openai.AsyncOpenAI, upstreams) -> None:  # type: ignore[no-untyped-def]
    await sync_to_async(_route)("routed", upstreams, {"provider": "a", "upstream_model": "http400", "priority": 0},
                                {"provider": "b", "upstream_model": "ok", "priority": 1})
    with pytest.raises(openai.BadRequestError):
        await _ask(sdk)
    assert upstreams["b"].calls == 0


async def test_no_retry_once_a_stream_has_started(sdk: openai.AsyncOpenAI, upstreams) -> None:  # type: ignore[no-untyped-def]
    await sync_to_async(_route)("routed", upstreams,
                                {"provider": "a", "upstream_model": "stream-break", "priority": 0},
                                {"provider": "b", "upstream_model": "ok", "priority": 1})
    with pytest.raises(openai.APIError):
        async for _ in await sdk.chat.completions.create(model="routed", messages=MESSAGES, stream=True):
            pass
    assert upstreams["b"].calls == 0


async def test_circuit_breaker_takes_a_failing_deployment_out_then_tries_it_again(
    sdk: openai.AsyncOpenAI, upstreams, settings  # type: ignore[no-untyped-def]
) -> None:
    settings.KEYWAY_BREAKER_FAILURES = 3
    settings.KEYWAY_BREAKER_COOLDOWN = 0.3
    await sync_to_async(_route)("routed", upstreams, {"provider": "a", "upstream_model": "http500", "priority": 0},
                                {"provider": "b", "upstream_model": "ok", "priority": 1})
    for _ in range(6):
        assert (await _ask(sdk)).headers["x-keyway-provider"] == "b"
    assert upstreams["a"].calls == 3, "after 3 failures in a row the deployment must sit out"
    await asyncio.sleep(0.35)
    await _ask(sdk)
    assert upstreams["a"].calls == 4, "after the cool-down it gets a trial request"
    await _ask(sdk)
    assert upstreams["a"].calls == 4, "a failed trial opens the circuit again"


async def test_provider_preferences_order_only_ignore_and_no_fallbacks(sdk: openai.AsyncOpenAI, upstreams) -> None:  # type: ignore[no-untyped-def]
    await sync_to_async(_route)("routed", upstreams, {"provider": "a", "upstream_model": "http500", "priority": 0},
                                {"provider": "b", "upstream_model": "ok", "priority": 1})
    ordered = await _ask(sdk, extra_body={"provider": {"order": ["b", "a"]}})
    assert ordered.headers["x-keyway-provider"] == "b" and upstreams["a"].calls == 0
    ignored = await _ask(sdk, extra_body={"provider": {"ignore": ["a"]}})
    assert ignored.headers["x-keyway-provider"] == "b" and upstreams["a"].calls == 0
    with pytest.raises(openai.InternalServerError):
        await _ask(sdk, extra_body={"provider": {"only": ["a"]}})
    with pytest.raises(openai.InternalServerError):
        await _ask(sdk, extra_body={"provider": {"allow_fallbacks": False}})
    with pytest.raises(openai.NotFoundError) as caught:
        await _ask(sdk, extra_body={"provider": {"only": ["nobody"]}})
    assert caught.value.code == "no_deployment_available"
    with pytest.raises(openai.BadRequestError):
        await _ask(sdk, extra_body={"provider": {"order": "b"}})
    # The gateway's own fields never reach an upstream.
    assert all("provider" not in body for body in upstreams["b"].app[fake_upstream.SEEN])


async def test_models_list_falls_back_to_the_next_model(sdk: openai.AsyncOpenAI, upstreams) -> None:  # type: ignore[no-untyped-def]
    await sync_to_async(_route)("broken", upstreams, {"provider": "a", "upstream_model": "http500"})
    await sync_to_async(_route)("spare", upstreams, {"provider": "b", "upstream_model": "ok"})
    raw = await _ask(sdk, model="broken", extra_body={"models": ["spare"]})
    assert raw.parse().model == "spare"
    assert raw.headers["x-keyway-model"] == "spare" and raw.headers["x-keyway-provider"] == "b"
    with pytest.raises(openai.NotFoundError):
        await _ask(sdk, model="broken", extra_body={"models": ["missing-model"]})


async def test_losing_an_upstream_under_load_costs_no_request(sdk: openai.AsyncOpenAI, upstreams) -> None:  # type: ignore[no-untyped-def]
    await sync_to_async(_route)("routed", upstreams, {"provider": "a", "upstream_model": "ok"},
                                {"provider": "b", "upstream_model": "ok"})
    results: list[Any] = []

    async def client(count: int) -> None:
        for _ in range(count):
            results.append(await _ask(sdk))
            await asyncio.sleep(0.005)

    load = asyncio.gather(*(client(25) for _ in range(8)))
    while upstreams["a"].calls < 20:
        await asyncio.sleep(0.01)
    await upstreams["a"].runner.cleanup()  # upstream "a" goes away mid-load
    await load
    assert len(results) == 200 and all(r.http_response.status_code == 200 for r in results)
    assert any(r.headers["x-keyway-provider"] == "a" for r in results)


async def test_embeddings_route_and_fall_back_too(sdk: openai.AsyncOpenAI, upstreams) -> None:  # type: ignore[no-untyped-def]
    await sync_to_async(_route)(
        "embed", upstreams, {"provider": "a", "upstream_model": "ok", "port": _closed_port(), "priority": 0},
        {"provider": "b", "upstream_model": "ok", "priority": 1},
    )
    raw = await sdk.embeddings.with_raw_response.create(model="embed", input="x", encoding_format="float")
    assert raw.headers["x-keyway-provider"] == "b" and len(raw.parse().data) == 1
