"""The management API of agents and what they stand on, under /v1/organization/projects/{project_id}/:
connectors, agents, hooks and a hook's deliveries (Keyway's own; OpenAI has none of these). Views parse,
call agents.services or agents.selectors, and render; every read is scoped to the caller's organization and
the project in the path, so another tenant's ids are answered like made-up ones."""

from __future__ import annotations

from typing import Any

from django.db.models import Q
from rest_framework.request import Request
from rest_framework.response import Response

from agents.models import Connector
from agents.selectors import (
    agent_get,
    agent_get_by_slug,
    agent_list,
    connector_get,
    connector_list,
    connectors_named,
    hook_delivery_list,
    hook_get,
    hook_list,
)
from agents.services import (
    agent_create,
    agent_delete,
    agent_update,
    connector_create,
    connector_delete,
    hook_create,
    hook_delete,
)
from completions.selectors import model_ids_enabled
from dashboard.admin_api import objects
from dashboard.admin_api import schema as doc
from dashboard.admin_api.base import ManagementApi, field, page
from platform_site.exceptions import NotFound, TenancyError
from platform_site.models import Organization, Project
from platform_site.selectors import project_get


def _by_public_id(value: str) -> Q:
    return Q(public_id=value)


def strings(body: Any, name: str) -> list[str] | None:
    """A list-of-strings field of the body, or None when absent."""
    values = field(body, name, list)
    if values is not None and not all(isinstance(value, str) for value in values):
        raise TenancyError(f"'{name}' must be a list of strings.", param=name, code="invalid_type")
    return values


def connectors_of(body: Any, *, organization: Organization, project: Project) -> list[Connector] | None:
    """The `connectors` of a body (ids of the project's connectors), or None when absent."""
    ids = strings(body, "connectors")
    if ids is None:
        return None
    return connectors_named(organization=organization, project=project, public_ids=ids)


class _ProjectScoped(ManagementApi):
    def project(self, project_id: str) -> Project:
        return project_get(organization=self.actor.organization, public_id=project_id)


class ConnectorListApi(_ProjectScoped):
    @doc.operation(
        doc.listing(doc.CONNECTOR),
        listed=True,
        operation_id="project_connector_list",
        summary="List a project's connectors (Keyway)",
    )
    def get(self, request: Request, project_id: str) -> Response:
        project = self.project(project_id)
        connectors = connector_list(organization=self.actor.organization, project=project)
        return Response(page(request, connectors, public_id=_by_public_id, render=objects.connector))

    @doc.operation(
        doc.with_secret(doc.CONNECTOR, always=False),
        request=doc.body(
            {
                "type": {"type": "string", "enum": ["http", "mcp"]},
                "name": doc.STR,
                "description": doc.STR,
                "url": doc.STR,
                "parameters": {"type": "object"},
                "timeout_ms": doc.INT,
                "max_response_bytes": doc.INT,
                "authorization": doc.STR,
            },
            ["type", "name", "url"],
        ),
        operation_id="project_connector_create",
        summary="Create a connector (Keyway; an HTTP connector's signing secret in `secret`, once)",
    )
    def post(self, request: Request, project_id: str) -> Response:
        project = self.project(project_id)
        body = request.data
        connector, secret = connector_create(
            by=self.actor,
            project=project,
            type=field(body, "type", str, required=True),
            name=field(body, "name", str, required=True),
            url=field(body, "url", str, required=True),
            description=field(body, "description", str, default=""),
            parameters=field(body, "parameters", dict),
            timeout_ms=field(body, "timeout_ms", int),
            max_response_bytes=field(body, "max_response_bytes", int),
            authorization=field(body, "authorization", str, default=""),
        )
        rendered = objects.connector(connector)
        # The signing secret is in this response only: it is stored encrypted, and no read shows it.
        return Response({**rendered, "secret": secret} if secret else rendered)


