"""The kernel every app stands on: the one error mapping, the single-flight cache, per-loop resources and
the process state tests reset."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from django.core.exceptions import RequestDataTooBig
from rest_framework import exceptions as drf

from apikeys.exceptions import InvalidApiKey, MissingScope, ModelNotAllowed
from billing.exceptions import QuotaExceeded, RateLimitExceeded
from completions.providers.base import UpstreamRejected, UpstreamTimeout
from platform_site.kernel import loops, process
from platform_site.kernel.errors import ApiError, to_api_error
from platform_site.kernel.singleflight import SingleFlight

# Loads run through orm(), which hands the worker thread's database connection back afterwards.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize(
    ("error", "status", "error_type", "code", "param"),
    [
        (InvalidApiKey("bad key"), 401, "invalid_request_error", "invalid_api_key", None),
        (MissingScope("chat"), 403, "permission_error", "missing_scope", None),
        (ModelNotAllowed("gpt"), 403, "permission_error", "model_not_allowed", "model"),
        (RateLimitExceeded(kind="tokens", limit=10, retry_after=3, headers={}), 429, "tokens",
         "rate_limit_exceeded", None),
        (QuotaExceeded("key_budget_exceeded"), 429, "insufficient_quota", "key_budget_exceeded", None),
        (UpstreamTimeout("slow"), 504, "timeout_error", "upstream_timeout", None),
        (UpstreamRejected("no", status=422, error_type="invalid_request_error", code=None, param="x"), 422,
         "invalid_request_error", None, "x"),
        (drf.ValidationError({"start": ["Enter a valid date."]}), 400, "invalid_request_error", "invalid_value",
         "start"),
        (drf.NotAuthenticated(), 401, "invalid_request_error", "invalid_api_key", None),
        (RequestDataTooBig(), 413, "invalid_request_error", "request_too_large", None),
    ],
)
def test_every_domain_error_maps_to_its_own_status_type_code_and_param(
    error: Exception, status: int, error_type: str, code: str | None, param: str | None
) -> None:
    mapped = to_api_error(error, request_id="req_1")
    assert (mapped.status, mapped.error_type, mapped.code, mapped.param) == (status, error_type, code, param)
    assert set(mapped.body()["error"]) == {"message", "type", "param", "code"}


def test_a_rate_limit_error_says_when_to_retry() -> None:
    error = RateLimitExceeded(kind="requests", limit=5, retry_after=7, headers={"x-ratelimit-limit-requests": "5"})
    assert error.headers == {"x-ratelimit-limit-requests": "5", "Retry-After": "7"}


def test_an_unknown_exception_is_a_500_that_names_only_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    mapped = to_api_error(KeyError("sk-secret-value"), request_id="req_42")
    assert mapped.status == 500 and mapped.code == "server_error"
    assert "req_42" in mapped.message and "sk-secret" not in mapped.message
    assert any("req_42" in record.getMessage() for record in caplog.records)


def test_api_error_defaults_come_from_the_class_and_instances_may_override() -> None:
    class Teapot(ApiError):
        status = 418
        code = "teapot"

    assert (Teapot("x").status, Teapot("x").code, Teapot("x", code="other").code) == (418, "teapot", "other")
    assert ApiError("y").status == 400 and ApiError("y").headers == {}


class _CountingLoad:
    def __init__(self, delay: float = 0.05) -> None:
        self.calls = 0
        self.value = "v1"
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, key: str) -> str:
        with self.lock:
            self.calls += 1
        time.sleep(self.delay)
        return f"{key}:{self.value}"


async def test_concurrent_gets_of_a_missing_copy_share_one_load() -> None:
    load = _CountingLoad()
    cache: SingleFlight[str, str] = SingleFlight(load, ttl=lambda: 60.0)
    results = await asyncio.gather(*(cache.get("k") for _ in range(50)))
    assert results == ["k:v1"] * 50 and load.calls == 1
    assert await cache.get("k") == "k:v1" and load.calls == 1


async def test_an_invalidation_during_a_load_is_not_undone_by_it() -> None:
    load = _CountingLoad(delay=0.1)
    cache: SingleFlight[str, str] = SingleFlight(load, ttl=lambda: 60.0)
    pending = asyncio.ensure_future(cache.get("k"))
    await asyncio.sleep(0.03)  # the first load is under way with the old value
    load.value = "v2"
    cache.invalidate("k")
    # The waiting request loads again rather than keep what the invalidation replaced.
    assert await pending == "k:v2"
    assert await cache.get("k") == "k:v2" and load.calls == 2


async def test_an_expired_copy_is_served_while_it_reloads_when_stale_is_allowed() -> None:
    load = _CountingLoad(delay=0.1)
    cache: SingleFlight[str, str] = SingleFlight(load, ttl=lambda: 0.0, stale_while_revalidate=True)
    assert await cache.get("k") == "k:v1"
    load.value = "v2"
    started = time.monotonic()
    assert await cache.get("k") == "k:v1"  # stale, at once
    assert time.monotonic() - started < 0.05
    await asyncio.sleep(0.2)
    assert await cache.get("k") == "k:v2"  # the background reload landed (served as the copy at hand)


async def test_a_copy_read_late_in_its_life_is_reloaded_in_the_background_and_replaced_before_it_expires() -> None:
    load = _CountingLoad(delay=0.05)
    cache: SingleFlight[str, str] = SingleFlight(load, ttl=lambda: 2.0)
    assert await cache.get("k") == "k:v1"
    loaded = time.monotonic()
    await asyncio.sleep(1.6)  # past 3/4 of the TTL, not past it
    load.value = "v2"
    started = time.monotonic()
    assert await cache.get("k") == "k:v1"  # served at once, while the reload runs
    assert time.monotonic() - started < 0.04 and time.monotonic() - loaded < 2.0
    await asyncio.sleep(2.2 - (time.monotonic() - loaded))  # the first copy has expired
    started = time.monotonic()
    assert await cache.get("k") == "k:v2"  # its replacement, loaded before: nobody waited
    assert time.monotonic() - started < 0.04 and load.calls == 2


class _OrderedLoad:
    """A load that notes which cache's key it loaded, in the order the one ORM thread ran them."""

    def __init__(self, name: str, order: list[str], delay: float = 0.02) -> None:
        self.name, self.order, self.delay = name, order, delay

    def __call__(self, key: str) -> str:
        self.order.append(self.name)
        time.sleep(self.delay)
        return f"{self.name}:{key}"


