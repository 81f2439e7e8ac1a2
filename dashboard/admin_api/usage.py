"""OpenAI's usage and costs reports of the Admin API: GET /v1/organization/usage/completions,
/v1/organization/usage/embeddings and /v1/organization/costs, read from the same usage series as the
dashboard's charts (billing.selectors.usage_series: one GROUP BY over the roll-ups for days and hours, over the
ledger for minutes).

A report is a page of time buckets, and buckets are whole UTC periods: `start_time` is floored to the start of
its day, hour or minute (`bucket_width` 1d, 1h or 1m), and `end_time` (exclusive, now when absent) is rounded up
to the end of its period, because the roll-ups hold whole days and hours and cannot split one. Every period of
the range is a bucket, with `results: []` where nothing was used, as OpenAI answers; a page holds at most `limit`
of them and `next_page` says where the next one starts. That cursor encodes only a time: whoever sends it reads
their own organization's usage at that time, nobody else's.

Completions are the chat.completions, responses and realtime calls; embeddings the embeddings calls; costs all of
them. Keyway records no user, batch or service tier per call, so:
- `group_by` user_id and service_tier are accepted and group nothing (their fields stay null);
- `group_by` batch groups nothing either and says `false`: Keyway has no Batch API, so every call is a
  non-batch call; for the same reason the filter batch=true matches nothing and batch=false everything;
- the filter `user_ids` is refused: ignoring it would report everyone's usage as those users', and matching
  nothing would claim they used nothing.
The ledger does not split tokens by modality either: audio tokens are inside input_tokens and output_tokens,
and input_audio_tokens and output_audio_tokens are 0. Every metered call counts in num_model_requests, failed
ones included, as the ledger counts them.

Project and key ids in filters that are not this organization's (another tenant's, a deleted key's, made-up
ones) match nothing, as in this API's audit log filter: the answer is the same whichever they are, so it tells
nothing about other tenants. Grouped results name projects and keys by
their public ids (`proj_…`, `key_…`); usage of a key or project deleted since is reported under null.

A cost's `line_item` is the model: the ledger holds one cost per call, not its input and output parts, so the
model is the finest line item it can honestly give; `quantity` and `quantity_unit` are null for the same reason.
The `line_items` filter (which newer OpenAI SDKs send) is therefore a filter on models.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

from django.http import QueryDict
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework.request import Request
from rest_framework.response import Response

from apikeys.selectors import apikey_list
from billing.models import MICROS_PER_USD, UsageEvent
from billing.selectors import (
    Dimension,
    UsageFilter,
    UsageTotals,
    Width,
    api_key_names,
    project_names,
    usage_series,
)
from dashboard.admin_api import objects
from dashboard.admin_api import schema as doc
from dashboard.admin_api.base import BulkJSONRenderer, ManagementApi
from platform_site.exceptions import TenancyError
from platform_site.kernel.params import whole_number
from platform_site.models import Organization
from platform_site.selectors import project_list

WIDTH_SECONDS: dict[Width, int] = {"1m": 60, "1h": 3_600, "1d": 86_400}
# OpenAI's default and maximum `limit` (buckets per page) for each bucket width it allows.
USAGE_LIMITS: dict[Width, tuple[int, int]] = {"1d": (7, 31), "1h": (24, 168), "1m": (60, 1_440)}
COSTS_LIMITS: dict[Width, tuple[int, int]] = {"1d": (7, 180)}
# Values one list filter may hold: every value is a bound parameter of the query, and SQLite and PostgreSQL
# refuse a statement with tens of thousands of them (a 500 where a 400 is due).
MAX_FILTER_VALUES = 100
# Unix seconds from 1970 to the year 5138: a page's end, up to 180 days past its start, stays a datetime.
_LAST_SECOND = 10**11
_CURSOR_PREFIX = "page_"
_COMPLETION_ENDPOINTS = (UsageEvent.Endpoint.CHAT, UsageEvent.Endpoint.RESPONSES, UsageEvent.Endpoint.REALTIME)


def _bad(message: str, param: str, code: str = "invalid_value") -> TenancyError:
    return TenancyError(message, param=param, code=code)


@dataclass(frozen=True, slots=True)
class Window:
    """The buckets of one page, in Unix seconds on bucket boundaries: from `first` to `until` (exclusive),
    within a range that ends at `end`."""

    width: Width
    first: int
    until: int
    end: int

    @property
    def starts(self) -> range:
        return range(self.first, self.until, WIDTH_SECONDS[self.width])

    @property
    def next_page(self) -> str | None:
        return page_cursor(self.until) if self.until < self.end else None


def page_cursor(start: int) -> str:
    """The opaque `next_page` of a page that starts at `start` (Unix seconds)."""
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(struct.pack(">Q", start)).decode().rstrip("=")


def _cursor_start(token: str) -> int | None:
    """The time a `page` cursor holds, or None when it is not one this API wrote."""
    if not token.startswith(_CURSOR_PREFIX):
        return None
    body = token.removeprefix(_CURSOR_PREFIX)
    try:
        packed = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(packed) != 8:
        return None
    start: int = struct.unpack(">Q", packed)[0]
    return start


def _unix(params: QueryDict, name: str) -> int | None:
    raw = params.get(name, "")
    if not raw:
        return None
    seconds = whole_number(raw, maximum=_LAST_SECOND)
    if seconds is None:
        raise _bad(f"'{name}' must be a Unix time in whole seconds, from 0 to {_LAST_SECOND}.", name)
    return seconds


def window_parse(*, params: QueryDict, limits: Mapping[Width, tuple[int, int]], now: datetime) -> Window:
    """The page a request asks for, from `start_time`, `end_time`, `bucket_width`, `limit` and `page`; every
    bad one is a 400 naming it."""
    raw_width = params.get("bucket_width") or "1d"
    if raw_width not in limits:
        raise _bad(f"bucket_width must be one of {', '.join(sorted(limits))}.", "bucket_width")
    width = cast(Width, raw_width)
    seconds = WIDTH_SECONDS[width]
    start = _unix(params, "start_time")
    if start is None:
        raise _bad("Missing required parameter: 'start_time'.", "start_time", "missing_required_parameter")
    end = _unix(params, "end_time")
    if end is None:
        end = int(now.timestamp())
        if start >= end:
            raise _bad("start_time must be in the past.", "start_time")
    elif start >= end:
        raise _bad("end_time must be after start_time.", "end_time")
    default, maximum = limits[width]
    raw_limit = params.get("limit", "")
    limit = whole_number(raw_limit, maximum=maximum) if raw_limit else default
    if limit is None or limit < 1:
        raise _bad(f"limit must be a whole number from 1 to {maximum} with bucket_width={width}.", "limit")
    first = start - start % seconds
    last = -(-end // seconds) * seconds
    token = params.get("page", "")
    if token:
        cursor = _cursor_start(token)
        # A cursor of this range only: one that is not on a bucket boundary, or outside the range, was not
        # written for this query.
        if cursor is None or cursor % seconds or not first <= cursor < last:
            raise _bad("page is not a next_page cursor of this query.", "page")
        first = cursor
    return Window(width=width, first=first, until=min(first + limit * seconds, last), end=last)


def _listed(params: QueryDict, name: str) -> list[str]:
    """A list parameter, sent as `name[]=a&name[]=b` (as OpenAI's SDKs do) or `name=a&name=b`; blanks are
    dropped."""
    values = [value for value in (*params.getlist(f"{name}[]"), *params.getlist(name)) if value]
    if len(values) > MAX_FILTER_VALUES:
        raise _bad(f"{name} may list at most {MAX_FILTER_VALUES} values.", name)
    return values


class Group(NamedTuple):
    """What a result is grouped by, as the API names it (None where it is not grouped by that). A tuple: a
    page may make some 16,000 of them."""

    project_id: str | None = None
    api_key_id: str | None = None
    model: str | None = None


def _sum(a: UsageTotals, b: UsageTotals) -> UsageTotals:
    return UsageTotals(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in fields(UsageTotals)})


def buckets_read(
    *, organization: Organization, window: Window, dimensions: Sequence[Dimension], where: UsageFilter | None
) -> dict[int, dict[Group, UsageTotals]]:
    """The usage of each bucket start of `window` that has any, per group; `where` None matches nothing.

    Groups are rendered before they are summed: a deleted key's usage and keyless usage both say null, and are
    one result, so no bucket lists the same group twice."""
    if where is None:
        return {}
    points = usage_series(
        organization=organization,
        since=datetime.fromtimestamp(window.first, tz=UTC),
        until=datetime.fromtimestamp(window.until, tz=UTC),
        width=window.width,
        group_by=dimensions,
        where=where,
    )
    projects = (
        project_names(organization=organization, ids=[p.group["project_id"] or 0 for p in points])
        if "project_id" in dimensions
        else {}
    )
    keys = (
        api_key_names(organization=organization, ids=[p.group["api_key_id"] or 0 for p in points])
        if "api_key_id" in dimensions
        else {}
    )
    # Each project's and key's public id, made once.
    project_ids = {pk: public_id for pk, (public_id, _) in projects.items()}
    key_ids = {pk: objects.KEY_ID_PREFIX + public_id for pk, (public_id, _) in keys.items()}
    found: dict[int, dict[Group, UsageTotals]] = {}
    seconds: dict[datetime, int] = {}
    for point in points:
        group = Group(
            project_ids.get(point.group.get("project_id") or 0),
            key_ids.get(point.group.get("api_key_id") or 0),
            point.group.get("model"),
        )
        start = seconds.get(point.start)
        if start is None:
            start = seconds[point.start] = int(point.start.timestamp())
        bucket = found.setdefault(start, {})
        bucket[group] = _sum(bucket[group], point.totals) if group in bucket else point.totals
    return found


def _ids(*, organization: Organization, projects: list[str], keys: list[str]) -> tuple[list[int], list[int]]:
    """The database ids of the organization's projects and keys among the public ids asked for."""
    project_ids = (
        list(
            project_list(organization=organization, include_archived=True)
            .filter(public_id__in=projects)
            .values_list("pk", flat=True)
        )
        if projects
        else []
    )
    public = [key.removeprefix(objects.KEY_ID_PREFIX) for key in keys]
    key_ids = (
        list(apikey_list(organization=organization).filter(public_id__in=public).values_list("pk", flat=True))
        if keys
        else []
    )
    return project_ids, key_ids


_PUBLIC_DESCRIPTION = (
    "OpenAI's Admin API report. Buckets are whole UTC periods: start_time is floored to the start of its bucket "
    "and end_time rounded up to the end of its bucket. Every period of the range is a bucket, empty ones with "
    "`results: []`; follow `next_page` with `page` for the rest. Project and key ids that are not this "
    "organization's match nothing."
)


def _list_param(name: str, description: str) -> OpenApiParameter:
    return OpenApiParameter(name, str, many=True, description=description)


def _document(
    *,
    operation_id: str,
    summary: str,
    result: dict[str, Any],
    widths: Mapping[Width, tuple[int, int]],
    group_by: Collection[str],
    filters: Sequence[OpenApiParameter],
) -> Any:
    bucket = doc.body(
        {
            "object": {"type": "string", "enum": ["bucket"]},
            "start_time": doc.INT,
            "end_time": doc.INT,
            "results": {"type": "array", "items": result},
        },
        ["object", "start_time", "end_time", "results"],
    )
    page = doc.body(
        {
            "object": {"type": "string", "enum": ["page"]},
            "data": {"type": "array", "items": bucket},
            "has_more": {"type": "boolean"},
            "next_page": doc.NULL_STR,
        },
        ["object", "data", "has_more", "next_page"],
    )
    limits = "; ".join(f"{width}: default {d}, max {m}" for width, (d, m) in widths.items())
    # On the inherited `get` (extend_schema_view), since an operation id on the class itself is refused.
    get = extend_schema(
        operation_id=operation_id,
        summary=summary,
        description=_PUBLIC_DESCRIPTION,
        parameters=[
            OpenApiParameter(
                "start_time",
                int,
                required=True,
                description="Unix seconds, inclusive; floored to the start of its bucket (UTC).",
            ),
            OpenApiParameter(
                "end_time", int, description="Unix seconds, exclusive (default: now); rounded up to a bucket's end."
            ),
            OpenApiParameter("bucket_width", str, enum=list(widths), description="Default 1d."),
            OpenApiParameter("limit", int, description=f"Buckets per page ({limits})."),
            OpenApiParameter("page", str, description="The `next_page` of the previous page."),
            OpenApiParameter("group_by", str, many=True, enum=list(group_by)),
            _list_param("project_ids", "Only these projects (`proj_…`)."),
            _list_param("api_key_ids", "Only these keys (`key_…`)."),
            *filters,
        ],
        responses={200: OpenApiResponse(page), **{code: doc.ERRORS[code] for code in (400, 401, 403)}},
    )
    return extend_schema_view(get=get)


_GROUP_FIELDS = {"project_id": doc.NULL_STR, "api_key_id": doc.NULL_STR, "model": doc.NULL_STR}


class _UsageReportApi(ManagementApi):
    """A report: parse the page and its filters, read the usage series once, render OpenAI's page of buckets."""

    renderer_classes = [BulkJSONRenderer]

    limits: Mapping[Width, tuple[int, int]] = USAGE_LIMITS
    # The group_by values the report takes, each with the dimension of the usage series it groups by (None: it
    # is accepted, as OpenAI lists it, and groups nothing here).
    groupings: Mapping[str, Dimension | None]
    endpoints: Sequence[int] = ()
    # The parameter naming models to keep.
    models_param = "models"
    takes_user_ids = True
    takes_batch = False

    def result(self, group: Group, totals: UsageTotals, grouped: Collection[str]) -> dict[str, Any]:
        raise NotImplementedError

    def group_by(self, params: QueryDict) -> list[str]:
        grouped = _listed(params, "group_by")
        for name in grouped:
            if name not in self.groupings:
                raise _bad(f"group_by takes {', '.join(self.groupings)}; not {name[:60]!r}.", "group_by")
        return grouped

    def where(self, params: QueryDict) -> UsageFilter | None:
        """The filter the query asks for, limited to this report's endpoints; None when nothing can match."""
        if self.takes_user_ids and _listed(params, "user_ids"):
            raise _bad(
                "Keyway does not record which user made a call, so usage cannot be filtered by user_ids.",
                "user_ids",
                "unsupported_parameter",
            )
        projects, keys = _listed(params, "project_ids"), _listed(params, "api_key_ids")
        models = _listed(params, self.models_param)
        batch = params.get("batch", "").lower() if self.takes_batch else ""
        if batch not in ("", "true", "false"):
            raise _bad("batch must be true or false.", "batch")
        if batch == "true":
            return None  # Keyway has no Batch API: no call is a batch job.
        project_ids, key_ids = _ids(organization=self.actor.organization, projects=projects, keys=keys)
        # An empty list of ids would mean "every project"; ids that are none of this organization's match nothing.
        if (projects and not project_ids) or (keys and not key_ids):
            return None
        return UsageFilter(project_ids=project_ids, api_key_ids=key_ids, models=models, endpoints=self.endpoints)

    def get(self, request: Request) -> Response:
        params = request.query_params
        window = window_parse(params=params, limits=self.limits, now=timezone.now())
        grouped = self.group_by(params)
        where = self.where(params)
        dimensions = [dimension for name in grouped if (dimension := self.groupings[name]) is not None]
        found = buckets_read(organization=self.actor.organization, window=window, dimensions=dimensions, where=where)
        width = WIDTH_SECONDS[window.width]
        data = [
            {
                "object": "bucket",
                "start_time": start,
                "end_time": start + width,
                "results": [self.result(group, totals, grouped) for group, totals in found.get(start, {}).items()],
            }
            for start in window.starts
        ]
        return Response(
            {"object": "page", "data": data, "has_more": window.next_page is not None, "next_page": window.next_page}
        )


_MODELS = _list_param("models", "Only these models.")
_USERS = _list_param("user_ids", "Refused: Keyway does not record which user made a call.")
COMPLETIONS_GROUPINGS: dict[str, Dimension | None] = {
    "project_id": "project_id",
    "user_id": None,
    "api_key_id": "api_key_id",
    "model": "model",
    "batch": None,
    "service_tier": None,
}
EMBEDDINGS_GROUPINGS: dict[str, Dimension | None] = {
    "project_id": "project_id",
    "user_id": None,
    "api_key_id": "api_key_id",
    "model": "model",
}
COSTS_GROUPINGS: dict[str, Dimension | None] = {
    "project_id": "project_id",
    "line_item": "model",
    "api_key_id": "api_key_id",
}


@_document(
    operation_id="usage_completions",
    summary="Completions usage (chat.completions, responses and realtime calls) per time bucket",
    result=doc.body(
        {
            "object": {"type": "string", "enum": ["organization.usage.completions.result"]},
            **{
                name: doc.INT
                for name in (
                    "input_tokens",
                    "output_tokens",
                    "input_cached_tokens",
                    "input_audio_tokens",
                    "output_audio_tokens",
                    "num_model_requests",
                )
            },
            **_GROUP_FIELDS,
            "user_id": doc.NULL_STR,
            "batch": {"type": ["boolean", "null"]},
            "service_tier": doc.NULL_STR,
        },
        ["object", "input_tokens", "output_tokens", "num_model_requests"],
    ),
    widths=USAGE_LIMITS,
    group_by=COMPLETIONS_GROUPINGS,
    filters=[_MODELS, _USERS, OpenApiParameter("batch", bool, description="true matches nothing (no batches).")],
)
class UsageCompletionsApi(_UsageReportApi):
    groupings = COMPLETIONS_GROUPINGS
    endpoints = _COMPLETION_ENDPOINTS
    takes_batch = True

    def result(self, group: Group, totals: UsageTotals, grouped: Collection[str]) -> dict[str, Any]:
        return {
            "object": "organization.usage.completions.result",
            "input_tokens": totals.prompt_tokens,
            "output_tokens": totals.completion_tokens,
            "input_cached_tokens": totals.cached_tokens,
            "input_audio_tokens": 0,
            "output_audio_tokens": 0,
            "num_model_requests": totals.requests,
            "project_id": group.project_id,
            "user_id": None,
            "api_key_id": group.api_key_id,
            "model": group.model,
            "batch": False if "batch" in grouped else None,
            "service_tier": None,
        }


@_document(
    operation_id="usage_embeddings",
    summary="Embeddings usage per time bucket",
    result=doc.body(
        {
            "object": {"type": "string", "enum": ["organization.usage.embeddings.result"]},
            "input_tokens": doc.INT,
            "num_model_requests": doc.INT,
            **_GROUP_FIELDS,
            "user_id": doc.NULL_STR,
        },
        ["object", "input_tokens", "num_model_requests"],
    ),
    widths=USAGE_LIMITS,
    group_by=EMBEDDINGS_GROUPINGS,
    filters=[_MODELS, _USERS],
)
class UsageEmbeddingsApi(_UsageReportApi):
    groupings = EMBEDDINGS_GROUPINGS
    endpoints = (UsageEvent.Endpoint.EMBEDDINGS,)

    def result(self, group: Group, totals: UsageTotals, grouped: Collection[str]) -> dict[str, Any]:
        return {
            "object": "organization.usage.embeddings.result",
            "input_tokens": totals.prompt_tokens,
            "num_model_requests": totals.requests,
            "project_id": group.project_id,
            "user_id": None,
            "api_key_id": group.api_key_id,
            "model": group.model,
        }


@_document(
    operation_id="costs",
    summary="Costs in USD per day (line items are models)",
    result=doc.body(
        {
            "object": {"type": "string", "enum": ["organization.costs.result"]},
            "amount": doc.body({"value": {"type": "number"}, "currency": doc.STR}, ["value", "currency"]),
            "line_item": doc.NULL_STR,
            "project_id": doc.NULL_STR,
            "api_key_id": doc.NULL_STR,
            "quantity": {"type": ["number", "null"]},
            "quantity_unit": doc.NULL_STR,
        },
        ["object", "amount"],
    ),
    widths=COSTS_LIMITS,
    group_by=COSTS_GROUPINGS,
    filters=[_list_param("line_items", "Only these line items (models).")],
)
class CostsApi(_UsageReportApi):
    limits = COSTS_LIMITS
    groupings = COSTS_GROUPINGS
    # Line items are models here, so the `line_items` filter of OpenAI's SDK is a filter on models.
    models_param = "line_items"
    takes_user_ids = False

    def result(self, group: Group, totals: UsageTotals, grouped: Collection[str]) -> dict[str, Any]:
        return {
            "object": "organization.costs.result",
            # A JSON number, as OpenAI sends it: micro-USD divided once is exact to the sixth decimal.
            "amount": {"value": totals.cost_micros / MICROS_PER_USD, "currency": "usd"},
            "line_item": group.model,
            "project_id": group.project_id,
            "api_key_id": group.api_key_id,
            "quantity": None,
            "quantity_unit": None,
        }