class ConnectorApi(_ProjectScoped):
    def connector(self, project_id: str, connector_id: str) -> Connector:
        project = self.project(project_id)
        return connector_get(organization=self.actor.organization, public_id=connector_id, project=project)

    @doc.operation(doc.CONNECTOR, operation_id="project_connector_get")
    def get(self, request: Request, project_id: str, connector_id: str) -> Response:
        return Response(objects.connector(self.connector(project_id, connector_id)))

    @doc.operation(doc.deleted("organization.project.connector.deleted"), operation_id="project_connector_delete")
    def delete(self, request: Request, project_id: str, connector_id: str) -> Response:
        connector = self.connector(project_id, connector_id)
        connector_delete(by=self.actor, connector=connector)
        return Response({"object": "organization.project.connector.deleted", "id": connector_id, "deleted": True})


_AGENT_BODY = {
    "slug": doc.STR,
    "name": doc.STR,
    "model": doc.STR,
    "instructions": doc.STR,
    "connectors": doc.STRS,
    "max_iterations": doc.INT,
}


def _require_model(model: str | None) -> None:
    """An agent's model must be an enabled model of the catalog; another agent is not one (no agent calls an
    agent)."""
    if model is not None and model not in model_ids_enabled():
        raise TenancyError(f"The model '{model}' does not exist.", param="model", code="model_not_found")


class AgentListApi(_ProjectScoped):
    @doc.operation(
        doc.listing(doc.AGENT),
        listed=True,
        operation_id="project_agent_list",
        summary="List a project's agents (Keyway)",
    )
    def get(self, request: Request, project_id: str) -> Response:
        project = self.project(project_id)
        agents = agent_list(organization=self.actor.organization, project=project)
        return Response(page(request, agents, public_id=_by_public_id, render=objects.agent))

    @doc.operation(
        doc.AGENT,
        request=doc.body(_AGENT_BODY, ["slug", "name", "model"]),
        operation_id="project_agent_create",
        summary="Create an agent, called as the model `agent:<slug>` (Keyway)",
    )
    def post(self, request: Request, project_id: str) -> Response:
        project = self.project(project_id)
        body = request.data
        slug = field(body, "slug", str, required=True)
        name = field(body, "name", str, required=True)
        model = field(body, "model", str, required=True)
        _require_model(model)
        agent = agent_create(
            by=self.actor,
            project=project,
            slug=slug,
            name=name,
            model=model,
            instructions=field(body, "instructions", str, default=""),
            connectors=connectors_of(body, organization=self.actor.organization, project=project),
            max_iterations=field(body, "max_iterations", int, default=25),
        )
        return Response(objects.agent(agent_get(organization=self.actor.organization, public_id=agent.public_id)))


class AgentApi(_ProjectScoped):
    @doc.operation(doc.AGENT, operation_id="project_agent_get")
    def get(self, request: Request, project_id: str, agent_id: str) -> Response:
        project = self.project(project_id)
        return Response(
            objects.agent(agent_get(organization=self.actor.organization, public_id=agent_id, project=project))
        )

    @doc.operation(
        doc.AGENT,
        request=doc.body({name: schema for name, schema in _AGENT_BODY.items() if name != "slug"}),
        operation_id="project_agent_update",
        summary="Change an agent: the fields given (`connectors` replaces the list) (Keyway)",
    )
    def post(self, request: Request, project_id: str, agent_id: str) -> Response:
        project = self.project(project_id)
        agent = agent_get(organization=self.actor.organization, public_id=agent_id, project=project)
        body = request.data
        if isinstance(body, dict) and "slug" in body and body["slug"] != agent.slug:
            raise TenancyError(
                "An agent's slug cannot be changed: it is the model name callers use.",
                param="slug",
                code="invalid_value",
            )
        model = field(body, "model", str)
        _require_model(model)
        agent_update(
            by=self.actor,
            agent=agent,
            name=field(body, "name", str),
            model=model,
            instructions=field(body, "instructions", str),
            connectors=connectors_of(body, organization=self.actor.organization, project=project),
            max_iterations=field(body, "max_iterations", int),
        )
        return Response(objects.agent(agent_get(organization=self.actor.organization, public_id=agent_id)))

    @doc.operation(
        doc.deleted("organization.project.agent.deleted"),
        operation_id="project_agent_delete",
        summary="Delete an agent, and the hooks that call it (Keyway)",
    )
    def delete(self, request: Request, project_id: str, agent_id: str) -> Response:
        project = self.project(project_id)
        agent_delete(
            by=self.actor, agent=agent_get(organization=self.actor.organization, public_id=agent_id, project=project)
        )
        return Response({"object": "organization.project.agent.deleted", "id": agent_id, "deleted": True})