async def test_a_background_reload_lets_a_load_a_request_waits_for_go_first() -> None:
    """After a quiet spell every copy has expired: the stale catalog's reload must not hold up the loads the
    request waits for next in the one ORM thread."""
    order: list[str] = []
    stale: SingleFlight[str, str] = SingleFlight(_OrderedLoad("stale", order), ttl=lambda: 0.0,
                                                 stale_while_revalidate=True)
    waited: SingleFlight[str, str] = SingleFlight(_OrderedLoad("waited", order), ttl=lambda: 0.0)
    assert await stale.get("k") == "stale:k"
    order.clear()
    assert await stale.get("k") == "stale:k"  # served stale; its reload is asked for first...
    assert await waited.get("k") == "waited:k"
    await asyncio.sleep(0.1)
    assert order == ["waited", "stale"]  # ...yet ran after the load the request waited for


async def test_a_request_that_comes_to_need_a_delayed_reload_does_not_wait_out_its_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("platform_site.kernel.singleflight._BACKGROUND_DELAY", 5.0)
    load = _CountingLoad(delay=0.01)
    cache: SingleFlight[str, str] = SingleFlight(load, ttl=lambda: 0.2)
    assert await cache.get("k") == "k:v1"
    await asyncio.sleep(0.16)  # past 3/4 of the TTL
    load.value = "v2"
    assert await cache.get("k") == "k:v1"  # a background reload is asked for, 5 s from now
    await asyncio.sleep(0.06)  # the copy has expired: this request needs the reload
    started = time.monotonic()
    assert await cache.get("k") == "k:v2"
    assert time.monotonic() - started < 1.0 and load.calls == 2


async def test_a_delayed_reload_overtaken_by_an_invalidation_spares_the_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("platform_site.kernel.singleflight._BACKGROUND_DELAY", 0.05)
    load = _CountingLoad(delay=0)
    cache: SingleFlight[str, str] = SingleFlight(load, ttl=lambda: 0.0, stale_while_revalidate=True)
    await cache.get("k")
    await cache.get("k")  # stale: a reload is asked for, 50 ms from now
    cache.invalidate("k")
    await asyncio.sleep(0.1)
    assert load.calls == 1
    assert await cache.get("k") == "k:v1" and load.calls == 2  # the invalidated copy is loaded anew, at once


async def test_prefetched_copies_are_loaded_in_one_orm_visit_and_a_failure_reaches_only_its_own_reader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from platform_site.kernel import singleflight

    visits = 0
    real_orm = singleflight.orm

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal visits
        visits += 1
        return await real_orm(*args, **kwargs)

    monkeypatch.setattr(singleflight, "orm", counted)

    def broken(key: str) -> str:
        raise ConnectionError("no such row today")

    order: list[str] = []
    terms: SingleFlight[str, str] = SingleFlight(_OrderedLoad("terms", order, delay=0), ttl=lambda: 60.0)
    prices: SingleFlight[str, str] = SingleFlight(_OrderedLoad("prices", order, delay=0), ttl=lambda: 60.0)
    limits: SingleFlight[str, str] = SingleFlight(broken, ttl=lambda: 60.0)
    catalog: SingleFlight[str, str] = SingleFlight(_OrderedLoad("catalog", order, delay=0), ttl=lambda: 0.0,
                                                   stale_while_revalidate=True)
    await catalog.get("k")
    order.clear()
    visits = 0
    singleflight.prefetch((terms, "org"), (prices, "all"), (limits, "project"), (catalog, "k"))
    with pytest.raises(ConnectionError):
        await limits.get("project")  # joins the batch, and gets its own load's error...
    assert await terms.get("org") == "terms:org"  # ...which the others' readers do not
    assert await prices.get("all") == "prices:all"
    # One visit for the three that were due; the stale catalog copy was not one of them.
    assert visits == 1 and order == ["terms", "prices"]
    singleflight.prefetch((terms, "org"), (prices, "all"))  # fresh now: nothing to load
    assert visits == 1


