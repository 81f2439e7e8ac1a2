"""What the billing API's OpenAPI document (drf-spectacular) says each operation takes and returns.

The views (billing.api) are plain APIViews that build their bodies by hand; the descriptions are attached to
them here, as drf-spectacular view extensions, so the views stay as they are. `billing.schema_urls` loads
this module; the document is drf-spectacular's for that URLconf with SETTINGS:

    manage.py spectacular --urlconf billing.schema_urls --custom-settings billing.schema.SETTINGS
    SpectacularJSONAPIView.as_view(urlconf="billing.schema_urls", custom_settings=SETTINGS, ...)
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension, OpenApiViewExtension
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view

TITLE = "Keyway billing API"
DESCRIPTION = (
    "The organization's usage, balance, credits and monthly statements, read-only. Authenticate with an API key "
    "holding the `usage:read` scope (`Authorization: Bearer sk-kw-…`) or a dashboard session. Amounts are integer "
    "micro-USD, each with a USD string beside it; dates are UTC days, and a range's `end` is included. Every "
    'error is an OpenAI error object, `{"error": {"message", "type", "param", "code"}}`.'
)
SETTINGS = {
    "TITLE": TITLE,
    "DESCRIPTION": DESCRIPTION,
    "VERSION": "1",
    "SCHEMA_PATH_PREFIX": "/api/billing",
}

INT = {"type": "integer"}
STR = {"type": "string"}
USD = {"type": "string", "pattern": r"^-?[0-9]+\.[0-9]{6}$", "description": "USD, six decimals."}
DATE = {"type": "string", "format": "date"}
DATE_TIME = {"type": "string", "format": "date-time"}
NULL_STR = {"type": ["string", "null"]}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required}


def _constant(value: str) -> dict[str, Any]:
    return {"type": "string", "enum": [value]}


TOTALS = {
    "requests": INT,
    "prompt_tokens": INT,
    "cached_tokens": INT,
    "completion_tokens": INT,
    "total_tokens": INT,
    "cost_micros": INT,
    "cost_usd": USD,
}
# A bucket of a usage report: the totals, named by what it groups (`date`, `model`, or the key).
BUCKET = _object(
    {**TOTALS, "date": DATE, "model": STR, "api_key": NULL_STR, "api_key_name": NULL_STR}, required=list(TOTALS)
)
USAGE = _object(
    {
        "object": _constant("list"),
        "organization": STR,
        "group_by": {"type": "string", "enum": ["day", "model", "key"]},
        "start": DATE,
        "end": DATE,
        "model": NULL_STR,
        "api_key": NULL_STR,
        "data": {"type": "array", "items": BUCKET},
        "totals": _object(TOTALS),
    }
)
BALANCE = _object(
    {
        "object": _constant("billing.balance"),
        "organization": STR,
        "billing_mode": STR,
        "plan": NULL_STR,
        "credit_total_micros": INT,
        "usage_total_micros": INT,
        "balance_micros": INT,
        "balance_usd": USD,
        "monthly_budget_micros": {"type": ["integer", "null"]},
        "month": {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}$"},
        "month_spend_micros": INT,
        "month_spend_usd": USD,
    }
)
CREDIT_ENTRY = _object(
    {
        "object": _constant("billing.credit_entry"),
        "id": INT,
        "created_at": DATE_TIME,
        "kind": {"type": "string", "enum": ["topup", "adjustment"]},
        "amount_micros": INT,
        "amount_usd": USD,
        "reason": STR,
        "credit_total_after_micros": INT,
    }
)
CREDITS = _object(
    {
        "object": _constant("list"),
        "organization": STR,
        "data": {"type": "array", "items": CREDIT_ENTRY},
        "first_id": {"type": ["integer", "null"]},
        "last_id": {"type": ["integer", "null"]},
        "has_more": {"type": "boolean"},
    }
)
STATEMENT = _object(
    {
        "object": _constant("billing.statement"),
        "organization": STR,
        "month": STR,
        "period_start": DATE_TIME,
        "period_end": DATE_TIME,
        "complete": {"type": "boolean"},
        "opening_balance_micros": INT,
        "opening_balance_usd": USD,
        "credits": _object({"total_micros": INT, "total_usd": USD, "data": {"type": "array", "items": CREDIT_ENTRY}}),
        "usage": _object({"data": {"type": "array", "items": BUCKET}, "totals": _object(TOTALS)}),
        "closing_balance_micros": INT,
        "closing_balance_usd": USD,
    }
)
ERROR = _object({"error": _object({"message": STR, "type": STR, "param": NULL_STR, "code": NULL_STR})})

ERRORS = {
    code: OpenApiResponse(ERROR, description=text)
    for code, text in (
        (400, "An invalid parameter (the error's `param` names it)."),
        (401, "No or an invalid key."),
        (403, "The key lacks the `usage:read` scope, or the user belongs to no organization."),
        (404, "No such organization for this caller."),
        (429, "More than 120 requests a minute by this key or user (`Retry-After` says when to retry)."),
    )
}
ORGANIZATION = OpenApiParameter(
    "organization", str, description="The organization's slug: for a user who belongs to several (a key reads its own)."
)
RANGE = [
    OpenApiParameter("start", str, description="First UTC day, YYYY-MM-DD (default: 29 days before `end`)."),
    OpenApiParameter("end", str, description="Last UTC day, YYYY-MM-DD, included (default: today); at most 366 days."),
    OpenApiParameter("model", str, description="Only this model's usage."),
    OpenApiParameter("api_key", str, description="Only this key's usage (its public id)."),
    ORGANIZATION,
]


def _documented(**methods: Any) -> Any:
    """A view extension's replacement: the view, subclassed, with these descriptions of its methods."""

    def view_replacement(self: OpenApiViewExtension) -> Any:
        documented = type(self.target.__name__, (self.target,), {"__module__": self.target.__module__})
        return extend_schema_view(**methods)(documented)

    return view_replacement


