"""What an agent turn reads before it runs and writes as it goes: the agent a key may call, with the
connectors the key was given, and the audit row of each tool run. Synchronous (the API path calls these
through `orm()`); no secret leaves this module except inside the connector specs the tool runtime needs.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings
from django.db.models import Count
from django.utils import timezone

from agents.connectors import HttpConnectorSpec, McpServerSpec
from agents.exceptions import AgentNotFound, ConnectorNotAllowed
from agents.models import Agent, Connector, ConnectorGrant, ToolRun
from apikeys.auth import AuthenticatedKey
from apikeys.scopes import CONNECTORS
from platform_site.crypto import decrypt_secret
from platform_site.kernel.singleflight import SingleFlight

AGENT_PREFIX = "agent:"


@dataclass(frozen=True, slots=True)
class ConnectorRef:
    id: int
    public_id: str
    type: str
    name: str
    description: str
    parameters: dict[str, Any]
    spec: HttpConnectorSpec | McpServerSpec


@dataclass(frozen=True, slots=True)
class AgentSpec:
    id: int
    slug: str
    name: str
    project_id: int
    model: str
    instructions: str
    max_iterations: int
    connectors: tuple[ConnectorRef, ...]

    @property
    def public_model(self) -> str:
        return AGENT_PREFIX + self.slug


def _spec(connector: Connector) -> HttpConnectorSpec | McpServerSpec:
    secret = decrypt_secret(connector.secret_encrypted)
    if connector.type == Connector.Type.HTTP:
        return HttpConnectorSpec(
            public_id=connector.public_id, name=connector.name, url=connector.url, secret=secret,
            timeout_ms=connector.timeout_ms, max_response_bytes=connector.max_response_bytes,
        )
    return McpServerSpec(
        public_id=connector.public_id, name=connector.name, url=connector.url, authorization=secret,
        timeout_ms=connector.timeout_ms, max_response_bytes=connector.max_response_bytes,
    )


def connector_ref(connector: Connector) -> ConnectorRef:
    return ConnectorRef(
        id=connector.pk, public_id=connector.public_id, type=connector.type, name=connector.name,
        description=connector.description, parameters=orjson.loads(connector.parameters_json or "{}"),
        spec=_spec(connector),
    )


def agent_for_key(*, key: AuthenticatedKey, model: str) -> AgentSpec:
    """The agent `agent:<slug>` as this key may call it: of the key's own project, with every connector it
    uses granted to the key (and the key holding the `connectors` scope). Anything else is refused before a
    model is called: an agent of another project or tenant is as unknown as one that never existed."""
    slug = model.removeprefix(AGENT_PREFIX)
    agent = (
        Agent.objects.filter(organization_id=key.organization_id, slug=slug, project_id=key.project_id)
        .prefetch_related("connectors").first()
        if key.project_id is not None else None
    )
    if agent is None:
        raise AgentNotFound(f"The model `{model}` does not exist or you do not have access to it.", param="model")
    connectors = sorted(agent.connectors.all(), key=lambda connector: connector.name)
    if connectors:
        if CONNECTORS not in key.scopes:
            raise ConnectorNotAllowed(
                f"The agent `{model}` runs connectors, and this key does not hold the '{CONNECTORS}' scope.",
                param="model",
            )
        granted = set(
            ConnectorGrant.objects.filter(api_key_id=key.id, connector__in=connectors)
            .values_list("connector_id", flat=True)
        )
        missing = [connector.name for connector in connectors if connector.pk not in granted]
        if missing:
            raise ConnectorNotAllowed(
                f"The agent `{model}` uses the connector `{missing[0]}`, which this key was not given.",
                param="model",
            )
    return agent_spec(agent)


def _agent_load(wanted: tuple[AuthenticatedKey, str]) -> AgentSpec:
    return agent_for_key(key=wanted[0], model=wanted[1])


# Agents as each key calls them, kept for a second per process (as keys, prices and the catalog are): a turn
# finds its agent, connectors and grants without a query. A change reaches every worker within that second.
_agents: SingleFlight[tuple[AuthenticatedKey, str], AgentSpec] = SingleFlight(
    _agent_load, ttl=lambda: settings.KEYWAY_CATALOG_LOCAL_TTL, max_entries=10_000
)


async def agent_for(key: AuthenticatedKey, model: str) -> AgentSpec:
    """agent_for_key, from the per-process copy when it is fresh."""
    return await _agents.get((key, model))


def agent_spec(agent: Agent) -> AgentSpec:
    """An agent as a turn runs it, its connectors' secrets decrypted for the tool runtime."""
    connectors = sorted(agent.connectors.all(), key=lambda connector: connector.name)
    return AgentSpec(
        id=agent.pk, slug=agent.slug, name=agent.name, project_id=agent.project_id, model=agent.model,
        instructions=agent.instructions, max_iterations=agent.max_iterations,
        connectors=tuple(connector_ref(connector) for connector in connectors),
    )


def agent_models(*, key: AuthenticatedKey) -> list[tuple[str, dt.datetime]]:
    """The agents a key may name as a model (its project's), as (`agent:<slug>`, created_at)."""
    if key.project_id is None:
        return []
    rows = Agent.objects.filter(organization_id=key.organization_id, project_id=key.project_id).order_by("slug")
    return [(AGENT_PREFIX + slug, created) for slug, created in rows.values_list("slug", "created_at")]


@dataclass(frozen=True, slots=True)
class ToolRunRecord:
    organization_id: int
    project_id: int | None
    api_key_id: int
    agent_slug: str
    connector_id: int | None
    tool_name: str
    session_id: str
    request_id: str
    call_id: str
    iteration: int
    outcome: str
    error: str
    duration_ms: int
    started_at: dt.datetime


def tool_runs_record(records: list[ToolRunRecord]) -> None:
    """The audit of a step's tool runs, in one write."""
    ToolRun.objects.bulk_create([
        ToolRun(
            organization_id=record.organization_id, project_id=record.project_id, api_key_id=record.api_key_id,
            agent_slug=record.agent_slug, connector_id=record.connector_id, tool_name=record.tool_name[:128],
            session_id=record.session_id, request_id=record.request_id, call_id=record.call_id,
            iteration=record.iteration, outcome=record.outcome, error=record.error[:300],
            duration_ms=record.duration_ms, started_at=record.started_at,
        )
        for record in records
    ])


def recent_runs(*, within: dt.timedelta, organization_id: int | None = None) -> dict[str, int]:
    """Tool runs in the last `within`, by outcome."""
    query = ToolRun.objects.filter(started_at__gte=timezone.now() - within)
    if organization_id is not None:
        query = query.filter(organization_id=organization_id)
    return dict(query.values_list("outcome").annotate(runs=Count("id")).values_list("outcome", "runs"))
