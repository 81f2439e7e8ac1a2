"""The shared usage stream (billing.counters appends, billing.ledger's consumer group writes), against a real
Redis: an answer's event is in the stream before the answer is released, an event settles with its counters in
one step and once, and what a lost worker had read is claimed and written exactly once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from billing import counters, keys
from billing.ledger import GROUP, drain_stream
from billing.models import BillingAccount, UsageEvent
from billing.services import SettledUsage
from platform_site.models import Organization

pytestmark = pytest.mark.django_db(transaction=True)



@pytest.fixture
async def store(own_redis: Any) -> AsyncIterator[Any]:
    """A worker's Redis counters on a prefix of their own, in place of this loop's."""
    worker = counters._RedisCounters()
    yield worker
    await worker.client.aclose()
    await worker.scripts.aclose()


def _event(org: Organization, cost: int) -> SettledUsage:
    return SettledUsage(
        call_id=f"call_{uuid.uuid4().hex}", request_id="req", session_id="", organization_id=org.pk,
        api_key_id=None, endpoint=1, model="m", deployment_id=None, provider="p", prompt_tokens=1, cached_tokens=0,
        completion_tokens=1, cost_micros=cost, status=1, usage_source=1, latency_ms=1, ttft_ms=None,
        created_at=time.time(),
    )


def _ledger(org: Organization) -> tuple[int, int]:
    account = BillingAccount.objects.filter(organization=org).first()
    return UsageEvent.objects.filter(organization=org).count(), account.usage_total_micros if account else 0


async def test_an_event_is_in_the_stream_before_the_answer_is_released_and_reaches_the_ledger_once(
    store: Any, org: Organization, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(counters, "store", lambda: store)
    spend = keys.spend(org.pk)
    await store.client.set(spend, 500)  # a hold of 500 for the call below
    counters.settle_later({spend: 300 - 500}, event=_event(org, 300))
    await counters.recorded()
    # Counters and event moved in the same step; nothing is written yet.
    assert int(await store.client.get(spend)) == 300
    assert await store.client.xlen(keys.usage_stream(0)) == 1
    assert await sync_to_async(_ledger)(org) == (0, 0)
    # The same batch sent again (an answer lost to a timeout after Redis ran it) changes nothing.
    assert await sync_to_async(drain_stream)() == 1
    assert await sync_to_async(_ledger)(org) == (1, 300)
    assert await store.client.xlen(keys.usage_stream(0)) == 0
    assert await sync_to_async(drain_stream)() == 0


async def test_a_call_settling_alone_is_written_to_redis_before_settle_later_returns(
    store: Any, org: Organization, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alone (no other call of the process under way), a settlement need not wait for the loop's next turn to
    gather others: its script is written at once, and the caller's last steps run while Redis works. Not
    alone, it waits for that turn. Either way its event reaches the stream once, and this host keeps a copy."""
    from billing.ledger import ledger

    monkeypatch.setattr(counters, "store", lambda: store)
    await store.seed({f"{keys.shard_prefix(0)}:warm": 0})  # a script run: a connection in the scripts' pool
    assert len(store.scripts.idle) == 1
    alone, together = _event(org, 100), _event(org, 200)

    counters.settle_later({}, event=alone, alone=True)
    assert not store.scripts.idle  # taken: its script is written, the reply awaited
    assert [connection.waiter is not None for connection in store.scripts.connections] == [True]
    await counters.recorded()
    assert await store.client.xlen(keys.usage_stream(0)) == 1 and len(store.scripts.idle) == 1

    counters.settle_later({}, event=together, alone=False)
    assert len(store.scripts.idle) == 1  # nothing written yet: its batch waits for the loop's next turn
    await counters.recorded()
    assert await store.client.xlen(keys.usage_stream(0)) == 2
    kept = {row[0] for row in ledger._kept.rows} if ledger._kept is not None else set()
    assert {alone.call_id, together.call_id} <= kept
    assert await sync_to_async(drain_stream)() == 2
    assert await sync_to_async(_ledger)(org) == (2, 300)


