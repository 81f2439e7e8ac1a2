"""The billing REST API under /api/billing/: usage reports, the CSV export, balance, credits, statements.

Read-only DRF views off the hot path, served by Django's full stack (sessions work here; /v1 does not have
them). Callers are an API key with the usage:read scope or a logged-in member (billing.authentication).
Amounts are integer micro-USD, each with a USD string beside it; dates are UTC days and `end` is included.
"""

from __future__ import annotations

import csv
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.http import StreamingHttpResponse
from django.utils import timezone
from django_ratelimit.core import get_usage
from rest_framework.authentication import SessionAuthentication
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apikeys.auth import AuthenticatedKey
from apikeys.models import ApiKey
from apikeys.selectors import apikey_get
from billing.authentication import ApiKeyAuthentication, CanReadUsage, reader_organization
from billing.errors import invalid_param, openai_exception_handler
from billing.models import CreditEntry, UsageEvent
from billing.money import micros_to_usd
from billing.selectors import (
    GROUP_BY_CHOICES,
    GroupBy,
    UsageTotals,
    balance_summary,
    credit_entry_list,
    monthly_statement,
    usage_events_for_export,
    usage_report,
)
from platform_site.kernel.errors import ApiError
from platform_site.kernel.params import whole_number
from platform_site.models import Organization

DEFAULT_RANGE_DAYS = 30
MAX_RANGE_DAYS = 366
_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$", re.ASCII)
# Dates a usage range may name: a year off either end made the range's arithmetic overflow (a 500).
_FIRST_DATE, _LAST_DATE = date(2000, 1, 1), date(9000, 12, 31)
# ASCII digits only (\d also takes other scripts' digits), and from the year 2000, as dates are.
_MONTH_RE = re.compile(r"^(20[0-9]{2}|[3-9][0-9]{3})-(0[1-9]|1[0-2])$")
_EXPORT_PAGE = 2000


class JsonOnlyNegotiation(BaseContentNegotiation):
    """JSON whatever the Accept header says: errors must never come back as the browsable API's HTML, and
    the CSV view builds its own response."""

    def select_renderer(
        self, request: Request, renderers: list[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        return renderers[0], renderers[0].media_type

    def select_parser(self, request: Request, parsers: list[Any]) -> Any:
        return parsers[0] if parsers else None


def _ratelimit_key(group: str, request: Request) -> str:
    if isinstance(request.auth, AuthenticatedKey):
        return f"key:{request.auth.public_id}"
    return f"user:{request.user.pk}"


class BillingApi(APIView):
    """What every billing view shares: who may call, JSON errors in OpenAI's shape, and a rate limit."""

    authentication_classes = [ApiKeyAuthentication, SessionAuthentication]
    permission_classes = [CanReadUsage]
    renderer_classes = [JSONRenderer]
    content_negotiation_class = JsonOnlyNegotiation
    # Per caller (key or user) across all billing endpoints. Reports aggregate over up to a year of ledger
    # rows, so they are limited well below the hot path's rates. The counters live in the default cache:
    # shared through Redis in production, per process in the embedded single-process setup.
    rate = "120/m"

    def get_exception_handler(self) -> Callable[[Exception, dict[str, Any]], Response]:
        return openai_exception_handler

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        caller_rate_limit(request, group="billing-api", rate=self.rate, what="the billing API")


def caller_rate_limit(request: Request, *, group: str, rate: str, what: str) -> None:
    """Count a request of an authenticated caller (key or user) against `rate`; 429 in OpenAI's shape past it.
    Called after authentication, so the limit is per key or user rather than per address."""
    usage = get_usage(request, group=group, key=_ratelimit_key, rate=rate, increment=True)
    if usage is not None and usage["should_limit"]:
        retry_after = max(int(usage["time_left"]), 1)
        raise ApiError(
            f"Rate limit reached on {what}: Limit {usage['limit']} requests per minute. Please try again in "
            f"{retry_after}s.",
            status=429,
            error_type="requests",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry_after)},
        )


def _date_param(request: Request, name: str) -> date | None:
    raw = request.query_params.get(name, "").strip()
    if not raw:
        return None
    # fromisoformat alone would also take "20250301" and week dates; the API promises YYYY-MM-DD only.
    try:
        if not _DATE_RE.match(raw):
            raise ValueError
        value = date.fromisoformat(raw)
    except ValueError:
        raise invalid_param(name, f"Invalid '{name}': {raw[:40]!r} is not a date of the form YYYY-MM-DD.") from None
    if not _FIRST_DATE <= value <= _LAST_DATE:
        raise invalid_param(name, f"Invalid '{name}': {raw} is outside {_FIRST_DATE} … {_LAST_DATE}.")
    return value


