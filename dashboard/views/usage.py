"""The usage page: requests, tokens, spend, latency and errors per day, by model, key or project, for any
range and filter, and its CSV export. Everything is read from the daily roll-ups through the same
selectors as the billing API and the Admin API, a handful of GROUP BY queries whatever the ledger's size."""

from __future__ import annotations

import csv
from datetime import date, timedelta
from typing import Any
from urllib.parse import urlencode

from django.db.models import Sum
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import render
from django.utils import timezone

from apikeys.selectors import apikey_list
from billing.models import UsageEvent
from billing.money import micros_to_usd, usd_summary
from billing.selectors import (
    UsageFilter,
    api_key_names,
    daily_rollups,
    project_names,
    usage_latency,
    usage_totals,
)
from completions.selectors import chat_model_id_default
from dashboard.forms import UsageFilterForm
from dashboard.snippets import model_examples
from dashboard.views.common import api_base_url, member_required
from platform_site.selectors import project_list

# The stacked charts show this many series by spend, and the rest as one "Other".
MAX_SERIES = 8
# What a chart or table may be broken down by: the form's value → the roll-up column.
BREAKDOWNS = {"model": "model", "key": "api_key_id", "project": "project_id", "endpoint": "endpoint"}
_ENDPOINTS = dict(UsageEvent.Endpoint.choices)


def _range_and_filter(request: HttpRequest, form: UsageFilterForm) -> tuple[date, date, UsageFilter, str]:
    """The chosen days and filter, from a valid form; the defaults (this month so far, everything) otherwise.
    Projects and keys are looked up among the organization's own, so an id of another tenant's matches
    nothing and says nothing."""
    today = timezone.now().date()
    start, end, where, breakdown = today.replace(day=1), today, UsageFilter(), "model"
    if form.is_valid():
        data = form.cleaned_data
        start, end = data["start"], data["end"]
        breakdown = data["breakdown"] or breakdown
        where = UsageFilter(
            project_ids=[form.project_ids[data["project"]]] if data["project"] else [],
            api_key_ids=[form.key_ids[data["api_key"]]] if data["api_key"] else [],
            models=[data["model"]] if data["model"] else [],
        )
    return start, end, where, breakdown


def _labeller(organization: Any, breakdown: str, values: list[Any]) -> dict[Any, str]:
    """A readable name for each value of the breakdown column."""
    if breakdown == "api_key_id":
        names = api_key_names(organization=organization, ids=values)
        return {v: (names[v][1] or names[v][0]) if v in names else ("No key" if not v else "Deleted key")
                for v in values}
    if breakdown == "project_id":
        projects = project_names(organization=organization, ids=values)
        return {v: projects[v][1] if v in projects else ("No project" if not v else "Deleted project")
                for v in values}
    if breakdown == "endpoint":
        return {v: str(_ENDPOINTS.get(v, v)) for v in values}
    return {v: str(v) for v in values}


def _days(start: date, end: date) -> list[date]:
    return [start + timedelta(days=n) for n in range((end - start).days + 1)]