async def test_a_batch_sent_twice_adds_its_events_once(store: Any, org: Organization) -> None:
    events = [_event(org, 100), _event(org, 200)]
    await store.settle({}, {}, "batch-1", events)
    await store.settle({}, {}, "batch-1", events)
    assert await store.client.xlen(keys.usage_stream(0)) == 2


async def test_events_a_lost_worker_had_read_are_claimed_once_idle_and_written_once(
    store: Any, org: Organization
) -> None:
    await store.settle({}, {}, "batch-2", [_event(org, 100), _event(org, 200), _event(org, 400)])
    # A worker reads them, then its host is lost before it writes them: pending under its name.
    await store.client.xgroup_create(keys.usage_stream(0), GROUP, id="0", mkstream=True)
    read = await store.client.xreadgroup(GROUP, "lost-host:1:abcd", {keys.usage_stream(0): ">"}, count=10)
    assert len(read[0][1]) == 3
    # Not yet idle long enough: another worker leaves them (the first may only be slow).
    assert await sync_to_async(drain_stream)(claim_idle=60) == 0
    assert (await store.client.xpending(keys.usage_stream(0), GROUP))["pending"] == 3
    assert await sync_to_async(_ledger)(org) == (0, 0)
    # Idle past the delay: claimed, written, acknowledged and deleted.
    await sync_to_async(time.sleep)(0.05)
    assert await sync_to_async(drain_stream)(claim_idle=0.01) == 3
    assert await sync_to_async(_ledger)(org) == (3, 700)
    assert (await store.client.xpending(keys.usage_stream(0), GROUP))["pending"] == 0
    assert await store.client.xlen(keys.usage_stream(0)) == 0
    # The lost worker's late write (it was only slow after all) charges nothing more: idempotent on the call id.
    from billing.ledger import _decoded, _write

    await sync_to_async(_write)(_decoded(read[0][1])[1])
    assert await sync_to_async(_ledger)(org) == (3, 700)


async def test_usage_writer_once_writes_what_waits_in_the_stream(store: Any, org: Organization) -> None:
    """`manage.py usage_writer`, the writer of hosts that take ledger writing off the gateways."""
    from io import StringIO

    from django.core.management import call_command

    await store.settle({}, {}, "batch-3", [_event(org, 100), _event(org, 200)])
    output = StringIO()
    await sync_to_async(call_command)("usage_writer", "--once", stdout=output)
    assert output.getvalue().strip() == "2 usage event(s) written from the usage stream."
    assert await sync_to_async(_ledger)(org) == (2, 300)
    assert await store.client.xlen(keys.usage_stream(0)) == 0


async def test_with_the_stream_writer_off_a_worker_still_checks_its_kept_copies(
    store: Any, org: Organization, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where `usage_writer` writes the stream (KEYWAY_USAGE_STREAM_WRITER=0 on the gateways), each gateway still
    checks the copies it kept of what it sent: what Redis lost is written from them, and they are let go (they
    piled up on disk and in memory for as long as the worker lived)."""
    from billing import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "_KEPT_SEGMENT_SECONDS", 0.05)
    settings.KEYWAY_USAGE_VERIFY_AFTER = 0.05
    settings.KEYWAY_USAGE_FLUSH_INTERVAL = 0.05
    settings.KEYWAY_USAGE_STREAM_WRITER = False
    lost = _event(org, 700)  # sent to the usage stream, which Redis then lost
    ledger_module.ledger.keep(lost)
    await asyncio.sleep(0.06)
    ledger_module.ledger.keep(_event(org, 0))  # a segment is sealed, and checked, once the next one begins
    await store.start()  # a worker's registration: its heartbeats, its reconciler, its periodic usage task
    try:
        for _ in range(100):
            if await sync_to_async(_ledger)(org) == (1, 700):
                break
            await asyncio.sleep(0.05)
        assert await sync_to_async(_ledger)(org) == (1, 700)
        assert not ledger_module.ledger._kept_sealed
    finally:
        for task in (store.heartbeats, store.reconciler, store.usage_writer):
            if task is not None:
                task.cancel()