def _date_range(request: Request) -> tuple[date, date]:
    """`start` and `end` (UTC days, both included); the last 30 days by default, at most 366."""
    start, end = _date_param(request, "start"), _date_param(request, "end")
    if end is None:
        end = timezone.now().astimezone(UTC).date()
    if start is None:
        start = end - timedelta(days=DEFAULT_RANGE_DAYS - 1)
    if start > end:
        raise invalid_param("start", f"'start' ({start}) is after 'end' ({end}).")
    if (end - start).days + 1 > MAX_RANGE_DAYS:
        raise invalid_param("end", f"The range {start} … {end} is longer than {MAX_RANGE_DAYS} days.")
    return start, end


def _key_param(request: Request, organization: Organization) -> ApiKey | None:
    public_id = request.query_params.get("api_key", "").strip()
    if not public_id:
        return None
    try:
        return apikey_get(organization=organization, public_id=public_id)
    except ApiKey.DoesNotExist:
        # Not found, as an id of another organization is anywhere else (the isolation matrix).
        raise ApiError(f"No API key with public id {public_id[:64]!r} in this organization.", status=404,
                       param="api_key", code="not_found") from None


def _group_by_param(request: Request) -> GroupBy:
    raw = request.query_params.get("group_by", "").strip() or "day"
    for choice in GROUP_BY_CHOICES:
        if raw == choice:
            return choice
    raise invalid_param("group_by", f"Invalid 'group_by': {raw!r}. Use one of: {', '.join(GROUP_BY_CHOICES)}.")


def _filters(request: Request, organization: Organization) -> dict[str, Any]:
    start, end = _date_range(request)
    model = request.query_params.get("model", "").strip() or None
    return {"start": start, "end": end, "model": model, "api_key": _key_param(request, organization)}


def _totals(totals: UsageTotals) -> dict[str, Any]:
    return {
        "requests": totals.requests,
        "prompt_tokens": totals.prompt_tokens,
        "cached_tokens": totals.cached_tokens,
        "completion_tokens": totals.completion_tokens,
        "total_tokens": totals.total_tokens,
        "cost_micros": totals.cost_micros,
        "cost_usd": micros_to_usd(totals.cost_micros),
    }


def _credit_entry(entry: CreditEntry) -> dict[str, Any]:
    return {
        "object": "billing.credit_entry",
        "id": entry.pk,
        "created_at": entry.created_at,
        "kind": entry.kind,
        "amount_micros": entry.amount_micros,
        "amount_usd": micros_to_usd(entry.amount_micros),
        "reason": entry.reason,
        "credit_total_after_micros": entry.credit_total_after_micros,
    }


class UsageListApi(BillingApi):
    """GET /api/billing/usage?start=&end=&group_by=day|model|key[&model=][&api_key=<public id>]"""

    def get(self, request: Request) -> Response:
        organization = reader_organization(request)
        group_by = _group_by_param(request)
        filters = _filters(request, organization)
        report = usage_report(organization=organization, group_by=group_by, **filters)
        return Response(
            {
                "object": "list",
                "organization": organization.slug,
                "group_by": report.group_by,
                "start": report.start,
                "end": report.end,
                "model": filters["model"],
                "api_key": filters["api_key"].public_id if filters["api_key"] else None,
                "data": [{**bucket.fields, **_totals(bucket.totals)} for bucket in report.buckets],
                "totals": _totals(report.totals),
            }
        )


_CSV_HEADER = (
    "created_at", "call_id", "request_id", "session_id", "endpoint", "model", "api_key", "status",
    "usage_source", "prompt_tokens",
    "cached_tokens", "completion_tokens", "total_tokens", "cost_micros", "cost_usd", "latency_ms", "ttft_ms",
)


class _Echo:
    """A file-like object for csv.writer that hands each formatted line back instead of storing it."""

    def write(self, value: str) -> str:
        return value


def _csv_line(row: dict[str, Any]) -> list[object]:
    return [
        row["created_at"].astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        row["call_id"],
        row["request_id"],
        row["session_id"],
        UsageEvent.Endpoint(row["endpoint"]).label,
        row["model"],
        row["api_key__public_id"] or "",
        UsageEvent.Status(row["status"]).label,
        UsageEvent.UsageSource(row["usage_source"]).name.lower(),
        row["prompt_tokens"],
        row["cached_tokens"],
        row["completion_tokens"],
        row["prompt_tokens"] + row["completion_tokens"],
        row["cost_micros"],
        micros_to_usd(row["cost_micros"]),
        row["latency_ms"],
        "" if row["ttft_ms"] is None else row["ttft_ms"],
    ]