class HookListApi(_ProjectScoped):
    @doc.operation(
        doc.listing(doc.HOOK), listed=True, operation_id="project_hook_list", summary="List a project's hooks (Keyway)"
    )
    def get(self, request: Request, project_id: str) -> Response:
        project = self.project(project_id)
        hooks = hook_list(organization=self.actor.organization, project=project)
        return Response(page(request, hooks, public_id=_by_public_id, render=objects.hook))

    @doc.operation(
        doc.with_secret(doc.HOOK),
        request=doc.body(
            {
                "name": doc.STR,
                "agent": doc.STR,
                "mode": {"type": "string", "enum": ["sync", "callback"]},
                "callback_url": doc.STR,
            },
            ["name", "agent", "mode"],
        ),
        operation_id="project_hook_create",
        summary="Create a hook, POST /hooks/<name> (Keyway; its signing secret in `secret`, once)",
    )
    def post(self, request: Request, project_id: str) -> Response:
        project = self.project(project_id)
        body = request.data
        name = field(body, "name", str, required=True)
        slug = field(body, "agent", str, required=True)
        mode = field(body, "mode", str, required=True)
        callback_url = field(body, "callback_url", str, default="")
        try:
            agent = agent_get_by_slug(organization=self.actor.organization, slug=slug, project=project)
        except NotFound:
            # A body naming nothing is a bad value (400), as with `connectors`, not a missing page.
            raise TenancyError(f"No agent '{slug}' in this project.", param="agent", code="agent_not_found") from None
        hook, secret = hook_create(
            by=self.actor, project=project, name=name, agent=agent, mode=mode, callback_url=callback_url
        )
        # The signing secret is in this response only: it is stored encrypted, and no read shows it.
        return Response({**objects.hook(hook), "secret": secret})


class HookApi(_ProjectScoped):
    @doc.operation(doc.HOOK, operation_id="project_hook_get")
    def get(self, request: Request, project_id: str, hook_id: str) -> Response:
        project = self.project(project_id)
        return Response(
            objects.hook(hook_get(organization=self.actor.organization, public_id=hook_id, project=project))
        )

    @doc.operation(
        doc.deleted("organization.project.hook.deleted"),
        operation_id="project_hook_delete",
        summary="Delete a hook (its key is revoked) (Keyway)",
    )
    def delete(self, request: Request, project_id: str, hook_id: str) -> Response:
        project = self.project(project_id)
        hook_delete(
            by=self.actor, hook=hook_get(organization=self.actor.organization, public_id=hook_id, project=project)
        )
        return Response({"object": "organization.project.hook.deleted", "id": hook_id, "deleted": True})


class HookDeliveryListApi(_ProjectScoped):
    @doc.operation(
        doc.listing(doc.HOOK_DELIVERY),
        listed=True,
        operation_id="project_hook_delivery_list",
        summary="A hook's deliveries, newest first (Keyway)",
    )
    def get(self, request: Request, project_id: str, hook_id: str) -> Response:
        project = self.project(project_id)
        hook = hook_get(organization=self.actor.organization, public_id=hook_id, project=project)
        deliveries = hook_delivery_list(organization=self.actor.organization, hook=hook)
        return Response(
            page(request, deliveries, public_id=_by_public_id, render=objects.hook_delivery, default_order="desc")
        )
