"""Organization settings: the organization itself (rename, leave), its projects, members and invitations,
admin keys, and the audit log."""

from __future__ import annotations

import json
from datetime import UTC, datetime, time, timedelta

from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Count, Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from apikeys.selectors import apikey_list
from apikeys.services import apikey_create, project_archive
from billing.money import usd_display
from billing.selectors import project_month_spend, project_rate_limit_list
from billing.services import project_budget_set, project_rate_limit_set
from completions.selectors import model_ids_enabled
from dashboard.context import SESSION_KEY
from dashboard.forms import (
    AdminKeyCreateForm,
    AuditFilterForm,
    InviteForm,
    OrganizationForm,
    ProjectBudgetForm,
    ProjectForm,
    RateLimitsForm,
    RoleForm,
)
from dashboard.views.common import add_service_error, flash_service_error, member_required
from dashboard.views.keys import secret_page
from platform_site.access import Actor
from platform_site.kernel.errors import ApiError
from platform_site.models import AuditLog
from platform_site.selectors import (
    audit_log_list,
    invitation_get,
    invitation_list,
    member_get,
    member_list,
    project_get,
    project_list,
)
from platform_site.services import (
    invitation_create,
    invitation_delete,
    member_remove,
    member_role_set,
    organization_rename,
    project_create,
    project_rename,
)

AUDIT_PAGE = 50


def _actor(request: HttpRequest) -> Actor:
    return request.actor  # type: ignore[attr-defined, no-any-return]


@member_required
def organization_settings(request: HttpRequest) -> HttpResponse:
    actor = _actor(request)
    form = OrganizationForm(request.POST or None, initial={"name": actor.organization.name})
    if request.method == "POST" and form.is_valid():
        try:
            organization_rename(by=actor, name=form.cleaned_data["name"])
        except ApiError as error:
            add_service_error(form, error)
        else:
            messages.success(request, "Organization renamed.")
            return redirect("dashboard:organization-settings")
    return render(request, "dashboard/settings/organization.html", {"form": form})


@require_POST
@member_required
def organization_leave(request: HttpRequest) -> HttpResponse:
    actor = _actor(request)
    try:
        member_remove(by=actor, membership=request.membership)  # type: ignore[attr-defined]
    except ApiError as error:
        flash_service_error(request, error)
        return redirect("dashboard:organization-settings")
    request.session.pop(SESSION_KEY, None)
    messages.success(request, f"You left {actor.organization.name}.")
    return redirect("dashboard:home")


@member_required
def project_list_view(request: HttpRequest) -> HttpResponse:
    actor = _actor(request)
    form = ProjectForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            project = project_create(by=actor, name=form.cleaned_data["name"])
        except ApiError as error:
            add_service_error(form, error)
        else:
            messages.success(request, f"Project {project.name} created.")
            return redirect("dashboard:project-list")
    projects = project_list(organization=actor.organization, include_archived=True)
    counts = {
        row["project_id"]: row["n"]
        for row in apikey_list(organization=actor.organization)
        .filter(revoked_at__isnull=True, project__isnull=False)
        .values("project_id")
        .annotate(n=Count("id"))
    }
    rows = [(project, counts.get(project.id, 0)) for project in projects]
    return render(request, "dashboard/settings/projects.html", {"form": form, "rows": rows})


