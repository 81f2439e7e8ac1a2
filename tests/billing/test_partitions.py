"""The usage ledger partitioned by month on PostgreSQL (billing.partitions): rows land in their month, rows that
waited in the default partition move into their month's partition when it is made, the idempotency key holds
across partitions, and the migration turns a plain table with rows into a partitioned one (and back) keeping
every row and id."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection

from billing.models import BillingAccount, UsageEvent
from billing.partitions import DEFAULT_PARTITION, ensure_usage_partitions, is_partitioned, partition_name, rebuild
from billing.services import SettledUsage, usage_events_write
from platform_site.models import Organization

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql",
                       reason="partitioning is PostgreSQL's; SQLite keeps one table"),
]


@pytest.fixture(autouse=True)
def _only_the_usual_partitions() -> Iterator[None]:
    """Partitions a test makes for old months are dropped after it: every later transactional test empties
    the ledger, and each partition makes that slower."""
    yield
    from billing.partitions import _existing

    keep = {DEFAULT_PARTITION} | {partition_name(datetime.now(UTC).replace(day=1) + timedelta(days=31 * n))
                                  for n in range(3)}
    with connection.cursor() as cursor:
        for name in _existing(connection) - keep:
            cursor.execute(f"DROP TABLE {connection.ops.quote_name(name)}")


def _event(org: Organization, when: datetime, call_id: str | None = None) -> SettledUsage:
    return SettledUsage(
        call_id=call_id or f"call_{uuid.uuid4().hex}", request_id="req", session_id="", organization_id=org.pk,
        api_key_id=None, endpoint=1, model="m", deployment_id=None, provider="p", prompt_tokens=1, cached_tokens=0,
        completion_tokens=1, cost_micros=10, status=1, usage_source=1, latency_ms=1, ttft_ms=None,
        created_at=when.timestamp(),
    )


def _where(call_id: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT tableoid::regclass::text FROM billing_usageevent WHERE call_id = %s", [call_id])
        return cursor.fetchone()[0]


def test_events_land_in_their_month_and_an_early_one_moves_into_its_partition_once_made(org: Organization) -> None:
    assert is_partitioned(connection)
    now = datetime.now(UTC)
    this_month = f"billing_usageevent_y{now.year:04d}m{now.month:02d}"
    usage_events_write([_event(org, now, "call_now")])
    assert _where("call_now") == this_month
    # A journal replayed from long before the ledger's first month: kept, in the default partition.
    old = datetime(2019, 3, 14, 15, 9, 26, 535897, tzinfo=UTC)
    usage_events_write([_event(org, old, "call_2019")])
    assert _where("call_2019") == DEFAULT_PARTITION
    # Written again (a second replay): the same call, the same created_at, a conflict, charged once.
    assert usage_events_write([_event(org, old, "call_2019"), _event(org, now, "call_now")]) == 0
    made = ensure_usage_partitions(since=datetime(2019, 3, 1, tzinfo=UTC), months_ahead=0)
    assert made[0] == "billing_usageevent_y2019m03"
    assert len(made) == (now.year - 2019) * 12 + now.month - 3  # every month since, but this one (made already)
    assert _where("call_2019") == "billing_usageevent_y2019m03"
    assert UsageEvent.objects.get(call_id="call_2019").created_at == old  # to the microsecond
    assert usage_events_write([_event(org, old, "call_2019")]) == 0
    assert BillingAccount.objects.get(organization=org).usage_total_micros == 20
    assert ensure_usage_partitions() == []  # already there: nothing made


def test_the_migration_partitions_a_table_with_rows_and_can_undo_it(org: Organization) -> None:
    months = [datetime(2024, month, 10, tzinfo=UTC) for month in (1, 2, 5)]
    usage_events_write([_event(org, when) for when in months])
    before = list(UsageEvent.objects.order_by("id").values_list("id", "call_id", "created_at"))
    rebuild(connection, partitioned=False)
    assert not is_partitioned(connection)
    assert list(UsageEvent.objects.order_by("id").values_list("id", "call_id", "created_at")) == before
    rebuild(connection, partitioned=True)
    assert is_partitioned(connection)
    assert list(UsageEvent.objects.order_by("id").values_list("id", "call_id", "created_at")) == before
    assert {_where(call_id) for _, call_id, _ in before} == {
        "billing_usageevent_y2024m01", "billing_usageevent_y2024m02", "billing_usageevent_y2024m05"
    }
    # New ids continue after the copied ones.
    usage_events_write([_event(org, datetime.now(UTC), "call_after")])
    assert UsageEvent.objects.get(call_id="call_after").id > before[-1][0]
