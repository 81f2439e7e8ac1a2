"""Reads of billing data: usage reports, balances, the credit ledger, monthly statements and exports.

Every function takes the organization whose data it reads. Usage reports read the roll-ups (billing.rollups:
the ledger summed per UTC day and hour, written in the ledger's own transactions), so a report costs the
same with ten million ledger rows as with ten, and always agrees with the rows the CSV export lists. Only the
export and per-minute buckets read the ledger itself, a bounded range at a time. Dates are calendar days in
UTC and ranges include both ends: the range 2025-03-01 … 2025-03-31 covers [2025-03-01T00:00Z, 2025-04-01T00:00Z).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

from django.db import connections
from django.db.models import BigIntegerField, Count, Func, Q, QuerySet, Sum
from django.db.models.functions import Cast, TruncMinute
from django.utils import timezone

from apikeys.models import ApiKey
from billing.limits import effective_limit
from billing.models import (
    BillingAccount,
    CreditEntry,
    ProjectRateLimit,
    UsageDaily,
    UsageEvent,
    UsageHourly,
    UsageLatencyDaily,
)
from billing.rollups import LATENCY_BUCKETS, latency_percentile
from billing.services import RATE_LIMIT_FIELDS, rate_limit_id
from platform_site.models import Organization, Project

GroupBy = Literal["day", "model", "key"]
GROUP_BY_CHOICES: tuple[GroupBy, ...] = ("day", "model", "key")
# What a usage series may be grouped by (the roll-ups' dimensions).
Dimension = Literal["project_id", "api_key_id", "model", "endpoint"]
DIMENSIONS: tuple[Dimension, ...] = ("project_id", "api_key_id", "model", "endpoint")
Width = Literal["1m", "1h", "1d"]
WIDTHS: dict[str, timedelta] = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost_micros: int = 0
    errors: int = 0
    latency_ms: int = 0  # summed over the calls

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @classmethod
    def from_aggregate(cls, row: Mapping[str, Any]) -> UsageTotals:
        # int(): PostgreSQL returns SUM over a bigint column as numeric (a Decimal), and SUM over no rows as NULL.
        return cls(
            requests=int(row["n_requests"] or 0),
            prompt_tokens=int(row["sum_prompt_tokens"] or 0),
            cached_tokens=int(row["sum_cached_tokens"] or 0),
            completion_tokens=int(row["sum_completion_tokens"] or 0),
            cost_micros=int(row["sum_cost_micros"] or 0),
            errors=int(row.get("sum_errors") or 0),
            latency_ms=int(row.get("sum_latency_ms") or 0),
        )


@dataclass(frozen=True, slots=True)
class UsageBucket:
    """One row of a grouped report. `fields` names the bucket: {"date"}, {"model"} or {"api_key", "api_key_name"}."""

    fields: dict[str, Any]
    totals: UsageTotals


@dataclass(frozen=True, slots=True)
class UsageReport:
    group_by: GroupBy
    start: date
    end: date
    buckets: list[UsageBucket]
    totals: UsageTotals


@dataclass(frozen=True, slots=True)
class BalanceSummary:
    billing_mode: str
    plan: str | None
    credit_total_micros: int
    usage_total_micros: int
    monthly_budget_micros: int | None
    month_start: date
    month_spend_micros: int

    @property
    def balance_micros(self) -> int:
        return self.credit_total_micros - self.usage_total_micros


@dataclass(frozen=True, slots=True)
class MonthlyStatement:
    """One calendar month (UTC): opening balance + credits − usage = closing balance, exactly."""

    year: int
    month: int
    period_start: datetime
    period_end: datetime  # exclusive: the first instant of the next month
    complete: bool  # False while the month is still running
    opening_balance_micros: int
    credit_entries: list[CreditEntry]
    usage_by_model: list[UsageBucket]
    usage_totals: UsageTotals

    @property
    def credits_micros(self) -> int:
        return sum(entry.amount_micros for entry in self.credit_entries)

    @property
    def closing_balance_micros(self) -> int:
        return self.opening_balance_micros + self.credits_micros - self.usage_totals.cost_micros


def _sum(column: str) -> Cast:
    """SUM cast back to a bigint: PostgreSQL sums bigints as numeric, which reaches Python as a Decimal, and
    converting those took half the time of an hourly page by key (16,000 rows). No sum of micro-USD or tokens
    comes near 2^63."""
    return Cast(Sum(column), BigIntegerField())


# Aliases differ from the column names because Django refuses an annotation named like a field of the model.
# Over the roll-ups, whose rows are already sums:
_ROLLUP_SUMS = {
    "n_requests": _sum("requests"),
    "sum_prompt_tokens": _sum("prompt_tokens"),
    "sum_cached_tokens": _sum("cached_tokens"),
    "sum_completion_tokens": _sum("completion_tokens"),
    "sum_cost_micros": _sum("cost_micros"),
    "sum_errors": _sum("errors"),
    "sum_latency_ms": _sum("latency_ms"),
}
# Over ledger rows (per-minute buckets only):
_LEDGER_SUMS = {
    "n_requests": Count("id"),
    "sum_prompt_tokens": _sum("prompt_tokens"),
    "sum_cached_tokens": _sum("cached_tokens"),
    "sum_completion_tokens": _sum("completion_tokens"),
    "sum_cost_micros": _sum("cost_micros"),
    "sum_errors": Count("id", filter=Q(status=UsageEvent.Status.ERROR)),
    "sum_latency_ms": _sum("latency_ms"),
}


def _day_bounds(*, start: date, end: date) -> tuple[datetime, datetime]:
    """[start 00:00 UTC, the day after end 00:00 UTC): `end` is included."""
    since = datetime.combine(start, time.min, tzinfo=UTC)
    return since, datetime.combine(end + timedelta(days=1), time.min, tzinfo=UTC)


def _month_bounds(*, year: int, month: int) -> tuple[datetime, datetime]:
    first = datetime(year, month, 1, tzinfo=UTC)
    following = datetime(year + 1, 1, 1, tzinfo=UTC) if month == 12 else datetime(year, month + 1, 1, tzinfo=UTC)
    return first, following


@dataclass(frozen=True, slots=True)
class UsageFilter:
    """Which of an organization's usage a report covers: every field left empty means all. Ids are the
    database ids of the organization's projects and keys, resolved (and scoped) by the caller."""

    project_ids: Sequence[int] = ()
    api_key_ids: Sequence[int] = ()
    models: Sequence[str] = ()
    endpoints: Sequence[int] = ()

    def apply(self, rows: QuerySet[Any]) -> QuerySet[Any]:
        if self.project_ids:
            rows = rows.filter(project_id__in=list(self.project_ids))
        if self.api_key_ids:
            rows = rows.filter(api_key_id__in=list(self.api_key_ids))
        if self.models:
            rows = rows.filter(model__in=list(self.models))
        if self.endpoints:
            rows = rows.filter(endpoint__in=list(self.endpoints))
        return rows