async def test_a_failed_load_is_not_cached() -> None:
    attempts = 0

    def flaky(key: str) -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("database away")
        return "ok"

    cache: SingleFlight[str, str] = SingleFlight(flaky, ttl=lambda: 60.0)
    with pytest.raises(ConnectionError):
        await cache.get("k")
    assert await cache.get("k") == "ok"


async def test_process_reset_forgets_every_cached_copy() -> None:
    load = _CountingLoad(delay=0)
    cache: SingleFlight[str, str] = SingleFlight(load, ttl=lambda: 60.0)
    await cache.get("k")
    process.reset()
    await cache.get("k")
    assert load.calls == 2


class _Resource:
    def __init__(self) -> None:
        self.closed = False


async def test_a_per_loop_resource_is_made_once_per_loop_and_again_after_closing() -> None:
    made: list[_Resource] = []

    def create() -> _Resource:
        made.append(_Resource())
        return made[-1]

    async def close(resource: _Resource) -> None:
        resource.closed = True

    resource: loops.PerLoop[_Resource] = loops.PerLoop("test", create, close, is_closed=lambda r: r.closed)
    first = resource.get()
    assert resource.get() is first
    await resource.close_current()
    assert first.closed
    assert resource.get() is not first and len(made) == 2

    def in_another_loop() -> Any:
        return asyncio.run(_get(resource))

    other = await asyncio.to_thread(in_another_loop)
    assert other is not resource.get()


async def _get(resource: loops.PerLoop[_Resource]) -> _Resource:
    return resource.get()


def test_both_schema_validators_accept_a_real_completion_and_reject_a_broken_one() -> None:
    """Schema checks run everywhere: against the OpenAPI document where it is present, else against the
    official SDK's own types; both must tell a good body from a bad one."""
    from tests.conftest import OPENAPI_PATH, _openapi, openapi_validator, sdk_validator

    good = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": "hi", "refusal": None}}],
    }
    broken = {**good, "choices": [{"index": "zero", "message": {"role": "assistant"}}]}
    validators = [sdk_validator()]
    if OPENAPI_PATH.exists():
        validators.append(openapi_validator(_openapi()))
    for validate in validators:
        validate("CreateChatCompletionResponse", good)
        with pytest.raises(AssertionError):
            validate("CreateChatCompletionResponse", broken)
        validate("ErrorResponse", {"error": {"message": "m", "type": "t", "param": None, "code": None}})
        with pytest.raises(AssertionError):
            validate("ErrorResponse", {"message": "no envelope"})


def test_metrics_are_made_once_when_threads_ask_for_them_first_at_the_same_time(
    settings: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker's event loop and its threads (usage writer, reconciler, sync_to_async's pool) may ask first
    # together; the second maker used to register its names again and answer the request with a 500.
    from prometheus_client import values

    from platform_site.kernel import metrics

    settings.KEYWAY_METRICS_DIR = str(tmp_path)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    made, failures = [], []
    for _ in range(5):
        monkeypatch.setattr(metrics, "_instance", None)
        start = threading.Barrier(8)

        def ask(start: threading.Barrier = start) -> None:
            start.wait()
            try:
                made.append(metrics.metrics())
            except Exception as exc:  # noqa: BLE001 - what the test looks for
                failures.append(exc)

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures
        assert len({id(found) for found in made[-8:]}) == 1
    metrics.request_answered("chat.completions", 200, 0.01)


def test_ids_are_unique_across_threads_and_a_forked_child_does_not_repeat_its_parents() -> None:
    import os

    from platform_site.kernel import ids

    made: list[list[str]] = [[] for _ in range(4)]

    def draw(into: list[str]) -> None:
        into.extend(ids.token_hex(16) for _ in range(2_000))

    threads = [threading.Thread(target=draw, args=(into,)) for into in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [value for into in made for value in into]
    assert len(set(every)) == len(every) == 8_000
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in every)
    assert len(ids.token_hex(5_000)) == 10_000  # more than a block at once

    ids.token_hex(8)  # the parent holds a block with bytes left in it
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child process
        os.write(write, ids.token_hex(16).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    from_child = os.read(read, 64).decode()
    os.close(read)
    assert len(from_child) == 32 and from_child != ids.token_hex(16)
