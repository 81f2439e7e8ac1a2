"""Reads of billing data: usage reports, balances, the credit ledger, monthly statements and exports.

Every function takes the organization whose data it reads, and every report is computed from the two
append-only ledgers in the database (SUM and COUNT over the (organization, created_at) index), so a report
always agrees with the rows the CSV export lists. Dates are calendar days in UTC and ranges include both
ends: the range 2025-03-01 … 2025-03-31 covers [2025-03-01T00:00Z, 2025-04-01T00:00Z).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from apikeys.models import ApiKey
from billing.limits import effective_limit
from billing.models import BillingAccount, CreditEntry, ProjectRateLimit, UsageEvent
from billing.services import RATE_LIMIT_FIELDS, rate_limit_id
from platform_site.models import Organization, Project

GroupBy = Literal["day", "model", "key"]
GROUP_BY_CHOICES: tuple[GroupBy, ...] = ("day", "model", "key")


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost_micros: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_aggregate(cls, row: Mapping[str, Any]) -> UsageTotals:
        # int(): PostgreSQL returns SUM over a bigint column as numeric (a Decimal), and SUM over no rows as NULL.
        return cls(
            requests=int(row["n_requests"] or 0),
            prompt_tokens=int(row["sum_prompt_tokens"] or 0),
            cached_tokens=int(row["sum_cached_tokens"] or 0),
            completion_tokens=int(row["sum_completion_tokens"] or 0),
            cost_micros=int(row["sum_cost_micros"] or 0),
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


# Aliases differ from the column names because Django refuses an annotation named like a field of the model.
_SUMS = {
    "n_requests": Count("id"),
    "sum_prompt_tokens": Sum("prompt_tokens"),
    "sum_cached_tokens": Sum("cached_tokens"),
    "sum_completion_tokens": Sum("completion_tokens"),
    "sum_cost_micros": Sum("cost_micros"),
}


def _day_bounds(*, start: date, end: date) -> tuple[datetime, datetime]:
    """[start 00:00 UTC, the day after end 00:00 UTC): `end` is included."""
    since = datetime.combine(start, time.min, tzinfo=UTC)
    return since, datetime.combine(end + timedelta(days=1), time.min, tzinfo=UTC)


def _grouped(events: QuerySet[UsageEvent], *fields: str, order_by: Sequence[str]) -> list[dict[str, Any]]:
    """The _SUMS of `events` per distinct value of `fields` (one GROUP BY query)."""
    rows: Any = events.values(*fields).annotate(**_SUMS).order_by(*order_by)
    return list(rows)


def _month_bounds(*, year: int, month: int) -> tuple[datetime, datetime]:
    first = datetime(year, month, 1, tzinfo=UTC)
    following = datetime(year + 1, 1, 1, tzinfo=UTC) if month == 12 else datetime(year, month + 1, 1, tzinfo=UTC)
    return first, following


def usage_events_in_range(
    *,
    organization: Organization,
    start: date,
    end: date,
    model: str | None = None,
    api_key: ApiKey | None = None,
) -> QuerySet[UsageEvent]:
    """The organization's ledger rows settled from `start` to `end` (both UTC days included)."""
    since, until = _day_bounds(start=start, end=end)
    events = UsageEvent.objects.filter(organization=organization, created_at__gte=since, created_at__lt=until)
    if model:
        events = events.filter(model=model)
    if api_key is not None:
        events = events.filter(api_key=api_key)
    return events


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
    events = usage_events_in_range(organization=organization, start=start, end=end, model=model, api_key=api_key)
    totals = UsageTotals.from_aggregate(events.aggregate(**_SUMS))
    buckets: list[UsageBucket]
    if group_by == "day":
        days = events.annotate(day=TruncDate("created_at", tzinfo=UTC))
        rows = _grouped(days, "day", order_by=["day"])
        buckets = [UsageBucket({"date": row["day"]}, UsageTotals.from_aggregate(row)) for row in rows]
    elif group_by == "model":
        rows = _grouped(events, "model", order_by=["-sum_cost_micros", "model"])
        buckets = [UsageBucket({"model": row["model"]}, UsageTotals.from_aggregate(row)) for row in rows]
    elif group_by == "key":
        rows = _grouped(events, "api_key_id", order_by=["-sum_cost_micros", "api_key_id"])
        # Names are looked up apart from the aggregate, which then reads the ledger table alone; the lookup is
        # scoped to the organization too. A deleted key's usage stays in the ledger, under a null key.
        names: dict[int, tuple[str | None, str | None]] = {
            pk: (public_id, name)
            for pk, public_id, name in ApiKey.objects.filter(
                organization=organization, pk__in=[row["api_key_id"] for row in rows if row["api_key_id"]]
            ).values_list("pk", "public_id", "name")
        }
        buckets = []
        for row in rows:
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
    events = usage_events_in_range(organization=organization, start=start, end=end, model=model, api_key=api_key)
    if after is not None:
        created_at, last_id = after
        events = events.filter(Q(created_at__gt=created_at) | Q(created_at=created_at, id__gt=last_id))
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
    spend = UsageEvent.objects.filter(organization=organization, created_at__gte=month_start).aggregate(
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
    usage_before = UsageEvent.objects.filter(organization=organization, created_at__lt=period_start).aggregate(
        total=Sum("cost_micros")
    )["total"]
    entries = list(
        CreditEntry.objects.filter(organization=organization, created_at__gte=period_start, created_at__lt=period_end)
        .select_related("actor")
        .order_by("id")
    )
    events = UsageEvent.objects.filter(
        organization=organization, created_at__gte=period_start, created_at__lt=period_end
    )
    rows = _grouped(events, "model", order_by=["model"])
    return MonthlyStatement(
        year=year,
        month=month,
        period_start=period_start,
        period_end=period_end,
        complete=(now or timezone.now()) >= period_end,
        opening_balance_micros=int(credits_before or 0) - int(usage_before or 0),
        credit_entries=entries,
        usage_by_model=[UsageBucket({"model": row["model"]}, UsageTotals.from_aggregate(row)) for row in rows],
        usage_totals=UsageTotals.from_aggregate(events.aggregate(**_SUMS)),
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
    spend = UsageEvent.objects.filter(
        organization=organization, project=project, created_at__gte=month_start
    ).aggregate(total=Sum("cost_micros"))["total"]
    return int(spend or 0)