NO_FILTER = UsageFilter()


def daily_rollups(
    *, organization: Organization, start: date, end: date, where: UsageFilter = NO_FILTER
) -> QuerySet[UsageDaily]:
    """The organization's daily roll-up rows from `start` to `end` (UTC days, both included)."""
    return where.apply(UsageDaily.objects.filter(organization=organization, day__gte=start, day__lte=end))


@dataclass(frozen=True, slots=True)
class UsagePoint:
    """One bucket of a usage series: its start, the values of the grouped dimensions (project_id and
    api_key_id as database ids, None for none), and the sums."""

    start: datetime
    group: dict[str, Any]
    totals: UsageTotals


def _floor(moment: datetime, width: Width) -> datetime:
    moment = moment.astimezone(UTC)
    if width == "1d":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if width == "1h":
        return moment.replace(minute=0, second=0, microsecond=0)
    return moment.replace(second=0, microsecond=0)


def usage_series(
    *,
    organization: Organization,
    since: datetime,
    until: datetime,
    width: Width,
    group_by: Sequence[Dimension] = (),
    where: UsageFilter = NO_FILTER,
) -> list[UsagePoint]:
    """Usage summed per bucket of `width` from `since` to `until` (exclusive), and per value of each
    dimension in `group_by`; buckets with no usage are left out. `since` is floored to a bucket boundary
    (UTC midnight, hour or minute), so every bucket is whole. Days and hours read the roll-ups; minutes read
    the ledger, which the caller bounds (the Admin API allows at most 1,440 of them per page)."""
    since, until = _floor(since, width), until.astimezone(UTC)
    dims = [dimension for dimension in DIMENSIONS if dimension in group_by]
    rows: QuerySet[Any]
    if width == "1d":
        # Every day that starts before `until`: a day is the smallest part the daily roll-up can give.
        last_day = (until - timedelta(microseconds=1)).date()
        rows = where.apply(
            UsageDaily.objects.filter(organization=organization, day__gte=since.date(), day__lte=last_day)
        )
        period = "day"
    elif width == "1h":
        rows = where.apply(UsageHourly.objects.filter(organization=organization, hour__gte=since, hour__lt=until))
        rows, period = rows.annotate(start_s=_UnixSeconds("hour")), "start_s"
    else:
        rows = where.apply(UsageEvent.objects.filter(organization=organization, created_at__gte=since,
                                                     created_at__lt=until))
        rows, period = rows.annotate(start_s=_UnixSeconds(TruncMinute("created_at", tzinfo=UTC))), "start_s"
    sums = _LEDGER_SUMS if width == "1m" else _ROLLUP_SUMS
    grouped = rows.values(period, *dims).annotate(**sums).order_by(period, *dims).values_list(period, *dims, *sums)
    # The database's own rows, without the ORM's converters, and each bucket's start made once: an hourly page
    # by key is some 16,000 rows, and converting them value by value took half of its time.
    with connections[grouped.db].cursor() as cursor:
        cursor.execute(*grouped.query.sql_with_params())
        found = cursor.fetchall()
    starts: dict[Any, datetime] = {}
    ids = [dimension in ("project_id", "api_key_id") for dimension in dims]
    points = []
    for row in found:
        start = starts.get(row[0])
        if start is None:
            start = starts[row[0]] = _utc_moment(row[0])
        # The roll-ups say 0 for "no project" or "no key"; the ledger says NULL.
        group: dict[str, Any] = {
            dimension: (row[n] or None) if ids[n - 1] else row[n] for n, dimension in enumerate(dims, 1)
        }
        requests, prompt, cached, completion, cost, errors, latency = row[len(dims) + 1 :]
        totals = UsageTotals(requests=int(requests), prompt_tokens=int(prompt or 0), cached_tokens=int(cached or 0),
                             completion_tokens=int(completion or 0), cost_micros=int(cost or 0),
                             errors=int(errors or 0), latency_ms=int(latency or 0))
        points.append(UsagePoint(start=start, group=group, totals=totals))
    return points