async def _csv_stream(filters: dict[str, Any]) -> AsyncIterator[str]:
    """The header, then every ledger row of the range, one keyset page at a time.

    An asynchronous iterator because Django's ASGI handler would read a synchronous one to the end into
    memory before sending the first byte; each page's query runs on the request's thread and connection.
    """
    writer = csv.writer(_Echo())
    yield writer.writerow(_CSV_HEADER)
    after: tuple[datetime, int] | None = None
    while True:
        # Inside Django's request cycle: the request's own connection, which Django hands back at its end
        # (orm() is for the API path, outside that cycle).
        rows = await sync_to_async(usage_events_for_export)(**filters, after=after, limit=_EXPORT_PAGE)
        if rows:
            yield "".join(writer.writerow(_csv_line(row)) for row in rows)
        if len(rows) < _EXPORT_PAGE:
            return
        after = (rows[-1]["created_at"], rows[-1]["id"])


class UsageExportApi(BillingApi):
    """GET /api/billing/usage.csv?start=&end=[&model=][&api_key=]: one CSV row per ledger row."""

    def get(self, request: Request) -> StreamingHttpResponse:
        organization = reader_organization(request)
        filters = {"organization": organization, **_filters(request, organization)}
        response = StreamingHttpResponse(_csv_stream(filters), content_type="text/csv; charset=utf-8")
        filename = f"keyway-usage-{organization.slug}-{filters['start']}-{filters['end']}.csv"
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        response["Cache-Control"] = "no-store"
        return response


class BalanceRetrieveApi(BillingApi):
    """GET /api/billing/balance"""

    def get(self, request: Request) -> Response:
        organization = reader_organization(request)
        summary = balance_summary(organization=organization)
        return Response(
            {
                "object": "billing.balance",
                "organization": organization.slug,
                "billing_mode": summary.billing_mode,
                "plan": summary.plan,
                "credit_total_micros": summary.credit_total_micros,
                "usage_total_micros": summary.usage_total_micros,
                "balance_micros": summary.balance_micros,
                "balance_usd": micros_to_usd(summary.balance_micros),
                "monthly_budget_micros": summary.monthly_budget_micros,
                "month": summary.month_start.strftime("%Y-%m"),
                "month_spend_micros": summary.month_spend_micros,
                "month_spend_usd": micros_to_usd(summary.month_spend_micros),
            }
        )


def _int_param(request: Request, name: str, *, default: int | None, minimum: int, maximum: int) -> int | None:
    raw = request.query_params.get(name, "").strip()
    if not raw:
        return default
    value = whole_number(raw, maximum=maximum)
    if value is None or value < minimum:
        raise invalid_param(name, f"Invalid '{name}': {raw[:40]!r} is not an integer from {minimum} to {maximum}.")
    return value


class CreditListApi(BillingApi):
    """GET /api/billing/credits?limit=20&after=<id>: the credit ledger, newest first, paginated like OpenAI's
    lists (pass the last id of a page as `after` for the next one)."""

    def get(self, request: Request) -> Response:
        organization = reader_organization(request)
        limit = _int_param(request, "limit", default=20, minimum=1, maximum=100)
        after = _int_param(request, "after", default=None, minimum=1, maximum=2**63 - 1)
        assert limit is not None
        entries = credit_entry_list(organization=organization)
        if after is not None:
            entries = entries.filter(pk__lt=after)
        page = list(entries[: limit + 1])
        data = [_credit_entry(entry) for entry in page[:limit]]
        return Response(
            {
                "object": "list",
                "organization": organization.slug,
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(page) > limit,
            }
        )


class StatementRetrieveApi(BillingApi):
    """GET /api/billing/statements/<YYYY-MM>: one calendar month (UTC)."""

    def get(self, request: Request, month: str) -> Response:
        organization = reader_organization(request)
        match = _MONTH_RE.match(month)
        if match is None:
            raise invalid_param("month", f"Invalid month {month!r}: use YYYY-MM, as in 2025-03.")
        year, number = int(match.group(1)), int(match.group(2))
        now = timezone.now()
        if (year, number) > (now.year, now.month):
            raise invalid_param("month", f"The month {month} has not started yet.")
        statement = monthly_statement(organization=organization, year=year, month=number, now=now)
        return Response(
            {
                "object": "billing.statement",
                "organization": organization.slug,
                "month": month,
                "period_start": statement.period_start,
                "period_end": statement.period_end,
                "complete": statement.complete,
                "opening_balance_micros": statement.opening_balance_micros,
                "opening_balance_usd": micros_to_usd(statement.opening_balance_micros),
                "credits": {
                    "total_micros": statement.credits_micros,
                    "total_usd": micros_to_usd(statement.credits_micros),
                    "data": [_credit_entry(entry) for entry in statement.credit_entries],
                },
                "usage": {
                    "data": [{**line.fields, **_totals(line.totals)} for line in statement.usage_by_model],
                    "totals": _totals(statement.usage_totals),
                },
                "closing_balance_micros": statement.closing_balance_micros,
                "closing_balance_usd": micros_to_usd(statement.closing_balance_micros),
            }
        )
