"""Keyway's tenants as OpenAI Admin API objects (the shapes of ../shared/openai-openapi.yaml).

Keyway adds fields OpenAI lacks (a key's scopes, models, limits, expiry and status) beside OpenAI's own;
OpenAI's schemas allow additional properties, so tools written for OpenAI read these objects unchanged.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from django.contrib.auth.models import User
from django.utils import timezone

from agents.models import Agent, Connector, Hook, HookDelivery
from apikeys.models import ApiKey
from billing.money import micros_to_usd
from billing.selectors import ProjectModelLimit
from platform_site.models import AuditLog, Invitation, Membership, Project

KEY_ID_PREFIX = "key_"
# Who owns a key nobody in the organization created (made from the shell or at set-up).
PLATFORM_ACCOUNT = {"id": "sa_keyway", "name": "Keyway", "role": "owner"}


def ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def key_id(key: ApiKey) -> str:
    return KEY_ID_PREFIX + key.public_id


def _owner_user(user: User, roles: dict[int, str]) -> dict[str, Any]:
    return {
        "id": user.keyway_profile.public_id,
        "name": user.get_full_name() or user.email,
        "email": user.email,
        "role": roles.get(user.pk, "member"),
        "created_at": ts(user.date_joined),
    }


def admin_key(key: ApiKey, roles: dict[int, str]) -> dict[str, Any]:
    if key.created_by is not None and hasattr(key.created_by, "keyway_profile"):
        user = _owner_user(key.created_by, roles)
        owner = {
            "type": "user",
            "object": "organization.user",
            **{k: user[k] for k in ("id", "name", "created_at")},
            "role": user["role"],
        }
    else:
        owner = {
            "type": "service_account",
            "object": "organization.service_account",
            "created_at": ts(key.organization.created_at),
            **PLATFORM_ACCOUNT,
        }
    return {
        "object": "organization.admin_api_key",
        "id": key_id(key),
        "name": key.name,
        "redacted_value": key.masked,
        "created_at": ts(key.created_at),
        "expires_at": ts(key.expires_at),
        "last_used_at": ts(key.last_used_at),
        "owner": owner,
        "status": key.status_at(timezone.now()),
    }


def project_key(key: ApiKey, roles: dict[int, str], connectors: list[str] | None = None) -> dict[str, Any]:
    """A project key; `connectors`, the public ids of the connectors it was given, is listed where the caller
    read them (agents.selectors.key_connector_ids), and left out where it did not."""
    if key.created_by is not None and hasattr(key.created_by, "keyway_profile"):
        owner: dict[str, Any] = {"type": "user", "user": _owner_user(key.created_by, roles)}
        access = "active" if key.created_by_id in roles else "inactive"
    else:
        owner = {
            "type": "service_account",
            "service_account": {**PLATFORM_ACCOUNT, "created_at": ts(key.organization.created_at)},
        }
        access = "active"
    now = timezone.now()
    body: dict[str, Any] = {
        "object": "organization.project.api_key",
        "id": key_id(key),
        "name": key.name,
        "redacted_value": key.masked,
        "created_at": ts(key.created_at),
        "last_used_at": ts(key.last_used_at),
        "owner_project_access": access,
        "owner": owner,
        # Keyway's own fields.
        "project_id": key.project.public_id if key.project is not None else None,
        "scopes": list(key.scopes),
        "models": list(key.allowed_models),
        "rpm": key.rpm_limit,
        "tpm": key.tpm_limit,
        "monthly_budget_usd": None if key.monthly_budget_micros is None else micros_to_usd(key.monthly_budget_micros),
        "expires_at": ts(key.expires_at),
        "status": key.status_at(now),
        "previous_secret_expires_at": (
            ts(key.previous_secret_expires_at)
            if key.previous_secret_expires_at is not None and key.previous_secret_expires_at > now
            else None
        ),
    }
    if connectors is not None:
        body["connectors"] = connectors
    return body


def project(item: Project) -> dict[str, Any]:
    return {
        "id": item.public_id,
        "object": "organization.project",
        "name": item.name,
        "created_at": ts(item.created_at),
        "archived_at": ts(item.archived_at),
        "status": item.status,
        "is_default": item.is_default,
    }


def rate_limit(item: ProjectModelLimit) -> dict[str, Any]:
    body: dict[str, Any] = {
        "object": "project.rate_limit",
        "id": item.id,
        "model": item.model,
        "max_requests_per_1_minute": item.max_requests_per_1_minute,
        "max_tokens_per_1_minute": item.max_tokens_per_1_minute,
    }
    # Only present where it applies, as OpenAI has it: here, where the project set a daily limit.
    if item.max_requests_per_1_day is not None:
        body["max_requests_per_1_day"] = item.max_requests_per_1_day
    return body


MICROS_PER_CENT = 10_000


def spend_limit(*, budget_micros: int, spent_micros: int) -> dict[str, Any]:
    """A project's monthly budget as OpenAI's hard spend limit, in cents. It is enforcing once this month's
    spend has reached it (requests are refused until the month ends or the limit is raised)."""
    return {
        "object": "project.spend_limit",
        "threshold_amount": budget_micros // MICROS_PER_CENT,
        "currency": "USD",
        "interval": "month",
        "enforcement": {"status": "enforcing" if spent_micros >= budget_micros else "inactive"},
    }


def user(membership: Membership) -> dict[str, Any]:
    return {
        "object": "organization.user",
        "id": membership.user.keyway_profile.public_id,
        "name": membership.user.get_full_name() or membership.user.email,
        "email": membership.user.email,
        "role": membership.role,
        "added_at": ts(membership.created_at),
    }


def invite(item: Invitation, now: datetime) -> dict[str, Any]:
    return {
        "object": "organization.invite",
        "id": item.public_id,
        "email": item.email,
        "role": item.role,
        "status": item.status_at(now),
        "created_at": ts(item.created_at),
        "expires_at": ts(item.expires_at),
        "accepted_at": ts(item.accepted_at),
        "projects": [],
    }


# Audit rows served by the API: those whose action is one of OpenAI's audit event types. Keyway's own events
# (organization.created, credits, plans) are on the dashboard's audit page only.
OPENAI_EVENT_TYPES = frozenset(
    {
        "api_key.created",
        "api_key.updated",
        "api_key.deleted",
        "invite.sent",
        "invite.accepted",
        "invite.deleted",
        "organization.updated",
        "project.created",
        "project.updated",
        "project.archived",
        "rate_limit.updated",
        "user.added",
        "user.updated",
        "user.deleted",
    }
)


def audit_log(row: AuditLog) -> dict[str, Any]:
    actor: dict[str, Any]
    if row.actor_api_key:
        actor = {
            "type": "api_key",
            "api_key": {
                "id": KEY_ID_PREFIX + row.actor_api_key,
                "type": "service_account",
                "service_account": {"id": PLATFORM_ACCOUNT["id"]},
            },
        }
    elif row.actor is not None:
        session: dict[str, Any] = {"user": {"id": _profile_id(row.actor), "email": row.actor.email}}
        if row.ip_address:
            session["ip_address"] = row.ip_address
        actor = {"type": "session", "session": session}
    else:
        actor = {
            "type": "api_key",
            "api_key": {"type": "service_account", "service_account": {"id": PLATFORM_ACCOUNT["id"]}},
        }
    target = row.target
    if row.action.startswith("api_key."):
        target = KEY_ID_PREFIX + target
    body: dict[str, Any] = {"id": target}
    for part in ("data", "changes_requested"):
        if isinstance(row.details.get(part), dict):
            body[part] = row.details[part]
    event: dict[str, Any] = {
        "id": f"audit_log-{row.pk}",
        "type": row.action,
        "effective_at": ts(row.created_at),
        "actor": actor,
        row.action: body,
    }
    if row.project is not None:
        event["project"] = {"id": row.project.public_id, "name": row.project.name}
    return event


def _profile_id(account: User) -> str:
    profile = getattr(account, "keyway_profile", None)
    return profile.public_id if profile is not None else ""


def roles_of(memberships: Any) -> dict[int, str]:
    return {m.user_id: m.role for m in memberships}


def connector(item: Connector) -> dict[str, Any]:
    """A connector, without its secret: an HTTP connector's signing secret is in its creation response only,
    and an MCP connector's authorization is never shown."""
    body: dict[str, Any] = {
        "id": item.public_id,
        "object": "organization.project.connector",
        "project_id": item.project.public_id,
        "type": item.type,
        "name": item.name,
        "description": item.description,
        "url": item.url,
        "timeout_ms": item.timeout_ms,
        "max_response_bytes": item.max_response_bytes,
        "created_at": ts(item.created_at),
    }
    if item.type == Connector.Type.HTTP:
        body["parameters"] = orjson.loads(item.parameters_json or "{}")
    return body


