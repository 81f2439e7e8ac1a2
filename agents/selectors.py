"""Reads of agents, connectors, hooks and their records for the dashboard and the management API. Every one
takes the organization and finds objects by public id within it (and within the project, where one is
given): an id of another tenant's object, or of another project's, is answered exactly like an unknown one.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db.models import QuerySet

from agents.models import Agent, Connector, ConnectorGrant, Hook, HookDelivery, ToolRun
from apikeys.models import ApiKey
from platform_site.exceptions import NotFound, TenancyError
from platform_site.models import Organization, Project


def connector_list(*, organization: Organization, project: Project) -> QuerySet[Connector]:
    return Connector.objects.filter(organization=organization, project=project).select_related("project")


def connector_get(*, organization: Organization, public_id: str, project: Project | None = None) -> Connector:
    connectors = Connector.objects.filter(organization=organization, public_id=public_id)
    if project is not None:
        connectors = connectors.filter(project=project)
    connector = connectors.select_related("project").first()
    if connector is None:
        raise NotFound(f"No connector '{public_id}' here.", param="connector_id")
    return connector


def connectors_named(*, organization: Organization, project: Project, public_ids: Iterable[str]) -> list[Connector]:
    """The project's connectors of these ids, for a body that lists them (an agent's, a key's). One that is
    not the project's is a bad value of `connectors` (400), not a missing page (404)."""
    wanted = list(dict.fromkeys(public_ids))
    found = {
        c.public_id: c for c in connector_list(organization=organization, project=project).filter(public_id__in=wanted)
    }
    missing = [public_id for public_id in wanted if public_id not in found]
    if missing:
        raise TenancyError(
            f"No connector '{missing[0]}' in this project.", param="connectors", code="connector_not_found"
        )
    return [found[public_id] for public_id in wanted]


def agent_list(*, organization: Organization, project: Project | None = None) -> QuerySet[Agent]:
    agents = Agent.objects.filter(organization=organization)
    if project is not None:
        agents = agents.filter(project=project)
    return agents.select_related("project").prefetch_related("connectors")


def agent_get(*, organization: Organization, public_id: str, project: Project | None = None) -> Agent:
    agent = agent_list(organization=organization, project=project).filter(public_id=public_id).first()
    if agent is None:
        raise NotFound(f"No agent '{public_id}' here.", param="agent_id")
    return agent


def agent_get_by_slug(
    *, organization: Organization, slug: str, project: Project | None = None, param: str = "agent"
) -> Agent:
    agent = agent_list(organization=organization, project=project).filter(slug=slug).first()
    if agent is None:
        raise NotFound(f"No agent '{slug}' here.", param=param)
    return agent


def hook_list(*, organization: Organization, project: Project) -> QuerySet[Hook]:
    return Hook.objects.filter(organization=organization, project=project).select_related("agent", "project")


def hook_get(*, organization: Organization, public_id: str, project: Project | None = None) -> Hook:
    hooks = Hook.objects.filter(organization=organization, public_id=public_id)
    if project is not None:
        hooks = hooks.filter(project=project)
    hook = hooks.select_related("agent", "project", "api_key").first()
    if hook is None:
        raise NotFound(f"No hook '{public_id}' here.", param="hook_id")
    return hook


def hook_delivery_list(*, organization: Organization, hook: Hook) -> QuerySet[HookDelivery]:
    return HookDelivery.objects.filter(organization=organization, hook=hook)


def hook_deliveries(*, organization: Organization, hook: Hook, limit: int = 50) -> list[HookDelivery]:
    """The hook's latest deliveries, newest first."""
    return list(hook_delivery_list(organization=organization, hook=hook).order_by("-created_at", "-id")[:limit])


def tool_runs(*, organization: Organization, project: Project | None = None, limit: int = 50) -> list[ToolRun]:
    """The latest tool runs, newest first, with their connector (none once it was deleted)."""
    runs = ToolRun.objects.filter(organization=organization)
    if project is not None:
        runs = runs.filter(project=project)
    return list(runs.select_related("connector").order_by("-started_at", "-id")[:limit])


def key_connectors(*, organization: Organization, key: ApiKey) -> list[Connector]:
    """The connectors given to a key, by name."""
    return list(Connector.objects.filter(organization=organization, grants__api_key=key).order_by("name"))


def key_connector_ids(*, organization: Organization, keys: Iterable[ApiKey]) -> dict[int, list[str]]:
    """The public ids of the connectors given to each of `keys` (by key pk, each list by name), in one query:
    for pages that list keys."""
    ids: dict[int, list[str]] = {key.pk: [] for key in keys}
    grants = ConnectorGrant.objects.filter(connector__organization=organization, api_key_id__in=list(ids))
    for key_pk, public_id in grants.order_by("connector__name").values_list("api_key_id", "connector__public_id"):
        ids[key_pk].append(public_id)
    return ids


def project_key_connector_ids(*, organization: Organization, project: Project) -> dict[int, list[str]]:
    """The public ids of the connectors given to each key of the project that has any (by key pk, each list
    by name), in one query: for pages that list the project's keys."""
    ids: dict[int, list[str]] = {}
    grants = ConnectorGrant.objects.filter(connector__organization=organization, connector__project=project)
    for key_pk, public_id in grants.order_by("connector__name").values_list("api_key_id", "connector__public_id"):
        ids.setdefault(key_pk, []).append(public_id)
    return ids
