"""What every management API view shares: who may call (an admin key, or a signed-in owner or admin), the
actor they act as, OpenAI's list pagination, body field checks that name the parameter, and errors in
OpenAI's shape from the one mapping."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import orjson
from django.contrib.auth.models import AnonymousUser
from django.db.models import Model, Q, QuerySet
from rest_framework.authentication import SessionAuthentication
from rest_framework.exceptions import NotAuthenticated
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.views import APIView

from apikeys.auth import AuthenticatedKey
from apikeys.exceptions import MissingScope
from apikeys.scopes import ADMIN
from billing.api import JsonOnlyNegotiation, caller_rate_limit
from billing.authentication import ApiKeyAuthentication
from billing.errors import openai_exception_handler
from dashboard.context import current_membership
from platform_site.access import Actor
from platform_site.exceptions import NotPermitted, TenancyError
from platform_site.kernel.jsonbody import BoundedJSONParser
from platform_site.kernel.params import whole_number
from platform_site.models import Organization, Role

M = TypeVar("M", bound=Model)
MAX_LIMIT = 100


class BulkJSONRenderer(BaseRenderer):
    """JSON by orjson, for bodies of plain numbers, strings, booleans and nulls that run to megabytes (a usage
    report's page of 168 hourly buckets by key): several times faster than the standard library's encoder.
    Compact UTF-8, as DRF's JSONRenderer writes it."""

    media_type = "application/json"
    format = "json"
    charset = None

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        return b"" if data is None else orjson.dumps(data)


class AdminKeyAuthentication(ApiKeyAuthentication):
    """The billing API's bearer-key authentication, for keys holding the admin scope only."""

    def authenticate(self, request: Request) -> tuple[AnonymousUser, AuthenticatedKey] | None:
        result = super().authenticate(request)
        if result is not None and ADMIN not in result[1].scopes:
            raise MissingScope(ADMIN)
        return result


class ManagementApi(APIView):
    authentication_classes = [AdminKeyAuthentication, SessionAuthentication]
    permission_classes: list[Any] = []
    renderer_classes = [JSONRenderer]
    # JSON bodies only: a form-encoded body is refused (415), never half-read as a form.
    parser_classes = [BoundedJSONParser]
    content_negotiation_class = JsonOnlyNegotiation

    def get_exception_handler(self) -> Callable[..., Any]:
        return openai_exception_handler

    # Per caller (admin key or user) across the management API; the usage reports read up to a day of
    # ledger rows per request (bucket_width=1m).
    rate = "300/m"

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        self.actor = self._actor(request)
        caller_rate_limit(request, group="management-api", rate=self.rate, what="the management API")

    def _actor(self, request: Request) -> Actor:
        key = request.auth
        ip = request.META.get("REMOTE_ADDR") or None
        if isinstance(key, AuthenticatedKey):
            return Actor(
                organization=Organization.objects.get(pk=key.organization_id),
                role=Role.ADMIN,
                via=f"sk-kw-{key.public_id}-…",
                api_key_public_id=key.public_id,
                ip_address=ip,
            )
        if not request.user or not request.user.is_authenticated:
            raise NotAuthenticated("Provide an admin API key as 'Authorization: Bearer YOUR_ADMIN_KEY'.")
        membership = current_membership(request._request)
        if membership is None:
            raise NotPermitted("You are not a member of any organization.")
        actor = Actor(organization=membership.organization, role=membership.role, user=request.user, ip_address=ip)
        actor.require_manager("use the management API")
        return actor


def field(body: Any, name: str, kind: type | tuple[type, ...], *, required: bool = False, default: Any = None) -> Any:
    """One field of a JSON body, type-checked; a missing required one or a wrong type names `name`."""
    if not isinstance(body, dict):
        raise TenancyError("The request body must be a JSON object.", code="invalid_body")
    if name not in body or body[name] is None:
        if required:
            raise TenancyError(f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")
        return default
    value = body[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise TenancyError(f"Invalid type for '{name}'.", param=name, code="invalid_type")
    if not isinstance(value, kind):
        raise TenancyError(f"Invalid type for '{name}'.", param=name, code="invalid_type")
    return value


def _limit(request: Request, default: int) -> int:
    value = whole_number(request.query_params.get("limit", str(default)), maximum=MAX_LIMIT)
    if value is None or value < 1:
        raise TenancyError(f"limit must be a whole number from 1 to {MAX_LIMIT}.", param="limit", code="invalid_value")
    return value


def page(
    request: Request,
    items: QuerySet[M],
    *,
    public_id: Callable[[str], Q],
    render: Callable[[M], dict[str, Any]],
    default_order: str = "asc",
) -> dict[str, Any]:
    """OpenAI's list object: `limit` (1–100, default 20), `after` (an id of the list), `order` by creation time;
    `first_id`, `last_id` and `has_more`. The cursor is looked up in the same scoped list, so an id of another
    tenant's object is as unknown as a made-up one."""
    params = request.query_params
    limit = _limit(request, 20)
    order = params.get("order", default_order)
    if order not in ("asc", "desc"):
        raise TenancyError("order must be 'asc' or 'desc'.", param="order", code="invalid_value")
    ordering = ("created_at", "id") if order == "asc" else ("-created_at", "-id")
    items = items.order_by(*ordering)
    after = params.get("after")
    if after:
        cursor = items.filter(public_id(after)).values("created_at", "id").first()
        if cursor is None:
            raise TenancyError(f"No object '{after}' in this list.", param="after", code="invalid_value")
        created, pk = cursor["created_at"], cursor["id"]
        if order == "asc":
            items = items.filter(Q(created_at__gt=created) | Q(created_at=created, id__gt=pk))
        else:
            items = items.filter(Q(created_at__lt=created) | Q(created_at=created, id__lt=pk))
    rows = list(items[: limit + 1])
    data = [render(row) for row in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(rows) > limit,
    }


def page_of(request: Request, items: list[dict[str, Any]], *, default_limit: int = 20) -> dict[str, Any]:
    """OpenAI's list object over a short list held in memory (ordered as given): `limit`, and `after` or
    `before` an id of the list."""
    params = request.query_params
    limit = _limit(request, default_limit)
    ids = [item["id"] for item in items]
    start, end = 0, len(items)
    for param in ("after", "before"):
        cursor = params.get(param)
        if cursor:
            if cursor not in ids:
                raise TenancyError(f"No object '{cursor}' in this list.", param=param, code="invalid_value")
            if param == "after":
                start = ids.index(cursor) + 1
            else:
                end = ids.index(cursor)
    window = items[start:end]
    # With only `before`, the page is the one just before the cursor, as OpenAI pages backwards.
    data = window[-limit:] if params.get("before") and not params.get("after") else window[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(window) > len(data),
    }


def parse_unix(value: Any, name: str) -> datetime | None:
    from datetime import UTC

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 10**11:
        raise TenancyError(f"'{name}' must be a Unix time in seconds.", param=name, code="invalid_value")
    return datetime.fromtimestamp(value, tz=UTC)