def _read(response: dict[str, Any], summary: str, parameters: list[OpenApiParameter], operation_id: str) -> Any:
    return extend_schema(
        operation_id=operation_id,
        summary=summary,
        parameters=parameters,
        responses={200: OpenApiResponse(response), **ERRORS},
    )


class UsageListSchema(OpenApiViewExtension):  # type: ignore[misc]
    target_class = "billing.api.UsageListApi"
    view_replacement = _documented(
        get=_read(
            USAGE,
            "Usage summed per UTC day, model or key, with the range's totals.",
            [OpenApiParameter("group_by", str, enum=["day", "model", "key"], description="Default: day."), *RANGE],
            "billing_usage_list",
        )
    )


class UsageExportSchema(OpenApiViewExtension):  # type: ignore[misc]
    target_class = "billing.api.UsageExportApi"
    view_replacement = _documented(
        get=extend_schema(
            operation_id="billing_usage_export",
            summary="Every ledger row of the range, as CSV.",
            parameters=RANGE,
            responses={
                (200, "text/csv"): OpenApiResponse(STR, description="A header line, then one line per call."),
                **ERRORS,
            },
        )
    )


class BalanceSchema(OpenApiViewExtension):  # type: ignore[misc]
    target_class = "billing.api.BalanceRetrieveApi"
    view_replacement = _documented(
        get=_read(
            BALANCE,
            "Credit, usage and balance; this month's spend and budget.",
            [ORGANIZATION],
            "billing_balance_retrieve",
        )
    )


class CreditListSchema(OpenApiViewExtension):  # type: ignore[misc]
    target_class = "billing.api.CreditListApi"
    view_replacement = _documented(
        get=_read(
            CREDITS,
            "The credit ledger, newest first.",
            [
                OpenApiParameter("limit", int, description="1 to 100, default 20."),
                OpenApiParameter("after", int, description="The last id of the previous page."),
                ORGANIZATION,
            ],
            "billing_credit_list",
        )
    )


class StatementSchema(OpenApiViewExtension):  # type: ignore[misc]
    target_class = "billing.api.StatementRetrieveApi"
    view_replacement = _documented(
        get=_read(
            STATEMENT,
            "One calendar month (UTC): opening balance, credits, usage by model, closing balance.",
            [
                OpenApiParameter("month", str, OpenApiParameter.PATH, description="YYYY-MM, not after this month."),
                ORGANIZATION,
            ],
            "billing_statement_retrieve",
        )
    )


class UsageKeyScheme(OpenApiAuthenticationExtension):  # type: ignore[misc]
    target_class = "billing.authentication.ApiKeyAuthentication"
    name = "UsageApiKeyAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "An API key holding the `usage:read` scope."}