@member_required
def project_detail(request: HttpRequest, public_id: str) -> HttpResponse:
    """One project: its name, monthly budget and per-model rate limits, and archiving it. Every change is a
    POST naming its `action`; members and readers see the page, owners and admins change it."""
    actor = _actor(request)
    try:
        project = project_get(organization=actor.organization, public_id=public_id)
    except ApiError as error:
        raise Http404(error.message) from None
    limits = project_rate_limit_list(organization=actor.organization, project=project, models=model_ids_enabled())
    budget_form = ProjectBudgetForm(initial={"monthly_budget": project.monthly_budget_usd})
    limits_form = RateLimitsForm(limits=limits)
    here = reverse("dashboard:project-detail", args=[project.public_id])
    if request.method == "POST":
        action = request.POST.get("action", "")
        try:
            if action == "archive":
                project_archive(by=actor, project=project)
                messages.success(request, f"Project {project.name} archived; its keys no longer work.")
                return redirect("dashboard:project-list")
            if action == "rename":
                form = ProjectForm(request.POST)
                if not form.is_valid():
                    messages.error(request, "A project needs a name of 1 to 100 characters.")
                else:
                    project_rename(by=actor, project=project, name=form.cleaned_data["name"])
                    messages.success(request, "Project renamed.")
                return redirect(here)
            if action == "budget-remove":
                project_budget_set(by=actor, project=project, monthly_budget_micros=None)
                messages.success(request, "Budget removed: the project has no monthly cap of its own.")
                return redirect(here)
            if action == "budget":
                budget_form = ProjectBudgetForm(request.POST)
                if budget_form.is_valid():
                    project_budget_set(by=actor, project=project, monthly_budget_micros=budget_form.budget_micros())
                    messages.success(request, "Monthly budget saved.")
                    return redirect(here)
            elif action == "limits":
                limits_form = RateLimitsForm(request.POST, limits=limits)
                if limits_form.is_valid():
                    changes = limits_form.changes()
                    for model, changed in changes.items():
                        project_rate_limit_set(by=actor, project=project, model=model, changes=changed)
                    messages.success(
                        request,
                        f"Rate limits saved for {', '.join(changes)}." if changes else "Nothing changed.",
                    )
                    return redirect(here)
            else:
                messages.error(request, "Unknown action.")
                return redirect(here)
        except ApiError as error:
            flash_service_error(request, error)
            return redirect(here)
    spent = project_month_spend(organization=actor.organization, project=project)
    budget = project.monthly_budget_micros
    return render(
        request,
        "dashboard/settings/project.html",
        {
            "project": project,
            "can_manage": actor.is_manager and project.archived_at is None,
            "rename_form": ProjectForm(initial={"name": project.name}),
            "budget_form": budget_form,
            "limits_form": limits_form,
            "spent_usd": usd_display(spent),
            "budget_usd": None if budget is None else usd_display(budget),
            "budget_percent": None if not budget else min(100, spent * 100 // budget),
            "key_count": apikey_list(organization=actor.organization)
            .filter(project=project, revoked_at__isnull=True)
            .count(),
        },
    )


@member_required
def member_list_view(request: HttpRequest) -> HttpResponse:
    actor = _actor(request)
    form = InviteForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        accept_url = request.build_absolute_uri(reverse("dashboard:invite-accept", args=["TOKEN"])).replace(
            "TOKEN", "{token}"
        )
        try:
            invitation_create(
                by=actor, email=form.cleaned_data["email"], role=form.cleaned_data["role"], accept_url=accept_url
            )
        except ApiError as error:
            add_service_error(form, error)
        else:
            messages.success(request, f"Invitation sent to {form.cleaned_data['email']}.")
            return redirect("dashboard:member-list")
    now = timezone.now()
    invitations = [(inv, inv.status_at(now)) for inv in invitation_list(organization=actor.organization)[:100]]
    context = {
        "form": form,
        "members": member_list(organization=actor.organization),
        "invitations": invitations,
        "role_form": RoleForm(),
    }
    return render(request, "dashboard/settings/members.html", context)


@require_POST
@member_required
def member_update(request: HttpRequest, user_public_id: str) -> HttpResponse:
    actor = _actor(request)
    try:
        membership = member_get(organization=actor.organization, user_public_id=user_public_id)
        if request.POST.get("remove"):
            member_remove(by=actor, membership=membership)
            if actor.user is not None and membership.user_id == actor.user.pk:
                request.session.pop(SESSION_KEY, None)
                return redirect("dashboard:home")
            messages.success(request, f"{membership.user.email} was removed from the organization.")
        else:
            form = RoleForm(request.POST)
            if form.is_valid():
                member_role_set(by=actor, membership=membership, role=form.cleaned_data["role"])
                messages.success(request, f"{membership.user.email} is now {form.cleaned_data['role']}.")
    except ApiError as error:
        if error.status == 404:
            raise Http404(error.message) from None
        flash_service_error(request, error)
    return redirect("dashboard:member-list")


@require_POST
@member_required
def invitation_delete_view(request: HttpRequest, public_id: str) -> HttpResponse:
    actor = _actor(request)
    try:
        invitation_delete(by=actor, invitation=invitation_get(organization=actor.organization, public_id=public_id))
    except ApiError as error:
        if error.status == 404:
            raise Http404(error.message) from None
        flash_service_error(request, error)
    else:
        messages.success(request, "Invitation withdrawn; its link no longer works.")
    return redirect("dashboard:member-list")


@member_required
def admin_key_list(request: HttpRequest) -> HttpResponse:
    actor = _actor(request)
    form = AdminKeyCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            key, raw_key = apikey_create(
                organization=actor.organization,
                name=form.cleaned_data["name"],
                scopes=["admin"],
                expires_at=form.expires_at(),
                by=actor,
            )
        except ApiError as error:
            add_service_error(form, error)
        else:
            return secret_page(request, key, raw_key, created=True)
    now = timezone.now()
    keys = apikey_list(organization=actor.organization).filter(project__isnull=True).select_related("created_by")
    rows = [(key, key.status_at(now)) for key in keys[:200]]
    return render(
        request, "dashboard/settings/admin_keys.html", {"form": form, "rows": rows, "can_manage": actor.is_manager}
    )


@member_required
def audit_log_view(request: HttpRequest) -> HttpResponse:
    actor = _actor(request)
    events = audit_log_list(organization=actor.organization)
    actions = sorted(set(AuditLog.objects.filter(organization=actor.organization).values_list("action", flat=True)))
    projects = [(p.public_id, p.name) for p in project_list(organization=actor.organization, include_archived=True)]
    filters = AuditFilterForm(request.GET or None, actions=actions, projects=projects)
    if filters.is_valid():
        data = filters.cleaned_data
        if data["action"]:
            events = events.filter(action=data["action"])
        if data["actor"]:
            events = events.filter(Q(actor_label__icontains=data["actor"]) | Q(actor__email__icontains=data["actor"]))
        if data["project"]:
            events = events.filter(project__public_id=data["project"])
        if data["since"]:
            events = events.filter(created_at__gte=datetime.combine(data["since"], time.min, tzinfo=UTC))
        if data["until"]:
            events = events.filter(created_at__lt=datetime.combine(data["until"], time.min, tzinfo=UTC) + timedelta(1))
    page = Paginator(events, AUDIT_PAGE).get_page(request.GET.get("page"))
    # Details as compact JSON, the way an engineer reads them (and the API returns them).
    rows = [(event, json.dumps(event.details, sort_keys=True, ensure_ascii=False) if event.details else "")
            for event in page]
    query = request.GET.copy()
    query.pop("page", None)
    context = {"filters": filters, "page": page, "rows": rows, "query": query.urlencode()}
    return render(request, "dashboard/settings/audit_log.html", context)
