"""The usage roll-ups hold exactly what the ledger holds: after batches, replays and concurrent writers, and
for a ledger written before they existed; and the usage reports read them, never the ledger."""

from __future__ import annotations

import importlib
import math
import random
import threading
from datetime import UTC, date, datetime, timedelta

import pytest
from django.apps import apps
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from apikeys.models import ApiKey
from apikeys.services import apikey_create
from billing.models import UsageDaily, UsageEvent, UsageHourly, UsageLatencyDaily
from billing.rollups import LATENCY_BOUNDS_MS, latency_bucket, latency_percentile, rollups_check, rollups_rebuild
from billing.selectors import (
    UsageFilter,
    balance_summary,
    monthly_statement,
    project_month_spend,
    usage_latency,
    usage_report,
    usage_series,
)
from billing.services import SettledUsage, usage_events_write
from platform_site.models import Organization

MODELS = ("gpt-small", "gpt-large", "embed-1")
START = datetime(2025, 3, 1, tzinfo=UTC)


def _events(
    organization: Organization, keys: list[ApiKey], count: int, *, seed: int, prefix: str
) -> list[SettledUsage]:
    chance = random.Random(seed)  # noqa: S311 (test data, not secrets)
    events = []
    for n in range(count):
        key = chance.choice([*keys, None])
        when = START + timedelta(seconds=chance.randrange(0, 40 * 86_400))
        events.append(
            SettledUsage(
                call_id=f"{prefix}-{n}",
                request_id=f"{prefix}-{n}",
                session_id="",
                organization_id=organization.pk,
                api_key_id=key.pk if key is not None else None,
                endpoint=chance.choice(list(UsageEvent.Endpoint.values)),
                model=chance.choice(MODELS),
                deployment_id=None,
                provider="fake",
                prompt_tokens=chance.randrange(0, 5000),
                cached_tokens=chance.randrange(0, 100),
                completion_tokens=chance.randrange(0, 800),
                cost_micros=chance.randrange(0, 90_000),
                status=chance.choice([1, 1, 1, 2, 3, 4]),
                usage_source=UsageEvent.UsageSource.REPORTED,
                latency_ms=int(chance.lognormvariate(5, 1.5)),
                ttft_ms=None,
                created_at=when.timestamp() + chance.random(),
                project_id=key.project_id if key is not None else None,
            )
        )
    return events


def _keys(organization: Organization) -> list[ApiKey]:
    return [apikey_create(organization=organization, name=f"k{n}", actor_label="test")[0] for n in range(3)]


@pytest.mark.django_db
def test_roll_ups_equal_the_ledger_after_batches_and_a_replayed_journal(org: Organization) -> None:
    events = _events(org, _keys(org), 600, seed=1, prefix="a")
    for start in range(0, 600, 70):
        usage_events_write(events[start : start + 70])
    # A journal replayed after a crash between the commit and the journal's deletion: nothing is new.
    assert usage_events_write(events[100:400]) == 0
    assert rollups_check(organization_id=org.pk) == []
    assert UsageDaily.objects.filter(organization=org).count() > 0
    assert sum(UsageDaily.objects.filter(organization=org).values_list("requests", flat=True)) == 600
    assert sum(UsageHourly.objects.filter(organization=org).values_list("requests", flat=True)) == 600
    assert sum(UsageLatencyDaily.objects.filter(organization=org).values_list("requests", flat=True)) == 600


@pytest.mark.django_db(transaction=True)
def test_roll_ups_equal_the_ledger_after_concurrent_writers_with_overlapping_batches(
    org: Organization, other_org: Organization
) -> None:
    """Four writers at once (a live worker and journal replays, as after a crash), each batch overlapping
    the others and touching both organizations: every call is counted once, in the ledger and the roll-ups."""
    events = _events(org, _keys(org), 400, seed=2, prefix="o") + _events(
        other_org, _keys(other_org), 400, seed=3, prefix="p"
    )
    random.Random(4).shuffle(events)  # noqa: S311
    batches = [events[n * 150 : n * 150 + 350] for n in range(4)]
    errors: list[BaseException] = []

    def write(batch: list[SettledUsage]) -> None:
        try:
            for start in range(0, len(batch), 50):
                usage_events_write(batch[start : start + 50])
        except BaseException as error:  # reported below: a thread's exception would otherwise vanish
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=write, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if connection.vendor == "sqlite":
        # SQLite allows one writer: a writer that found the database locked failed its whole batch, which the
        # ledger keeps in the journal and writes again. Do what the ledger does.
        for batch in batches:
            usage_events_write(batch)
    else:
        assert errors == []
    assert UsageEvent.objects.count() == len({event.call_id for batch in batches for event in batch})
    assert rollups_check(organization_id=org.pk) == []
    assert rollups_check(organization_id=other_org.pk) == []


