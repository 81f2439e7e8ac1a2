"""What the management API's OpenAPI document (drf-spectacular) says each operation takes and returns. The
objects are OpenAI's Admin API objects; Keyway's extra fields are listed beside theirs."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema

INT = {"type": "integer"}
STR = {"type": "string"}
NULL_INT = {"type": ["integer", "null"]}
NULL_STR = {"type": ["string", "null"]}
STRS = {"type": "array", "items": STR}


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


OWNER = _object({"type": STR, "object": STR, "id": STR, "name": STR, "created_at": INT, "role": STR}, ["type"])
ADMIN_KEY = _object(
    {
        "object": {"type": "string", "enum": ["organization.admin_api_key"]},
        "id": STR,
        "name": NULL_STR,
        "redacted_value": STR,
        "created_at": INT,
        "expires_at": NULL_INT,
        "last_used_at": NULL_INT,
        "owner": OWNER,
        "status": STR,
    },
    ["object", "id", "redacted_value", "created_at", "expires_at", "owner"],
)
PROJECT_KEY = _object(
    {
        "object": {"type": "string", "enum": ["organization.project.api_key"]},
        "id": STR,
        "name": STR,
        "redacted_value": STR,
        "created_at": INT,
        "last_used_at": NULL_INT,
        "owner_project_access": {"type": "string", "enum": ["active", "inactive"]},
        "owner": {"type": "object"},
        "project_id": STR,
        "scopes": STRS,
        "models": STRS,
        "rpm": NULL_INT,
        "tpm": NULL_INT,
        "monthly_budget_usd": NULL_STR,
        "expires_at": NULL_INT,
        "status": STR,
        "previous_secret_expires_at": NULL_INT,
        "connectors": STRS,
    },
    ["object", "id", "name", "redacted_value", "created_at", "last_used_at", "owner_project_access", "owner"],
)
PROJECT = _object(
    {
        "id": STR,
        "object": {"type": "string", "enum": ["organization.project"]},
        "name": NULL_STR,
        "created_at": INT,
        "archived_at": NULL_INT,
        "status": STR,
        "is_default": {"type": "boolean"},
    },
    ["id", "object", "created_at"],
)
RATE_LIMIT = _object(
    {
        "object": {"type": "string", "enum": ["project.rate_limit"]},
        "id": STR,
        "model": STR,
        "max_requests_per_1_minute": INT,
        "max_tokens_per_1_minute": INT,
        "max_requests_per_1_day": INT,
    },
    ["object", "id", "model", "max_requests_per_1_minute", "max_tokens_per_1_minute"],
)
SPEND_LIMIT = _object(
    {
        "object": {"type": "string", "enum": ["project.spend_limit"]},
        "threshold_amount": INT,
        "currency": {"type": "string", "enum": ["USD"]},
        "interval": {"type": "string", "enum": ["month"]},
        "enforcement": _object({"status": {"type": "string", "enum": ["inactive", "enforcing"]}}, ["status"]),
    },
    ["object", "threshold_amount", "currency", "interval", "enforcement"],
)
SPEND_LIMIT_DELETED = _object(
    {"object": {"type": "string", "enum": ["project.spend_limit.deleted"]}, "deleted": {"type": "boolean"}},
    ["object", "deleted"],
)
USER = _object(
    {
        "object": {"type": "string", "enum": ["organization.user"]},
        "id": STR,
        "name": NULL_STR,
        "email": NULL_STR,
        "role": NULL_STR,
        "added_at": INT,
    },
    ["object", "id", "added_at"],
)
INVITE = _object(
    {
        "object": {"type": "string", "enum": ["organization.invite"]},
        "id": STR,
        "email": STR,
        "role": STR,
        "status": {"type": "string", "enum": ["accepted", "expired", "pending"]},
        "created_at": INT,
        "expires_at": NULL_INT,
        "accepted_at": NULL_INT,
        "projects": {"type": "array", "items": {"type": "object"}},
    },
    ["object", "id", "email", "role", "status", "created_at", "projects"],
)
AUDIT_LOG = _object(
    {"id": STR, "type": STR, "effective_at": INT, "actor": {"type": "object"}, "project": {"type": "object"}},
    ["id", "type", "effective_at"],
)
CONNECTOR = _object(
    {
        "id": STR,
        "object": {"type": "string", "enum": ["organization.project.connector"]},
        "project_id": STR,
        "type": {"type": "string", "enum": ["http", "mcp"]},
        "name": STR,
        "description": STR,
        "url": STR,
        "parameters": {"type": "object"},
        "timeout_ms": INT,
        "max_response_bytes": INT,
        "created_at": INT,
    },
    ["id", "object", "project_id", "type", "name", "description", "url", "timeout_ms", "max_response_bytes",
     "created_at"],
)
AGENT = _object(
    {
        "id": STR,
        "object": {"type": "string", "enum": ["organization.project.agent"]},
        "project_id": STR,
        "slug": STR,
        "model_id": STR,
        "name": STR,
        "model": STR,
        "instructions": STR,
        "connectors": STRS,
        "max_iterations": INT,
        "created_at": INT,
    },
    ["id", "object", "project_id", "slug", "model_id", "name", "model", "instructions", "connectors",
     "max_iterations", "created_at"],
)
HOOK = _object(
    {
        "id": STR,
        "object": {"type": "string", "enum": ["organization.project.hook"]},
        "project_id": STR,
        "name": STR,
        "agent": STR,
        "mode": {"type": "string", "enum": ["sync", "callback"]},
        "callback_url": NULL_STR,
        "url": STR,
        "created_at": INT,
    },
    ["id", "object", "project_id", "name", "agent", "mode", "callback_url", "url", "created_at"],
)
HOOK_DELIVERY = _object(
    {
        "id": STR,
        "object": {"type": "string", "enum": ["organization.project.hook.delivery"]},
        "status": {"type": "string", "enum": ["running", "answered", "pending", "delivered", "failed"]},
        "attempts": INT,
        "sender": STR,
        "session_id": NULL_STR,
        "last_status_code": NULL_INT,
        "last_error": NULL_STR,
        "created_at": INT,
        "finished_at": NULL_INT,
    },
    ["id", "object", "status", "attempts", "sender", "session_id", "last_status_code", "last_error", "created_at",
     "finished_at"],
)
ERROR = _object(
    {
        "error": _object(
            {"message": STR, "type": STR, "param": NULL_STR, "code": NULL_STR}, ["message", "type", "param", "code"]
        )
    },
    ["error"],
)


def with_value(schema: dict[str, Any]) -> dict[str, Any]:
    """A created or rotated key: the object plus its secret in `value`, returned this once."""
    return {**schema, "properties": {**schema["properties"], "value": STR}, "required": [*schema["required"], "value"]}


def with_secret(schema: dict[str, Any], *, always: bool = True) -> dict[str, Any]:
    """A created connector or hook: the object plus its signing secret in `secret`, returned this once (an
    MCP connector has none, hence `always`)."""
    required = [*schema["required"], "secret"] if always else schema["required"]
    return {**schema, "properties": {**schema["properties"], "secret": STR}, "required": required}


def listing(item: dict[str, Any]) -> dict[str, Any]:
    return _object(
        {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": item},
            "first_id": NULL_STR,
            "last_id": NULL_STR,
            "has_more": {"type": "boolean"},
        },
        ["object", "data", "has_more"],
    )


def deleted(kind: str) -> dict[str, Any]:
    return _object(
        {"object": {"type": "string", "enum": [kind]}, "id": STR, "deleted": {"type": "boolean"}},
        ["object", "id", "deleted"],
    )


LIST_PARAMS = [
    OpenApiParameter("limit", int, description="1 to 100, default 20."),
    OpenApiParameter("after", str, description="An object id of the list: return the objects after it."),
    OpenApiParameter("order", str, enum=["asc", "desc"], description="By creation time."),
]
ERRORS = {
    code: OpenApiResponse(ERROR, description=text)
    for code, text in (
        (400, "Invalid request (the error's `param` names the field)."),
        (401, "No or an invalid key."),
        (403, "The key lacks the admin scope, or the role does not allow this."),
        (404, "No such object here."),
        (409, "The change contradicts the current state."),
    )
}


def operation(
    response: dict[str, Any],
    *,
    request: dict[str, Any] | None = None,
    listed: bool = False,
    summary: str = "",
    operation_id: str | None = None,
) -> Any:
    return extend_schema(
        operation_id=operation_id,
        request=None if request is None else {"application/json": request},
        responses={200: OpenApiResponse(response), **ERRORS},
        parameters=LIST_PARAMS if listed else None,
        summary=summary or None,
    )


def body(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return _object(properties, required or [])


class AdminKeyScheme(OpenApiAuthenticationExtension):  # type: ignore[misc]
    target_class = "dashboard.admin_api.base.AdminKeyAuthentication"
    name = "AdminApiKeyAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "An admin key (scope `admin`)."}
