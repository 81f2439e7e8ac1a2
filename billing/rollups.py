"""Usage roll-ups: the ledger summed per UTC day and hour, kept exact by writing them with the ledger.

`rollups_add` runs inside `usage_events_write`'s transaction, with exactly the events that transaction
inserted (the database said which, through RETURNING), so a roll-up never counts a call the ledger does not
hold, nor twice: a replayed journal inserts nothing and adds nothing. Each group's row is upserted
(`INSERT … ON CONFLICT … DO UPDATE SET n = n + excluded.n`), in a fixed order, so two writers adding to the
same rows wait for each other instead of deadlocking.

Latency percentiles come from a histogram per day and group: LATENCY_BOUNDS_MS are the buckets' upper
bounds, on a 1-2-3-5-7 scale, so any percentile read back is within one bucket of the true one and is
interpolated inside it.

`rollups_rebuild` recomputes an organization's roll-ups from its ledger (`manage.py usage_rollups`), to
check them or to fill them for a ledger written before they existed.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import connection, transaction
from django.db.models import Case, Count, IntegerField, Q, QuerySet, Sum, Value, When
from django.db.models.functions import Coalesce, TruncDate, TruncHour

from billing.models import BillingAccount, UsageDaily, UsageEvent, UsageHourly, UsageLatencyDaily

LATENCY_BOUNDS_MS: tuple[int, ...] = (
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500, 700,
    1_000, 1_500, 2_000, 3_000, 5_000, 7_000, 10_000, 15_000, 20_000, 30_000, 50_000, 70_000,
    100_000, 150_000, 200_000, 300_000, 600_000,
)
# The last bucket holds everything slower than the last bound.
LATENCY_BUCKETS = len(LATENCY_BOUNDS_MS) + 1
_ROWS_PER_STATEMENT = 500
_SUMMED = ("requests", "errors", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_micros", "latency_ms")


def latency_bucket(latency_ms: int) -> int:
    """The index of the bucket whose bound is the first at or above `latency_ms`."""
    return bisect.bisect_left(LATENCY_BOUNDS_MS, latency_ms)


def latency_percentile(counts: Sequence[int], fraction: float) -> float | None:
    """The `fraction` percentile (0.5 for p50) of a histogram indexed like LATENCY_BOUNDS_MS, interpolated
    linearly inside its bucket; None when the histogram is empty."""
    total = sum(counts)
    if total == 0:
        return None
    wanted = fraction * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= wanted:
            low = LATENCY_BOUNDS_MS[index - 1] if index > 0 else 0
            high = LATENCY_BOUNDS_MS[index] if index < len(LATENCY_BOUNDS_MS) else LATENCY_BOUNDS_MS[-1] * 2
            return low + (high - low) * max(wanted - seen, 0) / count
        seen += count
    return float(LATENCY_BOUNDS_MS[-1])


@dataclass(slots=True)
class _Sums:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost_micros: int = 0
    latency_ms: int = 0

    def add(self, *, status: int, prompt: int, cached: int, completion: int, cost: int, latency: int) -> None:
        self.requests += 1
        self.errors += status == UsageEvent.Status.ERROR
        self.prompt_tokens += prompt
        self.cached_tokens += cached
        self.completion_tokens += completion
        self.cost_micros += cost
        self.latency_ms += latency


# (organization_id, period, project_id, api_key_id, model, endpoint)
Group = tuple[int, Any, int, int, str, int]


class RollupBatch:
    """The roll-up rows of a set of ledger rows, summed in memory before one upsert per table."""

    def __init__(self) -> None:
        self.daily: defaultdict[Group, _Sums] = defaultdict(_Sums)
        self.hourly: defaultdict[Group, _Sums] = defaultdict(_Sums)
        self.latency: defaultdict[tuple[Group, int], int] = defaultdict(int)

    def add(
        self,
        *,
        organization_id: int,
        created_at: datetime,
        project_id: int | None,
        api_key_id: int | None,
        model: str,
        endpoint: int,
        status: int,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        cost_micros: int,
        latency_ms: int,
    ) -> None:
        created_at = created_at.astimezone(UTC)
        day = created_at.date()
        hour = created_at.replace(minute=0, second=0, microsecond=0)
        rest = (project_id or 0, api_key_id or 0, model, endpoint)
        sums = dict(status=status, prompt=prompt_tokens, cached=cached_tokens, completion=completion_tokens,
                    cost=cost_micros, latency=latency_ms)
        self.daily[(organization_id, day, *rest)].add(**sums)
        self.hourly[(organization_id, hour, *rest)].add(**sums)
        self.latency[((organization_id, day, *rest), latency_bucket(latency_ms))] += 1

    def __bool__(self) -> bool:
        return bool(self.daily)


def rollups_add(events: Iterable[Any]) -> None:
    """Add settled calls (billing.services.SettledUsage, just inserted into the ledger) to the roll-ups.
    Must run in the transaction that inserted them.

    Summed per hour in integers first and turned into dates once per group, not once per call: this runs
    on the ledger writer's thread, which shares the GIL with the event loop serving requests."""
    hourly: dict[tuple[Any, ...], list[int]] = {}
    latency: defaultdict[tuple[Any, ...], int] = defaultdict(int)
    error = UsageEvent.Status.ERROR
    for event in events:
        hour = int(event.created_at // 3600)
        rest = (event.project_id or 0, event.api_key_id or 0, event.model, event.endpoint)
        sums = hourly.get((event.organization_id, hour, *rest))
        if sums is None:
            sums = hourly[(event.organization_id, hour, *rest)] = [0] * len(_SUMMED)
        sums[0] += 1
        sums[1] += event.status == error
        sums[2] += event.prompt_tokens
        sums[3] += event.cached_tokens
        sums[4] += event.completion_tokens
        sums[5] += event.cost_micros
        sums[6] += event.latency_ms
        latency[(event.organization_id, hour // 24, *rest, latency_bucket(event.latency_ms))] += 1
    batch = RollupBatch()
    for (organization_id, hour, *dims), sums in hourly.items():
        start = datetime.fromtimestamp(hour * 3600, tz=UTC)
        for target, period in ((batch.hourly, start), (batch.daily, start.date())):
            group = target[(organization_id, period, *dims)]  # type: ignore[index]
            for name, value in zip(_SUMMED, sums, strict=True):
                setattr(group, name, getattr(group, name) + value)
    for (organization_id, day, *dims, bucket), count in latency.items():
        day_start = datetime.fromtimestamp(day * 86_400, tz=UTC).date()
        batch.latency[((organization_id, day_start, *dims), bucket)] += count  # type: ignore[index]
    _write(batch)


def _write(batch: RollupBatch) -> None:
    ops = connection.ops
    day_value = ops.adapt_datefield_value
    hour_value = ops.adapt_datetimefield_value
    daily = [((o, day_value(d), p, k, m, e), sums) for (o, d, p, k, m, e), sums in sorted(batch.daily.items())]
    hourly = [((o, hour_value(h), p, k, m, e), sums) for (o, h, p, k, m, e), sums in sorted(batch.hourly.items())]
    _upsert(UsageDaily, "day", [(*group, *(getattr(s, f) for f in _SUMMED)) for group, s in daily], _SUMMED)
    _upsert(UsageHourly, "hour", [(*group, *(getattr(s, f) for f in _SUMMED)) for group, s in hourly], _SUMMED)
    latency = [
        (o, day_value(d), p, k, m, e, bucket, count)
        for ((o, d, p, k, m, e), bucket), count in sorted(batch.latency.items())
    ]
    _upsert(UsageLatencyDaily, "day", latency, ("requests",), extra_key=("bucket",))


def _upsert(
    model: type[Any], period: str, rows: list[tuple[Any, ...]], summed: Sequence[str], extra_key: Sequence[str] = ()
) -> None:
    if not rows:
        return
    quote = connection.ops.quote_name
    table = quote(model._meta.db_table)
    key = ("organization_id", period, "project_id", "api_key_id", "model", "endpoint", *extra_key)
    columns = (*key, *summed)
    placeholders = "(" + ", ".join(["%s"] * len(columns)) + ")"
    updates = ", ".join(f"{quote(c)} = {table}.{quote(c)} + excluded.{quote(c)}" for c in summed)
    with connection.cursor() as cursor:
        for start in range(0, len(rows), _ROWS_PER_STATEMENT):
            chunk = rows[start : start + _ROWS_PER_STATEMENT]
            cursor.execute(
                f"INSERT INTO {table} ({', '.join(quote(c) for c in columns)}) "  # noqa: S608
                f"VALUES {', '.join([placeholders] * len(chunk))} "
                f"ON CONFLICT ({', '.join(quote(c) for c in key)}) DO UPDATE SET {updates}",
                [value for row in chunk for value in row],
            )


@transaction.atomic
def rollups_rebuild(*, organization_id: int) -> int:
    """Recompute one organization's roll-ups from its ledger, replacing what they held; returns how many
    ledger rows were read. Locks the organization's billing account, as the ledger writer's charge does, so
    no batch of the organization is written meanwhile (on PostgreSQL; SQLite has one writer anyway).

    Summed by the database: `INSERT … SELECT … GROUP BY`, so no ledger row travels to Python (a tenant with
    a million calls is rebuilt in seconds, not minutes). The groups, hours and latency buckets are the ones
    `rollups_add` computes (tests/billing/test_rollups.py holds them equal)."""
    BillingAccount.objects.select_for_update().filter(pk=organization_id).first()
    for table in (UsageDaily, UsageHourly, UsageLatencyDaily):
        table.objects.filter(organization_id=organization_id).delete()
    events = UsageEvent.objects.filter(organization_id=organization_id)
    sums = {
        "requests": Count("id"),
        "errors": Count("id", filter=Q(status=UsageEvent.Status.ERROR)),
        **{name: Coalesce(Sum(name), 0) for name in _SUMMED[2:]},
    }
    for table, period, trunc in (
        (UsageDaily, "day", TruncDate("created_at", tzinfo=UTC)),
        (UsageHourly, "hour", TruncHour("created_at", tzinfo=UTC)),
    ):
        _insert_grouped(table, events.annotate(**{period: trunc}), (period, *_GROUP), sums)
    bucket = Case(
        *[When(latency_ms__lte=bound, then=Value(index)) for index, bound in enumerate(LATENCY_BOUNDS_MS)],
        default=Value(len(LATENCY_BOUNDS_MS)),
        output_field=IntegerField(),
    )
    _insert_grouped(
        UsageLatencyDaily,
        events.annotate(day=TruncDate("created_at", tzinfo=UTC), bucket=bucket),
        ("day", *_GROUP, "bucket"),
        {"requests": Count("id")},
    )
    read: int = UsageDaily.objects.filter(organization_id=organization_id).aggregate(n=Sum("requests"))["n"] or 0
    return read


_GROUP = ("project_id", "api_key_id", "model", "endpoint")


def _insert_grouped(table: type[Any], rows: QuerySet[Any], group: Sequence[str], sums: dict[str, Any]) -> None:
    """INSERT INTO table SELECT the organization's `rows` grouped by `group` with `sums`. The grouped query
    is a subquery read by name, since the ORM orders its SELECT list its own way; a NULL project or key is
    0 in the roll-ups."""
    aliases = {f"n_{name}": value for name, value in sums.items()}
    sql, params = rows.values("organization_id", *group).annotate(**aliases).order_by().query.sql_with_params()
    quote = connection.ops.quote_name
    columns = ["organization_id", *group, *sums]
    picked = [
        f"COALESCE(grouped.{quote(name)}, 0)" if name in ("project_id", "api_key_id") else f"grouped.{quote(name)}"
        for name in ("organization_id", *group)
    ] + [f"grouped.{quote(alias)}" for alias in aliases]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {quote(table._meta.db_table)} ({', '.join(quote(c) for c in columns)}) "  # noqa: S608
            f"SELECT {', '.join(picked)} FROM ({sql}) grouped",
            params,
        )


@dataclass(frozen=True, slots=True)
class RollupDifference:
    table: str
    group: tuple[Any, ...]
    stored: tuple[int, ...]
    expected: tuple[int, ...]


def rollups_check(*, organization_id: int) -> list[RollupDifference]:
    """The daily roll-up rows of one organization that differ from its ledger, read in one pass; [] when
    they agree. Reads only, and may race a batch being written: check again before acting on a difference."""
    expected = RollupBatch()
    fields = ("created_at", "project_id", "api_key_id", "model", "endpoint", "status", "prompt_tokens",
              "cached_tokens", "completion_tokens", "cost_micros", "latency_ms")
    for row in UsageEvent.objects.filter(organization_id=organization_id).values_list(*fields).iterator(5000):
        expected.add(organization_id=organization_id, **dict(zip(fields, row, strict=True)))
    differences = []
    for model, period, wanted in (
        (UsageDaily, "day", expected.daily),
        (UsageHourly, "hour", expected.hourly),
    ):
        stored = {
            (organization_id, row[0], *row[1:5]): tuple(row[5:])
            for row in model.objects.filter(organization_id=organization_id).values_list(
                period, "project_id", "api_key_id", "model", "endpoint", *_SUMMED
            )
        }
        for group in sorted(set(stored) | set(wanted), key=repr):
            want = tuple(getattr(wanted[group], f) for f in _SUMMED) if group in wanted else (0,) * len(_SUMMED)
            have = stored.get(group, (0,) * len(_SUMMED))
            if have != want:
                differences.append(RollupDifference(model.__name__, group, have, want))
    stored_latency = {
        ((organization_id, row[0], *row[1:5]), row[5]): row[6]
        for row in UsageLatencyDaily.objects.filter(organization_id=organization_id).values_list(
            "day", "project_id", "api_key_id", "model", "endpoint", "bucket", "requests"
        )
    }
    for group in sorted(set(stored_latency) | set(expected.latency), key=repr):
        have_count, want_count = stored_latency.get(group, 0), expected.latency.get(group, 0)
        if have_count != want_count:
            differences.append(RollupDifference("UsageLatencyDaily", group, (have_count,), (want_count,)))
    return differences
