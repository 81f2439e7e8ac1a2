"""Settings → API Keys: list, search and filter the organization's project keys; create one (its secret shown
once, on the page the form posts to); rotate with a grace period; revoke after confirming. Admin keys have
their own page (admin_keys)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.contrib import messages
from django.db import transaction
from django.db.models import Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone

from agents.selectors import connector_list, connectors_named
from agents.services import connector_grants_set
from apikeys.models import ApiKey
from apikeys.scopes import permissions_label
from apikeys.selectors import apikey_get, apikey_list
from apikeys.services import apikey_create, apikey_revoke, apikey_rotate
from billing.money import micros_to_usd
from completions.selectors import chat_model_id_default, model_ids_enabled
from dashboard.forms import ApiKeyCreateForm, ApiKeyFilterForm, RotateForm
from dashboard.snippets import first_call
from dashboard.views.common import add_service_error, api_base_url, flash_service_error, member_required, no_store
from platform_site.access import Actor
from platform_site.kernel.errors import ApiError
from platform_site.selectors import project_get, project_list

PAGE_SIZE = 100


@dataclass(frozen=True)
class KeyRow:
    key: ApiKey
    status: str
    permissions: str
    in_grace: bool
    may_manage: bool
    budget_usd: str | None


def _row(key: ApiKey, actor: Actor, now: datetime) -> KeyRow:
    return KeyRow(
        key=key,
        status=key.status_at(now),
        permissions=permissions_label(key.scopes),
        # A revoked key's old secret is as dead as its new one: no grace to show.
        in_grace=key.revoked_at is None
        and key.previous_secret_expires_at is not None
        and key.previous_secret_expires_at > now,
        may_manage=actor.may_manage_key_of(key.created_by_id) and key.revoked_at is None,
        budget_usd=None if key.monthly_budget_micros is None else micros_to_usd(key.monthly_budget_micros),
    )


def _project_choices(actor: Actor) -> list[tuple[str, str]]:
    return [(p.public_id, p.name) for p in project_list(organization=actor.organization)]


def _connector_choices(actor: Actor) -> list[tuple[str, list[tuple[str, str]]]]:
    """The connectors a new key may be given, grouped by project: only owners and admins give them."""
    if not actor.is_manager:
        return []
    groups = []
    for project in project_list(organization=actor.organization):
        connectors = connector_list(organization=actor.organization, project=project)
        choices = [(c.public_id, f"{c.name} ({c.type.upper()})") for c in connectors]
        if choices:
            groups.append((project.name, choices))
    return groups


@member_required
def apikey_list_view(request: HttpRequest) -> HttpResponse:
    actor: Actor = request.actor  # type: ignore[attr-defined]
    now = timezone.now()
    filters = ApiKeyFilterForm(request.GET or None, projects=_project_choices(actor))
    keys = (
        apikey_list(organization=actor.organization)
        .filter(project__isnull=False)
        .select_related("project", "created_by")
    )
    if filters.is_valid():
        query = filters.cleaned_data["q"].strip()
        if query:
            keys = keys.filter(Q(name__icontains=query) | Q(public_id__icontains=query.removeprefix("sk-kw-")))
        if filters.cleaned_data["project"]:
            keys = keys.filter(project__public_id=filters.cleaned_data["project"])
        status = filters.cleaned_data["status"]
        if status == "revoked":
            keys = keys.filter(revoked_at__isnull=False)
        elif status == "expired":
            keys = keys.filter(revoked_at__isnull=True, expires_at__lte=now)
        elif status == "active":
            keys = keys.filter(revoked_at__isnull=True).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
    rows = [_row(key, actor, now) for key in keys[: PAGE_SIZE * 5]]
    wanted_permissions = filters.cleaned_data.get("permissions") if filters.is_valid() else ""
    if wanted_permissions:
        rows = [row for row in rows if row.permissions == wanted_permissions]
    context = {
        "filters": filters,
        "rows": rows[:PAGE_SIZE],
        "truncated": len(rows) > PAGE_SIZE,
        "can_create": actor.role != "reader",
    }
    return render(request, "dashboard/apikeys/list.html", context)


@member_required
def apikey_create_view(request: HttpRequest) -> HttpResponse:
    actor: Actor = request.actor  # type: ignore[attr-defined]
    models = model_ids_enabled()
    initial_project = request.GET.get("project", "")
    form = ApiKeyCreateForm(
        request.POST or None,
        projects=_project_choices(actor),
        models=models,
        connectors=_connector_choices(actor),
        initial={"project": initial_project},
    )
    if request.method == "POST" and form.is_valid():
        try:
            project = project_get(organization=actor.organization, public_id=form.cleaned_data["project"])
            granted = connectors_named(
                organization=actor.organization, project=project, public_ids=form.cleaned_data["connectors"]
            )
            # One transaction: a key whose connectors could not be given is not made, so no secret is shown
            # for a key that is not what was asked for.
            with transaction.atomic():
                key, raw_key = apikey_create(
                    organization=actor.organization,
                    project=project,
                    name=form.cleaned_data["name"],
                    scopes=form.chosen_scopes(),
                    allowed_models=form.cleaned_data["models"],
                    rpm_limit=form.cleaned_data["rpm"],
                    tpm_limit=form.cleaned_data["tpm"],
                    monthly_budget_micros=form.budget_micros(),
                    expires_at=form.cleaned_data["expires_on"],
                    by=actor,
                )
                if granted:
                    connector_grants_set(by=actor, key=key, connectors=granted)
        except ApiError as error:
            add_service_error(form, error)
        else:
            return secret_page(request, key, raw_key, created=True)
    return render(request, "dashboard/apikeys/create.html", {"form": form, "has_models": bool(models)})


def secret_page(request: HttpRequest, key: ApiKey, raw_key: str, *, created: bool) -> HttpResponse:
    """The one page that shows a secret: rendered straight from the POST that made it, never stored, never
    put in the session or a URL, and marked not to be cached."""
    model = sorted(key.allowed_models)[0] if key.allowed_models else chat_model_id_default()
    context = {
        "key": key,
        "raw_key": raw_key,
        "created": created,
        "snippets": first_call(base_url=api_base_url(request), key=raw_key, model=model),
    }
    return no_store(render(request, "dashboard/apikeys/secret.html", context))


def _key_of_organization(request: HttpRequest, public_id: str) -> ApiKey:
    """A key of another organization and an unknown key look the same: a 404."""
    actor: Actor = request.actor  # type: ignore[attr-defined]
    try:
        return apikey_get(organization=actor.organization, public_id=public_id)
    except ApiKey.DoesNotExist:
        raise Http404("No such API key in this organization.") from None


@member_required
def apikey_rotate_view(request: HttpRequest, public_id: str) -> HttpResponse:
    actor: Actor = request.actor  # type: ignore[attr-defined]
    key = _key_of_organization(request, public_id)
    form = RotateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            key, raw_key = apikey_rotate(key=key, grace=form.grace_period(), by=actor)
        except ApiError as error:
            add_service_error(form, error)
        else:
            return secret_page(request, key, raw_key, created=False)
    return render(request, "dashboard/apikeys/rotate.html", {"key": key, "form": form})


@member_required
def apikey_revoke_view(request: HttpRequest, public_id: str) -> HttpResponse:
    actor: Actor = request.actor  # type: ignore[attr-defined]
    key = _key_of_organization(request, public_id)
    if request.method == "POST":
        try:
            apikey_revoke(key=key, by=actor)
        except ApiError as error:
            flash_service_error(request, error)
        else:
            messages.success(request, f"Key {key.name} ({key.masked}) is revoked. Calls with it are refused.")
        return redirect("dashboard:admin-key-list" if key.is_admin else "dashboard:apikey-list")
    return render(request, "dashboard/apikeys/revoke.html", {"key": key})