def agent(item: Agent) -> dict[str, Any]:
    """An agent; its connectors are read from the prefetched relation (agents.selectors.agent_list)."""
    return {
        "id": item.public_id,
        "object": "organization.project.agent",
        "project_id": item.project.public_id,
        "slug": item.slug,
        "model_id": f"agent:{item.slug}",
        "name": item.name,
        "model": item.model,
        "instructions": item.instructions,
        "connectors": [c.public_id for c in sorted(item.connectors.all(), key=lambda c: c.name)],
        "max_iterations": item.max_iterations,
        "created_at": ts(item.created_at),
    }


def hook(item: Hook) -> dict[str, Any]:
    return {
        "id": item.public_id,
        "object": "organization.project.hook",
        "project_id": item.project.public_id,
        "name": item.name,
        "agent": item.agent.slug,
        "mode": item.mode,
        "callback_url": item.callback_url or None,
        "url": f"/hooks/{item.name}",
        "created_at": ts(item.created_at),
    }


def hook_delivery(item: HookDelivery) -> dict[str, Any]:
    """One delivery, without the reply: that is the agent's answer, prompt text the log has no need of."""
    return {
        "id": item.public_id,
        "object": "organization.project.hook.delivery",
        "status": item.status,
        "attempts": item.attempts,
        "sender": item.sender,
        "session_id": item.session_id or None,
        "last_status_code": item.last_status_code,
        "last_error": item.last_error or None,
        "created_at": ts(item.created_at),
        "finished_at": ts(item.finished_at),
    }
