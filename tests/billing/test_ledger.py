"""The usage ledger's writer and journal, and the cost arithmetic, without a server."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.db.models import Sum

from billing.ledger import recover_orphans
from billing.models import BillingAccount, UsageDaily, UsageEvent
from billing.pricing import ModelPrice, cost_micros
from billing.rollups import rollups_check
from billing.services import SettledUsage, usage_events_write
from platform_site.models import Organization

PRICE = ModelPrice(input=2_500_000, cached_input=1_250_000, output=10_000_000)  # 2.50 / 1.25 / 10 USD per 1M


def _event(org: Organization, request_id: str, cost: int = 1234) -> SettledUsage:
    return SettledUsage(
        call_id=request_id, request_id=request_id, session_id="",
        organization_id=org.pk, api_key_id=None, endpoint=1, model="m", deployment_id=None,
        provider="p", prompt_tokens=10, cached_tokens=0, completion_tokens=5, cost_micros=cost, status=1,
        usage_source=1, latency_ms=12, ttft_ms=None, created_at=time.time(),
    )


def test_costs_are_integer_micro_usd_rounded_up() -> None:
    million = cost_micros(PRICE, multiplier=10_000, prompt_tokens=1_000_000, cached_tokens=0, completion_tokens=0)
    assert million == 2_500_000
    # 1 input token at 2.50 USD per million is 2.5 micro-USD: charged as 3, never as 2.
    assert cost_micros(PRICE, multiplier=10_000, prompt_tokens=1, cached_tokens=0, completion_tokens=0) == 3
    assert cost_micros(PRICE, multiplier=10_000, prompt_tokens=0, cached_tokens=0, completion_tokens=0) == 0
    assert cost_micros(None, multiplier=10_000, prompt_tokens=10**6, cached_tokens=0, completion_tokens=10**6) == 0


def test_cached_prompt_tokens_cost_the_cached_price_and_the_multiplier_applies_to_all() -> None:
    full = cost_micros(PRICE, multiplier=10_000, prompt_tokens=1000, cached_tokens=400, completion_tokens=100)
    assert full == 600 * 2.5 + 400 * 1.25 + 100 * 10  # 3000
    assert cost_micros(PRICE, multiplier=15_000, prompt_tokens=1000, cached_tokens=400, completion_tokens=100) == 4500
    # More cached tokens than prompt tokens (a confused upstream) cannot make the prompt cheaper than free.
    assert cost_micros(PRICE, multiplier=10_000, prompt_tokens=10, cached_tokens=50, completion_tokens=0) == 13


@pytest.mark.django_db
def test_writing_the_same_events_twice_charges_them_once(org: Organization) -> None:
    events = [_event(org, f"req_{i}") for i in range(5)]
    assert usage_events_write(events) == 5
    assert usage_events_write(events + [_event(org, "req_new", cost=1)]) == 1
    account = BillingAccount.objects.get(pk=org.pk)
    assert account.usage_total_micros == 5 * 1234 + 1
    assert UsageEvent.objects.filter(organization=org).count() == 6


@pytest.mark.django_db(transaction=True)
def test_journal_lines_written_before_projects_replay_and_new_ones_keep_the_project(
    org: Organization, tmp_path: Path
) -> None:
    from platform_site.selectors import default_project

    project = default_project(organization=org)
    old = _event(org, "req_before_projects")
    new = _event(org, "req_with_project")
    new.project_id = project.pk
    # A line of a journal written before usage events named a project ends at created_at (18 fields).
    lines = orjson.dumps(old.as_row()[:-1]) + b"\n" + orjson.dumps(new.as_row()) + b"\n"
    (tmp_path / "host-4-4-4.usage").write_bytes(lines)
    assert recover_orphans(tmp_path) == 2
    rows = dict(UsageEvent.objects.values_list("call_id", "project_id"))
    assert rows == {"req_before_projects": None, "req_with_project": project.pk}


def _journal(directory: Path, name: str, events: list[SettledUsage], torn: bytes = b"") -> Path:
    path = directory / name
    path.write_bytes(b"".join(orjson.dumps(event.as_row()) + b"\n" for event in events) + torn)
    return path


@pytest.mark.django_db(transaction=True)
def test_an_orphaned_journal_is_replayed_once_and_a_torn_last_line_is_skipped(
    org: Organization, tmp_path: Path
) -> None:
    events = [_event(org, f"req_orphan_{i}") for i in range(3)]
    path = _journal(tmp_path, "host-1-1-1.usage", events, torn=b'["req_torn", 1')
    assert recover_orphans(tmp_path) == 3
    assert not path.exists()
    assert set(UsageEvent.objects.values_list("request_id", flat=True)) == {e.request_id for e in events}
    # The same journal found again (a crash after the commit, before the delete) charges nothing more.
    _journal(tmp_path, "host-1-1-1.usage", events)
    recover_orphans(tmp_path)
    assert BillingAccount.objects.get(pk=org.pk).usage_total_micros == 3 * 1234
    # And the roll-ups the reports read hold the three calls once, as the ledger does.
    assert rollups_check(organization_id=org.pk) == []
    assert UsageDaily.objects.filter(organization=org).aggregate(n=Sum("requests"))["n"] == 3


@pytest.mark.django_db(transaction=True)
def test_a_journal_that_a_live_process_holds_is_left_alone(org: Organization, tmp_path: Path) -> None:
    path = _journal(tmp_path, "host-2-2-2.usage", [_event(org, "req_live")])
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert recover_orphans(tmp_path) == 0
        assert path.exists() and not UsageEvent.objects.exists()
    finally:
        os.close(fd)
    assert recover_orphans(tmp_path) == 1


@pytest.mark.django_db(transaction=True)
async def test_a_starting_server_replays_orphaned_journals_before_serving(
    org: Organization, settings: Any
) -> None:
    from platform_site.asgi import application

    directory = Path(settings.KEYWAY_USAGE_JOURNAL_DIR)
    _journal(directory, "host-3-3-3.usage", [_event(org, "req_before_restart")])
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not incoming:
            raise AssertionError("the lifespan asked for more messages than the server sends")
        if incoming[0]["type"] == "lifespan.shutdown":
            # Startup is complete by the time the server would send shutdown: the journal is replayed.
            assert await sync_to_async(UsageEvent.objects.filter(request_id="req_before_restart").exists)()
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await application({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


@pytest.mark.django_db(transaction=True)
def test_a_row_the_database_refuses_is_set_aside_and_the_rest_is_written(org: Organization, tmp_path: Path) -> None:
    from billing.ledger import _write

    good = [_event(org, f"req_good_{i}") for i in range(3)]
    # A value no column can hold: DataError on PostgreSQL, OverflowError from SQLite's driver.
    bad = _event(org, "req_bad")
    bad.prompt_tokens = 2**70
    # A model name past its column's 128 characters: refused on PostgreSQL (set aside whole, never cut),
    # kept whole by SQLite, which has no lengths.
    long = _event(org, "req_long")
    long.model = "m" * 200
    _write([good[0], bad, long, *good[1:]], tmp_path)
    on_postgresql = connection.vendor == "postgresql"
    written = {e.request_id for e in good} | (set() if on_postgresql else {"req_long"})
    models = dict(UsageEvent.objects.values_list("request_id", "model"))
    assert set(models) == written
    assert models.get("req_long", long.model) == long.model
    assert BillingAccount.objects.get(pk=org.pk).usage_total_micros == len(written) * 1234
    rejected = [orjson.loads(line) for line in (tmp_path / "rejected.usage-rows").read_bytes().splitlines()]
    assert [row["event"][0] for row in rejected] == (["req_bad", "req_long"] if on_postgresql else ["req_bad"])
    assert {row["error"] for row in rejected} <= {"DataError", "OverflowError"}
    assert all(row["event"][6] == long.model for row in rejected[1:])
    # Not a journal: a replay does not pick it up.
    assert recover_orphans(tmp_path) == 0


@pytest.mark.django_db(transaction=True)
def test_a_kept_copy_writes_what_the_ledger_lacks_and_holds_nothing_the_collector_walks(
    org: Organization, tmp_path: Path, settings: Any
) -> None:
    import gc

    from billing.ledger import _Ledger

    settings.KEYWAY_USAGE_JOURNAL_DIR = str(tmp_path)
    ledger = _Ledger()
    events = [_event(org, f"req_kept_{i}") for i in range(3)]
    for event in events:
        # As the engine settles them: IntegerChoices members, not ints.
        event.endpoint, event.status = UsageEvent.Endpoint.CHAT, UsageEvent.Status.OK
        event.usage_source = UsageEvent.UsageSource.REPORTED
        ledger.keep(event)
    # Kept for seconds at thousands of requests a second: rows of strings and numbers, which a young
    # collection stops tracking, so full collections do not walk them.
    gc.collect(0)
    kept = list(tmp_path.glob("kept-*.usage"))
    assert len(kept) == 1
    assert list(events[0].as_row()) == orjson.loads(kept[0].read_bytes().splitlines()[0])
    assert ledger._kept is not None and not any(gc.is_tracked(row) for row in ledger._kept.rows)
    # The usage stream delivered the first; Redis lost the other two.
    usage_events_write(events[:1])
    assert ledger.verify_kept(older_than=0) == 2
    assert sorted(UsageEvent.objects.values_list("request_id", flat=True)) == [e.request_id for e in events]
    assert BillingAccount.objects.get(pk=org.pk).usage_total_micros == 3 * 1234
    assert not list(tmp_path.glob("kept-*.usage"))
