"""Leased admission (billing.slices) against a real Redis, with two workers: most admissions take no round trip,
limits and credit stay exact across the workers, and whatever a slice had out comes back — when it expires,
when a worker flushes, and when a dead worker's lease is reaped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from billing import counters, keys
from billing.counters import ADMITTED, REFUSED_CREDIT, REFUSED_REQUESTS, Ask

ORG = 7
HOLD = 1_000


@pytest.fixture
async def workers(
    own_redis: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[list[counters._RedisCounters]]:
    """Two workers' Redis counters on a prefix of their own; settlements go out through the first."""
    settings.KEYWAY_USAGE_STREAM_WRITER = False
    settings.KEYWAY_RECONCILE_INTERVAL = 0
    settings.KEYWAY_ADMISSION_SLICE = 32
    settings.KEYWAY_ADMISSION_SLICE_SECONDS = 0.2
    made = [counters._RedisCounters(), counters._RedisCounters()]
    monkeypatch.setattr(counters, "store", lambda: made[0])
    calls = {"admissions": 0}
    for worker in made:
        script = worker.admit_script

        async def counting(*args: Any, script: Any = script, **kwargs: Any) -> Any:
            calls["admissions"] += 1
            return await script(*args, **kwargs)

        worker.admit_script = counting
    for worker in made:
        worker.calls = calls  # type: ignore[attr-defined]
    yield made
    for worker in made:
        worker.slices.clear()
        await worker.close()
    counters.reset()


def _ask(*, rpm: int = 0, tpm: int = 0, prepaid: bool = False, credit: int = 0, hold: int = HOLD, version: int = 1,
         key: str = "k1") -> Ask:
    names = counters.names(organization_id=ORG, key_public_id=key, key_id=1, project_id=None, model="m",
                           now=time.time())
    return Ask(keys=names, rpm=rpm, tpm=tpm, estimated_tokens=10, hold=hold, prepaid=prepaid, spend_seed=0,
               credit_total=credit, credit_version=version, org_cap=-1, key_cap=-1, shard=keys.shard_of(ORG))


async def _value(worker: counters._RedisCounters, name: str) -> int:
    return int(await worker.client.get(name) or 0)


async def _out_in_slices(worker: counters._RedisCounters) -> dict[bytes, bytes]:
    return await worker.client.hgetall(keys.sliced(keys.shard_of(ORG)))


async def test_most_admissions_take_no_round_trip_and_a_flush_leaves_the_counters_exact(workers: list[Any]) -> None:
    worker = workers[0]
    ask = _ask(rpm=10_000, tpm=10**9)
    counted = [await worker.admit(ask) for _ in range(100)]
    assert all(one.status == ADMITTED for one in counted)
    # The first went to Redis and took a slice for 32 more; so did every 33rd.
    assert worker.calls["admissions"] == 4
    # The headers count each request once, in order.
    assert [one.requests for one in counted] == list(range(1, 101))
    assert [one.tokens for one in counted] == [10 * n for n in range(1, 101)]
    requests, tokens, spend = ask.keys[0], ask.keys[1], ask.keys[2]
    # Counted in Redis with what is left of the slice, until it is given back.
    assert await _value(worker, requests) == 4 * 33
    assert await _out_in_slices(worker) != {}
    await counters.flush()
    assert await _value(worker, requests) == 100
    assert await _value(worker, tokens) == 1_000
    # The holds of the 100 calls in flight, in the counter and in the lease; nothing out in slices.
    assert await _value(worker, spend) == 100 * HOLD
    lease = await worker.client.hgetall(worker.lease(ask.shard))
    assert lease == {spend.encode(): str(100 * HOLD).encode()}
    assert await _out_in_slices(worker) == {}


async def test_admissions_arriving_together_take_from_the_slice_on_its_way(workers: list[Any]) -> None:
    """While one admission is in Redis asking for a slice, the others for the same counters wait for it rather
    than each making a round trip of its own; those it has no room for wait for the next."""
    worker = workers[0]
    await worker.admit(_ask(rpm=10_000, tpm=10**9, key="warm"))  # registered: the next admission asks at once
    worker.calls["admissions"] = 0
    ask = _ask(rpm=10_000, tpm=10**9)
    counted = await asyncio.gather(*(worker.admit(ask) for _ in range(100)))
    assert all(one.status == ADMITTED for one in counted)
    # One round trip, and a slice for 32 more, per 33 admissions: as if they had come one by one.
    assert worker.calls["admissions"] == 4
    assert sorted(one.requests for one in counted) == list(range(1, 101))
    await counters.flush()
    assert await _value(worker, ask.keys[0]) == 100
    assert await _out_in_slices(worker) == {}


