"""Agents, connectors and hooks of one project, and what they did: tool runs and webhook deliveries.

The pages show one project at a time, named by `?project=<public id>` (the default project when absent), as
the API keys page filters by project. Every object is found by public id through the agents selectors, in the
signed-in member's organization, so another tenant's ids are a 404 like unknown ones. Everyone in the
organization sees the lists; the services let only owners and admins change anything. A connector's and a
hook's secret is shown once, on the page the creating POST answers with, and never again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlencode

from django import forms
from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse

from agents.hooks import SIGNATURE_TOLERANCE
from agents.models import Agent, Connector, Hook, HookDelivery, ToolRun
from agents.selectors import (
    agent_get,
    agent_list,
    connector_get,
    connector_list,
    hook_deliveries,
    hook_get,
    hook_list,
    tool_runs,
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
from completions.selectors import chat_model_id_default, model_ids_enabled
from dashboard.forms_agents import AgentForm, ConnectorForm, HookForm
from dashboard.views.common import add_service_error, flash_service_error, member_required, no_store
from platform_site.access import Actor
from platform_site.kernel.errors import ApiError
from platform_site.models import Project
from platform_site.selectors import default_project, project_get, project_list

T = TypeVar("T")

# How the pages colour an outcome or a delivery's status, with the badges the other pages use.
OUTCOME_TONE: dict[str, str] = {
    ToolRun.Outcome.OK: "active",
    ToolRun.Outcome.ERROR: "revoked",
    ToolRun.Outcome.TIMEOUT: "expired",
    ToolRun.Outcome.REFUSED: "revoked",
}
DELIVERY_TONE: dict[str, str] = {
    HookDelivery.Status.RUNNING: "grace",
    HookDelivery.Status.ANSWERED: "active",
    HookDelivery.Status.PENDING: "grace",
    HookDelivery.Status.DELIVERED: "active",
    HookDelivery.Status.FAILED: "revoked",
}
# How old a signed request to a hook may be, as the how-to on the pages says it.
SIGNATURE_TOLERANCE_MINUTES = SIGNATURE_TOLERANCE // 60


def _actor(request: HttpRequest) -> Actor:
    return request.actor  # type: ignore[attr-defined, no-any-return]


def _found(get: Callable[..., T], actor: Actor, public_id: str) -> T:
    """The organization's object of this id; an unknown id and another tenant's are the same 404."""
    try:
        return get(organization=actor.organization, public_id=public_id)
    except ApiError as error:
        if error.status == 404:
            raise Http404(error.message) from None
        raise


def _project(request: HttpRequest, actor: Actor) -> Project:
    wanted = request.GET.get("project", "")
    if not wanted:
        return default_project(organization=actor.organization)
    try:
        return project_get(organization=actor.organization, public_id=wanted)
    except ApiError as error:
        raise Http404(error.message) from None


def _in_project(view_name: str, project: Project) -> str:
    return f"{reverse(view_name)}?{urlencode({'project': project.public_id})}"


def _page(
    request: HttpRequest, template: str, actor: Actor, project: Project, status: int = 200, **context: Any
) -> HttpResponse:
    """Renders one of the agents pages with what they all show: the project picker and who may change things."""
    context.update(
        project=project,
        projects=project_list(organization=actor.organization),
        can_manage=actor.is_manager,
    )
    return render(request, template, context, status=status)


def _refused(request: HttpRequest, form: forms.Form, error: ApiError) -> int:
    """Shows a service's refusal and returns the page's status. A refusal of the role is a flash message (a
    reader sees no form to show it on) and a 403; any other is on the form, whose page is a 200."""
    if error.status == 403:
        flash_service_error(request, error)
        return 403
    add_service_error(form, error)
    return 200


def _hook_url(request: HttpRequest, hook: Hook) -> str:
    """Where senders POST, as an absolute URL of this site (the ingress is completions' `hook-ingress`)."""
    return request.build_absolute_uri(reverse("hook-ingress", args=[hook.name]))


@member_required
def agent_list_view(request: HttpRequest) -> HttpResponse:
    actor = _actor(request)
    project = _project(request, actor)
    connectors = list(connector_list(organization=actor.organization, project=project))
    form = AgentForm(request.POST or None, models=model_ids_enabled(), connectors=connectors,
                     initial={"model": chat_model_id_default()})
    status = 200
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            agent = agent_create(
                by=actor,
                project=project,
                slug=data["slug"],
                name=data["name"],
                model=data["model"],
                instructions=data["instructions"],
                connectors=form.chosen_connectors(),
                max_iterations=data["max_iterations"],
            )
        except ApiError as error:
            status = _refused(request, form, error)
        else:
            messages.success(request, f"Agent {agent} created. Call it with the model name agent:{agent.slug}.")
            return redirect(_in_project("dashboard:agent-list", project))
    runs = [(run, OUTCOME_TONE.get(run.outcome, "")) for run in tool_runs(organization=actor.organization,
                                                                          project=project, limit=50)]
    return _page(
        request,
        "dashboard/agents/agents.html",
        actor,
        project,
        status,
        form=form,
        agents=list(agent_list(organization=actor.organization, project=project)),
        has_models=bool(form.fields["model"].choices),  # type: ignore[attr-defined]
        runs=runs,
    )


@member_required
def agent_detail_view(request: HttpRequest, public_id: str) -> HttpResponse:
    actor = _actor(request)
    agent: Agent = _found(agent_get, actor, public_id)
    project = agent.project
    connectors = list(connector_list(organization=actor.organization, project=project))
    models = model_ids_enabled()
    form = AgentForm(request.POST or None, models=models, connectors=connectors, editing=agent)
    status = 200
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            agent_update(
                by=actor,
                agent=agent,
                name=data["name"],
                model=data["model"],
                instructions=data["instructions"],
                connectors=form.chosen_connectors(),
                max_iterations=data["max_iterations"],
            )
        except ApiError as error:
            status = _refused(request, form, error)
        else:
            messages.success(request, f"Agent {agent} saved.")
            return redirect(_in_project("dashboard:agent-list", project))
    return _page(request, "dashboard/agents/agent.html", actor, project, status, agent=agent, form=form,
                 model_missing=agent.model not in models)


@member_required
def agent_delete_view(request: HttpRequest, public_id: str) -> HttpResponse:
    actor = _actor(request)
    agent: Agent = _found(agent_get, actor, public_id)
    return _delete_page(
        request, what="agent", label=str(agent), back=_in_project("dashboard:agent-list", agent.project),
        delete=lambda: agent_delete(by=actor, agent=agent),
        done=f"Agent {agent} deleted, with its hooks. Calls to it now fail.",
        consequence="Calls to this model name will fail, and the hooks that run this agent are deleted too.",
    )


def _delete_page(request: HttpRequest, *, what: str, label: str, back: str, delete: Callable[[], None], done: str,
                 consequence: str) -> HttpResponse:
    """A delete's confirmation page (GET) and the delete itself (POST), which the service may refuse."""
    if request.method == "POST":
        try:
            delete()
        except ApiError as error:
            flash_service_error(request, error)
        else:
            messages.success(request, done)
        return redirect(back)
    return render(request, "dashboard/agents/delete.html",
                  {"what": what, "label": label, "back": back, "consequence": consequence})


@member_required
def connector_list_view(request: HttpRequest) -> HttpResponse:
    actor = _actor(request)
    project = _project(request, actor)
    form = ConnectorForm(request.POST or None)
    status = 200
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            connector, secret = connector_create(
                by=actor,
                project=project,
                type=data["type"],
                name=data["name"],
                url=data["url"],
                description=data["description"],
                parameters=data["parameters"],
                timeout_ms=data["timeout_ms"],
                max_response_bytes=data["max_response_bytes"],
                authorization=data["authorization"],
            )
        except ApiError as error:
            status = _refused(request, form, error)
        else:
            if not secret:
                messages.success(request, f"Connector {connector.name} created.")
                return redirect(_in_project("dashboard:connector-list", project))
            return _connector_secret_page(request, connector, secret)
    return _page(
        request,
        "dashboard/agents/connectors.html",
        actor,
        project,
        status,
        form=form,
        connectors=list(connector_list(organization=actor.organization, project=project)),
    )


def _connector_secret_page(request: HttpRequest, connector: Connector, secret: str) -> HttpResponse:
    """The one page that shows an HTTP connector's signing secret: rendered from the POST that made it, never
    stored in the clear, put in the session or a URL, and not cached."""
    context = {"connector": connector, "secret": secret, "project": connector.project,
               "tolerance_minutes": SIGNATURE_TOLERANCE_MINUTES}
    return no_store(render(request, "dashboard/agents/connector_secret.html", context))


@member_required
def connector_delete_view(request: HttpRequest, public_id: str) -> HttpResponse:
    actor = _actor(request)
    connector: Connector = _found(connector_get, actor, public_id)
    return _delete_page(
        request, what="connector", label=connector.name,
        back=_in_project("dashboard:connector-list", connector.project),
        delete=lambda: connector_delete(by=actor, connector=connector),
        done=f"Connector {connector.name} deleted. No agent calls it any more.",
        consequence="Agents that use it lose this tool, and keys lose their grant to it.",
    )


@member_required
def hook_list_view(request: HttpRequest) -> HttpResponse:
    actor = _actor(request)
    project = _project(request, actor)
    agents = list(agent_list(organization=actor.organization, project=project))
    form = HookForm(request.POST or None, agents=agents)
    status = 200
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            hook, secret = hook_create(
                by=actor,
                project=project,
                name=data["name"],
                agent=form.chosen_agent(),
                mode=data["mode"],
                callback_url=data["callback_url"],
            )
        except ApiError as error:
            status = _refused(request, form, error)
        else:
            return _hook_secret_page(request, hook, secret)
    hooks = [(hook, _hook_url(request, hook)) for hook in hook_list(organization=actor.organization, project=project)]
    return _page(request, "dashboard/agents/hooks.html", actor, project, status, form=form, hooks=hooks, agents=agents)


def _hook_secret_page(request: HttpRequest, hook: Hook, secret: str) -> HttpResponse:
    """The one page that shows a hook's secret, exactly once, like a new API key's."""
    context = {"hook": hook, "secret": secret, "hook_url": _hook_url(request, hook), "project": hook.project,
               "tolerance_minutes": SIGNATURE_TOLERANCE_MINUTES}
    return no_store(render(request, "dashboard/agents/hook_secret.html", context))


@member_required
def hook_detail_view(request: HttpRequest, public_id: str) -> HttpResponse:
    actor = _actor(request)
    hook: Hook = _found(hook_get, actor, public_id)
    deliveries = [(delivery, DELIVERY_TONE.get(delivery.status, ""))
                  for delivery in hook_deliveries(organization=actor.organization, hook=hook, limit=100)]
    return _page(
        request,
        "dashboard/agents/hook.html",
        actor,
        hook.project,
        hook=hook,
        hook_url=_hook_url(request, hook),
        deliveries=deliveries,
        tolerance_minutes=SIGNATURE_TOLERANCE_MINUTES,
    )


@member_required
def hook_delete_view(request: HttpRequest, public_id: str) -> HttpResponse:
    actor = _actor(request)
    hook: Hook = _found(hook_get, actor, public_id)
    return _delete_page(
        request, what="hook", label=hook.name, back=_in_project("dashboard:hook-list", hook.project),
        delete=lambda: hook_delete(by=actor, hook=hook),
        done=f"Hook {hook.name} deleted. Requests to its URL are refused.",
        consequence="Requests to its URL will be refused, and its delivery records are deleted.",
    )