class _UnixSeconds(Func):
    """A moment as whole Unix seconds, computed by the database: hours and minutes are fetched as integers,
    not as datetimes with a time zone, which the PostgreSQL driver parses in Python (a third of an hourly page
    by key's time)."""

    output_field = BigIntegerField()

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return self.as_sql(compiler, connection, template="EXTRACT(EPOCH FROM %(expressions)s)::bigint", **extra)

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # Django keeps datetimes as ISO text in UTC; julianday() reads it (Julian day 2440587.5 is the epoch).
        return self.as_sql(compiler, connection,
                           template="CAST(ROUND((julianday(%(expressions)s) - 2440587.5) * 86400) AS INTEGER)", **extra)


def _utc_moment(value: Any) -> datetime:
    """A bucket's start as the database gives it (Unix seconds; a day as ISO text on SQLite, a date on
    PostgreSQL) as an aware UTC datetime."""
    if isinstance(value, int):
        return datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    elif not isinstance(value, datetime):
        value = datetime.combine(value, time.min)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def usage_totals(
    *, organization: Organization, start: date, end: date, where: UsageFilter = NO_FILTER
) -> UsageTotals:
    rows = daily_rollups(organization=organization, start=start, end=end, where=where)
    return UsageTotals.from_aggregate(rows.aggregate(**_ROLLUP_SUMS))


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Latency percentiles in milliseconds (None where no call was made), for the whole range and per day."""

    p50_ms: float | None
    p95_ms: float | None
    per_day: list[tuple[date, float | None, float | None]] = field(default_factory=list)


def usage_latency(
    *, organization: Organization, start: date, end: date, where: UsageFilter = NO_FILTER
) -> LatencySummary:
    """p50 and p95 latency of the range and of each day in it, from the daily latency histograms."""
    rows = where.apply(
        UsageLatencyDaily.objects.filter(organization=organization, day__gte=start, day__lte=end)
    ).values("day", "bucket").annotate(n=Sum("requests")).order_by("day", "bucket")
    whole = [0] * LATENCY_BUCKETS
    days: defaultdict[date, list[int]] = defaultdict(lambda: [0] * LATENCY_BUCKETS)
    for row in rows:
        whole[row["bucket"]] += int(row["n"])
        days[row["day"]][row["bucket"]] += int(row["n"])
    return LatencySummary(
        p50_ms=latency_percentile(whole, 0.5),
        p95_ms=latency_percentile(whole, 0.95),
        per_day=[(day, latency_percentile(c, 0.5), latency_percentile(c, 0.95)) for day, c in sorted(days.items())],
    )


def api_key_names(*, organization: Organization, ids: Sequence[int]) -> dict[int, tuple[str, str]]:
    """Public id and name of each of `ids` that is a key of the organization (a deleted key is absent)."""
    wanted = [pk for pk in set(ids) if pk]
    return {
        pk: (public_id, name)
        for pk, public_id, name in ApiKey.objects.filter(organization=organization, pk__in=wanted).values_list(
            "pk", "public_id", "name"
        )
    }


def project_names(*, organization: Organization, ids: Sequence[int]) -> dict[int, tuple[str, str]]:
    wanted = [pk for pk in set(ids) if pk]
    return {
        pk: (public_id, name)
        for pk, public_id, name in Project.objects.filter(organization=organization, pk__in=wanted).values_list(
            "pk", "public_id", "name"
        )
    }


def usage_events_in_range(
    *,
    organization: Organization,
    start: date,
    end: date,
    model: str | None = None,
    api_key: ApiKey | None = None,
    not_before: datetime | None = None,
) -> QuerySet[UsageEvent]:
    """The organization's ledger rows settled from `start` to `end` (both UTC days included), and not before
    `not_before` where given: the export."""
    since, until = _day_bounds(start=start, end=end)
    events = UsageEvent.objects.filter(organization=organization, created_at__gte=max(since, not_before or since),
                                       created_at__lt=until)
    if model:
        events = events.filter(model=model)
    if api_key is not None:
        events = events.filter(api_key=api_key)
    return events


def _rollup_grouped(rows: QuerySet[Any], *fields: str, order_by: Sequence[str]) -> list[dict[str, Any]]:
    """The sums of roll-up `rows` per distinct value of `fields` (one GROUP BY query)."""
    grouped: Any = rows.values(*fields).annotate(**_ROLLUP_SUMS).order_by(*order_by)
    return list(grouped)


def usage_report(
    *,
    organization: Organization,
    start: date,
    end: date,
    group_by: GroupBy,
    model: str | None = None,
    api_key: ApiKey | None = None,
) -> UsageReport:
    """Usage summed per UTC day, per model or per key, with the totals of the whole range."""
    where = UsageFilter(models=[model] if model else [], api_key_ids=[api_key.pk] if api_key is not None else [])
    rows = daily_rollups(organization=organization, start=start, end=end, where=where)
    totals = UsageTotals.from_aggregate(rows.aggregate(**_ROLLUP_SUMS))
    buckets: list[UsageBucket]
    if group_by == "day":
        grouped = _rollup_grouped(rows, "day", order_by=["day"])
        buckets = [UsageBucket({"date": row["day"]}, UsageTotals.from_aggregate(row)) for row in grouped]
    elif group_by == "model":
        grouped = _rollup_grouped(rows, "model", order_by=["-sum_cost_micros", "model"])
        buckets = [UsageBucket({"model": row["model"]}, UsageTotals.from_aggregate(row)) for row in grouped]
    elif group_by == "key":
        grouped = _rollup_grouped(rows, "api_key_id", order_by=["-sum_cost_micros", "api_key_id"])
        # Names are looked up apart from the aggregate, scoped to the organization too. A deleted key's usage
        # stays, under no name.
        names = api_key_names(organization=organization, ids=[row["api_key_id"] for row in grouped])
        buckets = []
        for row in grouped:
            public_id, name = names.get(row["api_key_id"], (None, None))
            buckets.append(UsageBucket({"api_key": public_id, "api_key_name": name}, UsageTotals.from_aggregate(row)))
    else:
        raise ValueError(f"Unknown grouping {group_by!r}.")
    return UsageReport(group_by=group_by, start=start, end=end, buckets=buckets, totals=totals)


_EXPORT_FIELDS = (
    "id", "created_at", "call_id", "request_id", "session_id", "endpoint",
    "model", "api_key__public_id", "status", "usage_source",
    "prompt_tokens", "cached_tokens", "completion_tokens", "cost_micros", "latency_ms", "ttft_ms",
)


def usage_events_for_export(
    *,
    organization: Organization,
    start: date,
    end: date,
    model: str | None = None,
    api_key: ApiKey | None = None,
    after: tuple[datetime, int] | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """One page of ledger rows in settlement order, after the (created_at, id) of the previous page's last row.

    Keyset pages keep each query short and on the index however long the export, and hold no cursor or
    transaction open while a slow client downloads. Keys appear by public id only.
    """
    # A page starts at the previous page's last moment, as the index's lower bound (an OR of "later, or as
    # late with a greater id" alone would scan from the range's start on every page), and leaves out what
    # that page already held at that moment.
    events = usage_events_in_range(organization=organization, start=start, end=end, model=model, api_key=api_key,
                                   not_before=after[0] if after is not None else None)
    if after is not None:
        events = events.exclude(created_at=after[0], id__lte=after[1])
    rows: Any = events.order_by("created_at", "id").values(*_EXPORT_FIELDS)[:limit]
    return list(rows)


def _account(*, organization: Organization) -> BillingAccount | None:
    # Read-only on purpose: an organization that has never been billed has no account row yet, and a read
    # must not create one.
    return BillingAccount.objects.select_related("plan").filter(organization=organization).first()


def balance_summary(*, organization: Organization, now: datetime | None = None) -> BalanceSummary:
    """Credit, usage and balance (the account's running totals), terms, and this calendar month's spend."""
    now = now or timezone.now()
    # An organization never billed has no account row yet: an unsaved one reads as zeros and defaults.
    account = _account(organization=organization) or BillingAccount(organization=organization)
    plan = account.plan
    month_start, _ = _month_bounds(year=now.year, month=now.month)
    spend = UsageDaily.objects.filter(organization=organization, day__gte=month_start.date()).aggregate(
        total=Sum("cost_micros")
    )["total"]
    return BalanceSummary(
        billing_mode=account.billing_mode,
        plan=plan.name if plan is not None else None,
        credit_total_micros=account.credit_total_micros,
        usage_total_micros=account.usage_total_micros,
        monthly_budget_micros=account.effective_monthly_budget_micros,
        month_start=month_start.date(),
        month_spend_micros=int(spend or 0),
    )


def credit_entry_list(*, organization: Organization) -> QuerySet[CreditEntry]:
    """The organization's credit ledger, newest first."""
    return CreditEntry.objects.filter(organization=organization).select_related("actor").order_by("-id")


def monthly_statement(
    *, organization: Organization, year: int, month: int, now: datetime | None = None
) -> MonthlyStatement:
    """The statement of one calendar month (UTC), from the ledgers alone."""
    period_start, period_end = _month_bounds(year=year, month=month)
    credits_before = CreditEntry.objects.filter(organization=organization, created_at__lt=period_start).aggregate(
        total=Sum("amount_micros")
    )["total"]
    usage_before = UsageDaily.objects.filter(organization=organization, day__lt=period_start.date()).aggregate(
        total=Sum("cost_micros")
    )["total"]
    entries = list(
        CreditEntry.objects.filter(organization=organization, created_at__gte=period_start, created_at__lt=period_end)
        .select_related("actor")
        .order_by("id")
    )
    rows_of_month = UsageDaily.objects.filter(
        organization=organization, day__gte=period_start.date(), day__lt=period_end.date()
    )
    rows = _rollup_grouped(rows_of_month, "model", order_by=["model"])
    return MonthlyStatement(
        year=year,
        month=month,
        period_start=period_start,
        period_end=period_end,
        complete=(now or timezone.now()) >= period_end,
        opening_balance_micros=int(credits_before or 0) - int(usage_before or 0),
        credit_entries=entries,
        usage_by_model=[UsageBucket({"model": row["model"]}, UsageTotals.from_aggregate(row)) for row in rows],
        usage_totals=UsageTotals.from_aggregate(rows_of_month.aggregate(**_ROLLUP_SUMS)),
    )


@dataclass(frozen=True, slots=True)
class ProjectModelLimit:
    """A project's ceilings on one model as they apply now, and which of them the project set itself (`own`:
    each of RATE_LIMIT_FIELDS to its stored value, None where the platform default applies)."""

    id: str
    model: str
    max_requests_per_1_minute: int
    max_tokens_per_1_minute: int
    max_requests_per_1_day: int | None
    own: dict[str, int | None]

    @property
    def customized(self) -> bool:
        return any(value is not None for value in self.own.values())


def project_rate_limit_list(
    *, organization: Organization, project: Project, models: Sequence[str]
) -> list[ProjectModelLimit]:
    """The project's limit on each of `models` (the catalog's) and on every model it set a limit for, by
    model id."""
    rows = {
        row.model: row for row in ProjectRateLimit.objects.filter(project=project, project__organization=organization)
    }
    listed = []
    for model in sorted(set(models) | set(rows)):
        row = rows.get(model)
        own = {name: getattr(row, name) if row is not None else None for name in RATE_LIMIT_FIELDS}
        limit = effective_limit(**own)
        listed.append(
            ProjectModelLimit(
                id=rate_limit_id(model),
                model=model,
                max_requests_per_1_minute=limit.requests_per_minute,
                max_tokens_per_1_minute=limit.tokens_per_minute,
                max_requests_per_1_day=limit.requests_per_day or None,
                own=own,
            )
        )
    return listed


def project_month_spend(*, organization: Organization, project: Project, now: datetime | None = None) -> int:
    """What the project's keys were charged this calendar month (UTC), in micro-USD, from the ledger."""
    now = now or timezone.now()
    month_start, _ = _month_bounds(year=now.year, month=now.month)
    spend = UsageDaily.objects.filter(
        organization=organization, project_id=project.pk, day__gte=month_start.date()
    ).aggregate(total=Sum("cost_micros"))["total"]
    return int(spend or 0)