@pytest.mark.django_db
def test_rebuild_and_the_migration_fill_give_the_roll_ups_the_writer_keeps(org: Organization) -> None:
    keys = _keys(org)
    usage_events_write(_events(org, keys, 300, seed=5, prefix="m"))
    kept = {
        table: sorted(table.objects.filter(organization=org).values_list(*_columns(table)))
        for table in (UsageDaily, UsageHourly, UsageLatencyDaily)
    }
    assert rollups_rebuild(organization_id=org.pk) == 300
    for table, rows in kept.items():
        assert sorted(table.objects.filter(organization=org).values_list(*_columns(table))) == rows
    for table in kept:
        table.objects.all().delete()
    migration = importlib.import_module("billing.migrations.0005_usage_rollups")
    migration.fill_from_ledger(apps, None)
    for table, rows in kept.items():
        assert sorted(table.objects.filter(organization=org).values_list(*_columns(table))) == rows
    # The writer adds to the rows the database rebuilt (the same stored day, hour and group), never beside them.
    rollups_rebuild(organization_id=org.pk)
    usage_events_write(_events(org, keys, 300, seed=5, prefix="again"))
    for table, rows in kept.items():
        assert table.objects.filter(organization=org).count() == len(rows)
    assert rollups_check(organization_id=org.pk) == []


def _columns(table: type) -> list[str]:
    return [f.attname for f in table._meta.concrete_fields if f.attname != "id"]  # type: ignore[attr-defined]


@pytest.mark.django_db
def test_reports_read_the_roll_ups_and_never_the_ledger(org: Organization) -> None:
    keys = _keys(org)
    events = _events(org, keys, 300, seed=6, prefix="r")
    usage_events_write(events)
    march = [e for e in events if datetime.fromtimestamp(e.created_at, tz=UTC).month == 3]
    ledger = connection.ops.quote_name(UsageEvent._meta.db_table)
    with CaptureQueriesContext(connection) as queries:
        report = usage_report(organization=org, start=date(2025, 3, 1), end=date(2025, 3, 31), group_by="key")
        statement = monthly_statement(organization=org, year=2025, month=3)
        balance_summary(organization=org)
        project_month_spend(organization=org, project=keys[0].project)
        latency = usage_latency(organization=org, start=date(2025, 3, 1), end=date(2025, 3, 31))
        usage_series(organization=org, since=START, until=START + timedelta(days=40), width="1d", group_by=["model"])
        usage_series(organization=org, since=START, until=START + timedelta(days=2), width="1h",
                     group_by=["api_key_id"], where=UsageFilter(models=["gpt-small"]))
    assert not [q["sql"] for q in queries.captured_queries if ledger in q["sql"] or "usageevent" in q["sql"]]
    assert report.totals.requests == len(march)
    assert report.totals.cost_micros == sum(e.cost_micros for e in march)
    assert report.totals.errors == sum(e.status == UsageEvent.Status.ERROR for e in march)
    by_key = {bucket.fields["api_key"]: bucket.totals.requests for bucket in report.buckets}
    assert by_key == {
        **{k.public_id: n for k in keys if (n := sum(e.api_key_id == k.pk for e in march))},
        **({None: n} if (n := sum(e.api_key_id is None for e in march)) else {}),
    }
    assert statement.usage_totals.cost_micros == sum(e.cost_micros for e in march)
    latencies = sorted(e.latency_ms for e in march)
    # The nearest-rank p95 lies in the bucket the histogram's estimate is interpolated in.
    bucket = latency_bucket(latencies[math.ceil(0.95 * len(latencies)) - 1])
    assert latency.p95_ms is not None
    assert (LATENCY_BOUNDS_MS[bucket - 1] if bucket else 0) <= latency.p95_ms <= LATENCY_BOUNDS_MS[bucket]


@pytest.mark.django_db
def test_minute_buckets_from_the_ledger_match_the_hourly_and_daily_roll_ups(org: Organization) -> None:
    keys = _keys(org)
    usage_events_write(_events(org, keys, 400, seed=7, prefix="s"))
    day = START + timedelta(days=3)
    minutes = usage_series(organization=org, since=day, until=day + timedelta(days=1), width="1m")
    hours = usage_series(organization=org, since=day, until=day + timedelta(days=1), width="1h")
    days = usage_series(organization=org, since=day, until=day + timedelta(days=1), width="1d")
    assert len(days) == 1
    for series in (minutes, hours):
        assert sum(p.totals.requests for p in series) == days[0].totals.requests
        assert sum(p.totals.cost_micros for p in series) == days[0].totals.cost_micros
        assert sum(p.totals.errors for p in series) == days[0].totals.errors


def test_percentiles_are_interpolated_inside_their_bucket() -> None:
    counts = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    assert latency_percentile(counts, 0.5) is None
    counts[latency_bucket(120)] = 10  # ten calls between 100 and 150 ms
    assert latency_percentile(counts, 0.5) == pytest.approx(125)
    assert latency_percentile(counts, 1.0) == pytest.approx(150)
    counts[latency_bucket(10**7)] = 10  # ten more slower than the last bound
    assert latency_percentile(counts, 0.95) > LATENCY_BOUNDS_MS[-1]
    assert latency_bucket(0) == 0 and latency_bucket(1) == 0 and latency_bucket(2) == 1