def _top(organization: Any, rows: Any, column: str, *, limit: int = 10) -> list[dict[str, Any]]:
    """The `limit` values of `column` with the most spend (then requests), with their totals."""
    grouped = list(
        rows.values(column)
        .annotate(requests_=Sum("requests"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"),
                  cost=Sum("cost_micros"), errors_=Sum("errors"))
        .order_by("-cost", "-requests_", column)[:limit]
    )
    labels = _labeller(organization, column, [row[column] for row in grouped])
    return [
        {
            "label": labels[row[column]],
            "value": row[column],
            "requests": int(row["requests_"]),
            "input_tokens": int(row["prompt"]),
            "output_tokens": int(row["completion"]),
            "spend": usd_summary(int(row["cost"])),
            "error_rate": f"{100 * int(row['errors_']) / int(row['requests_']):.1f}" if row["requests_"] else "0.0",
        }
        for row in grouped
    ]


def _series(organization: Any, rows: Any, column: str, days: list[date]) -> dict[str, Any]:
    """Per day: spend and requests stacked by the breakdown (the top MAX_SERIES by spend, the rest as Other),
    input and output tokens, and the error rate."""
    grouped = rows.values("day", column).annotate(
        requests_=Sum("requests"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"),
        cost=Sum("cost_micros"), errors_=Sum("errors"),
    ).order_by("day", column)
    index = {day: n for n, day in enumerate(days)}
    spend: dict[Any, list[int]] = {}
    requests: dict[Any, list[int]] = {}
    input_tokens, output_tokens = [0] * len(days), [0] * len(days)
    errors, calls = [0] * len(days), [0] * len(days)
    for row in grouped:
        n = index[row["day"]]
        spend.setdefault(row[column], [0] * len(days))[n] += int(row["cost"])
        requests.setdefault(row[column], [0] * len(days))[n] += int(row["requests_"])
        input_tokens[n] += int(row["prompt"])
        output_tokens[n] += int(row["completion"])
        errors[n] += int(row["errors_"])
        calls[n] += int(row["requests_"])
    ranked = sorted(spend, key=lambda v: (-sum(spend[v]), -sum(requests[v]), str(v)))
    shown, rest = ranked[:MAX_SERIES], ranked[MAX_SERIES:]
    labels = _labeller(organization, column, shown)

    def stacked(values: dict[Any, list[int]], scale: float) -> list[dict[str, Any]]:
        series = [{"label": labels[v], "data": [x / scale for x in values[v]]} for v in shown]
        if rest:
            series.append({"label": "Other", "data": [sum(values[v][n] for v in rest) / scale
                                                      for n in range(len(days))]})
        return series

    return {
        "days": [day.isoformat() for day in days],
        "spend": stacked(spend, 1_000_000),
        "requests": stacked(requests, 1),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "error_rate": [round(100 * e / c, 2) if c else None for e, c in zip(errors, calls, strict=True)],
    }


@member_required
def usage_view(request: HttpRequest) -> HttpResponse:
    organization = request.membership.organization  # type: ignore[attr-defined]
    form = _filter_form(request, organization)
    start, end, where, breakdown = _range_and_filter(request, form)
    if form.is_valid():
        # Show the range the page covers, defaults filled in, in the form's date fields.
        shown = request.GET.copy()
        shown["start"], shown["end"] = start.isoformat(), end.isoformat()
        form.data = shown
    elif not form.is_bound:
        form.initial = {"start": start, "end": end}
    rows = daily_rollups(organization=organization, start=start, end=end, where=where)
    totals = usage_totals(organization=organization, start=start, end=end, where=where)
    context: dict[str, Any] = {
        "form": form,
        "start": start,
        "end": end,
        "totals": totals,
        "spend": usd_summary(totals.cost_micros),
        "error_rate": f"{100 * totals.error_rate:.1f}",
        "ever_used": totals.requests > 0 or daily_rollups(organization=organization, start=date(2000, 1, 1),
                                                           end=end + timedelta(days=1)).exists(),
        "export_query": request.GET.urlencode(),
        "ledger_export_query": _ledger_export_query(start, end, form),
    }
    if totals.requests:
        days = _days(start, end)
        column = BREAKDOWNS[breakdown]
        latency = usage_latency(organization=organization, start=start, end=end, where=where)
        per_day = {day: (p50, p95) for day, p50, p95 in latency.per_day}
        context.update(
            breakdown_label=dict(form.fields["breakdown"].choices)[breakdown],  # type: ignore[attr-defined]
            p50=_ms(latency.p50_ms),
            p95=_ms(latency.p95_ms),
            top_models=_top(organization, rows, "model"),
            top_keys=_top(organization, rows, "api_key_id"),
            top_projects=_top(organization, rows, "project_id"),
            chart={
                **_series(organization, rows, column, days),
                "p50": [_round(per_day.get(day, (None, None))[0]) for day in days],
                "p95": [_round(per_day.get(day, (None, None))[1]) for day in days],
            },
        )
    else:
        context["snippets"] = model_examples(
            base_url=api_base_url(request), model=chat_model_id_default() or "your-model", endpoint="chat"
        )
    return render(request, "dashboard/usage.html", context)


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f} ms" if value < 10_000 else f"{value / 1000:,.1f} s"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _filter_form(request: HttpRequest, organization: Any) -> UsageFilterForm:
    """The filter form bound to the query, its choices the organization's projects, keys, and the models
    it used in the last year."""
    projects = list(project_list(organization=organization).values_list("pk", "public_id", "name"))
    keys = list(apikey_list(organization=organization).values_list("pk", "public_id", "name"))
    today = timezone.now().date()
    models = list(
        daily_rollups(organization=organization, start=today - timedelta(days=366), end=today)
        .order_by("model").values_list("model", flat=True).distinct()
    )
    return UsageFilterForm(request.GET or None, projects=projects, keys=keys, models=models)


def _ledger_export_query(start: date, end: date, form: UsageFilterForm) -> str:
    params = {"start": start.isoformat(), "end": end.isoformat()}
    if form.is_valid():
        if form.cleaned_data["model"]:
            params["model"] = form.cleaned_data["model"]
        if form.cleaned_data["api_key"]:
            params["api_key"] = form.cleaned_data["api_key"]
    return urlencode(params)


class _Echo:
    def write(self, value: str) -> str:
        return value


_CSV_HEADER = ("date", "project", "project_name", "api_key", "api_key_name", "model", "endpoint", "requests",
               "errors", "input_tokens", "cached_input_tokens", "output_tokens", "cost_usd")


@member_required
def usage_export_view(request: HttpRequest) -> StreamingHttpResponse:
    """The page's figures as CSV: one row per day, project, key, model and endpoint, from the roll-ups.
    (The billing API's usage.csv lists every call instead.)"""
    organization = request.membership.organization  # type: ignore[attr-defined]
    form = _filter_form(request, organization)
    start, end, where, _ = _range_and_filter(request, form)
    rows = list(
        daily_rollups(organization=organization, start=start, end=end, where=where)
        .order_by("day", "project_id", "api_key_id", "model", "endpoint")
        .values_list("day", "project_id", "api_key_id", "model", "endpoint", "requests", "errors", "prompt_tokens",
                     "cached_tokens", "completion_tokens", "cost_micros")
    )
    projects = project_names(organization=organization, ids=[row[1] for row in rows])
    keys = api_key_names(organization=organization, ids=[row[2] for row in rows])
    writer = csv.writer(_Echo())

    def lines() -> Any:
        yield writer.writerow(_CSV_HEADER)
        for day, project, key, model, endpoint, n, errors, prompt, cached, completion, cost in rows:
            project_id, project_name = projects.get(project, ("", ""))
            key_id, key_name = keys.get(key, ("", ""))
            yield writer.writerow((
                day.isoformat(), project_id, _safe(project_name), key_id, _safe(key_name), _safe(model),
                _ENDPOINTS.get(endpoint, endpoint), n, errors, prompt, cached, completion, micros_to_usd(cost),
            ))

    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="keyway-usage-{organization.slug}-{start}-{end}.csv"'
    response["Cache-Control"] = "no-store"
    return response


def _safe(text: str) -> str:
    """A cell a spreadsheet will not run as a formula (names are typed by members, models by callers)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