async def test_a_flush_waits_for_the_batch_another_task_is_sending(
    workers: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slice given back by an admission goes out in the background; a flush that starts while that batch is
    on its way returns only once it is applied (the counters are exact when a flush returns)."""
    worker = workers[0]
    ask = _ask(rpm=10_000, tpm=10**9)
    await worker.admit(ask)
    release = asyncio.Event()
    settle = worker.settle

    async def slow_settle(*args: Any, **kwargs: Any) -> None:
        await release.wait()
        await settle(*args, **kwargs)

    monkeypatch.setattr(worker, "settle", slow_settle)
    worker._give_back(ask.keys)  # queued, and sent by the background sender
    await asyncio.sleep(0.01)
    assert len(counters._in_flight) == 1
    flushing = asyncio.create_task(counters.flush())
    await asyncio.sleep(0.05)
    assert not flushing.done()
    release.set()
    await flushing
    assert await _value(worker, ask.keys[0]) == 1
    assert await _out_in_slices(worker) == {}


async def test_a_slice_expires_and_comes_back_by_itself(workers: list[Any]) -> None:
    worker = workers[0]
    ask = _ask(rpm=10_000, tpm=10**9)
    await worker.admit(ask)
    assert await _value(worker, ask.keys[0]) == 33
    await asyncio.sleep(0.3)  # the slice's lifetime, and the settlement's round trip
    assert await _value(worker, ask.keys[0]) == 1
    assert await _value(worker, ask.keys[2]) == HOLD
    assert await _out_in_slices(worker) == {}
    # An expired slice is not used: the next admission goes to Redis.
    await worker.admit(ask)
    assert worker.calls["admissions"] == 2


async def test_other_limits_or_new_credit_send_the_admission_to_redis(workers: list[Any]) -> None:
    worker = workers[0]
    await worker.admit(_ask(prepaid=True, credit=10**9, version=1))
    await worker.admit(_ask(prepaid=True, credit=10**9, version=1))
    assert worker.calls["admissions"] == 1
    await worker.admit(_ask(prepaid=True, credit=2 * 10**9, version=2))  # a top-up
    assert worker.calls["admissions"] == 2
    await worker.admit(_ask(prepaid=True, credit=2 * 10**9, version=2, hold=10**8))  # does not fit in the slice
    assert worker.calls["admissions"] == 3


async def _registered(workers: list[Any]) -> None:
    """Each worker past its first admission (on other counters): the admissions that follow arrive together
    at a worker that asks Redis at once, so that the others wait for its slice."""
    for worker in workers:
        await worker.admit(_ask(key="warm", hold=0))


@pytest.mark.parametrize("registered", [False, True])
@pytest.mark.parametrize("spread", [1, 3])
async def test_an_rpm_limit_is_exact_across_two_workers_with_slices(
    workers: list[Any], spread: int, registered: bool
) -> None:
    """Of 300 requests at once, on two workers, under an RPM of 100: exactly 100 admitted, though slices were
    out in both workers when the room ran out; every refusal counted once."""
    if registered:
        await _registered(workers)
    ask = _ask(rpm=100, tpm=10**9)
    results = await asyncio.gather(*(workers[(n // spread) % 2].admit(ask) for n in range(300)))
    statuses = [one.status for one in results]
    assert statuses.count(ADMITTED) == 100, statuses
    assert statuses.count(REFUSED_REQUESTS) == 200
    await counters.flush()
    await asyncio.sleep(0.3)  # the other worker's slices expire
    await counters.flush()
    assert await _value(workers[0], ask.keys[0]) == 300
    assert await _out_in_slices(workers[0]) == {}


@pytest.mark.parametrize("registered", [False, True])
async def test_prepaid_credit_is_exact_across_two_workers_with_slices(workers: list[Any], registered: bool) -> None:
    """Credit for 200 holds, 500 requests at once on two workers: exactly 200 admitted, each hold once."""
    if registered:
        await _registered(workers)
    ask = _ask(prepaid=True, credit=200 * HOLD)
    results = await asyncio.gather(*(workers[n % 2].admit(ask) for n in range(500)))
    statuses = [one.status for one in results]
    assert statuses.count(ADMITTED) == 200, statuses
    assert statuses.count(REFUSED_CREDIT) == 300
    await asyncio.sleep(0.3)
    await counters.flush()
    assert await _value(workers[0], ask.keys[2]) == 200 * HOLD
    held = [int((await worker.client.hget(worker.lease(ask.shard), ask.keys[2])) or 0) for worker in workers]
    assert sum(held) == 200 * HOLD
    assert await _out_in_slices(workers[0]) == {}


async def test_a_dead_workers_slice_comes_back_when_its_lease_is_reaped(workers: list[Any]) -> None:
    live, dead = workers
    ask = _ask(prepaid=True, credit=10**9)
    await dead.admit(ask)
    assert await _value(live, ask.keys[2]) == 33 * HOLD  # its call's hold and its slice for 32 more
    dead.heartbeats.cancel()
    dead.reconciler.cancel()
    await dead.client.delete(keys.alive(ask.shard, dead.worker))
    await live.heartbeat()
    assert await _value(live, ask.keys[2]) == 0
    assert await _out_in_slices(live) == {}
    # What the dead worker still had is never given back twice: its slice's lease is gone.
    dead.give_back_all()
    await counters.flush()
    assert await _value(live, ask.keys[2]) == 0
