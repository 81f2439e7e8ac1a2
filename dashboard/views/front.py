"""The front door and the organization overview; creating and switching organizations; joining by invitation."""

from __future__ import annotations

from datetime import date

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from apikeys.selectors import apikey_list
from billing.money import usd_summary
from billing.selectors import usage_report
from completions.selectors import chat_model_id_default
from dashboard.context import SESSION_KEY, current_membership
from dashboard.forms import OrganizationForm
from dashboard.snippets import model_examples
from dashboard.views.common import api_base_url, member_required
from platform_site.exceptions import NotFound
from platform_site.kernel.errors import ApiError
from platform_site.selectors import memberships_of_user, project_list
from platform_site.services import invitation_accept, invitation_for_token, organization_create


def home(request: HttpRequest) -> HttpResponse:
    """Signed out: what Keyway is. Signed in: the current organization's overview."""
    if not request.user.is_authenticated:
        return render(request, "dashboard/landing.html")
    if current_membership(request) is None:
        return redirect("dashboard:organization-new")
    return overview(request)


@member_required
def overview(request: HttpRequest) -> HttpResponse:
    organization = request.membership.organization  # type: ignore[attr-defined]
    today = timezone.now().date()
    first = date(today.year, today.month, 1)
    month = usage_report(organization=organization, start=first, end=today, group_by="model")
    by_key = usage_report(organization=organization, start=first, end=today, group_by="key")
    keys = apikey_list(organization=organization).filter(
        Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()), revoked_at__isnull=True, project__isnull=False
    )
    context = {
        "projects": project_list(organization=organization)[:10],
        "project_count": project_list(organization=organization).count(),
        "active_keys": keys.count(),
        "recent_keys": keys.select_related("project")[:5],
        "month": month,
        "month_spend_usd": usd_summary(month.totals.cost_micros),
        "month_by_model": [(b.fields["model"], b.totals, usd_summary(b.totals.cost_micros)) for b in month.buckets[:8]],
        "month_by_key": [
            (b.fields["api_key_name"] or ("Deleted key" if b.fields["api_key"] is None else b.fields["api_key"]),
             b.totals, usd_summary(b.totals.cost_micros))
            for b in by_key.buckets[:8]
        ],
        # The key is read from the environment: an example that names it in a Python or JavaScript string
        # would send the text "$KEYWAY_API_KEY".
        "snippets": model_examples(
            base_url=api_base_url(request), model=chat_model_id_default() or "your-model", endpoint="chat"
        ),
    }
    return render(request, "dashboard/overview.html", context)


@login_required
def organization_new(request: HttpRequest) -> HttpResponse:
    form = OrganizationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            organization = organization_create(name=form.cleaned_data["name"], owner=request.user)  # type: ignore[arg-type]
        except ApiError as error:
            form.add_error("name", error.message)
        else:
            request.session[SESSION_KEY] = organization.public_id
            messages.success(request, f"Organization {organization.name} created. Create your first API key.")
            return redirect("dashboard:apikey-list")
    has_any = memberships_of_user(user=request.user).exists()  # type: ignore[arg-type]
    return render(request, "dashboard/organization_new.html", {"form": form, "first": not has_any})


@require_POST
@login_required
def organization_switch(request: HttpRequest) -> HttpResponse:
    wanted = request.POST.get("organization", "")
    # Only an organization the user belongs to can be switched to; anything else is ignored, not reported,
    # so the form cannot be used to probe for other tenants.
    if memberships_of_user(user=request.user).filter(organization__public_id=wanted).exists():  # type: ignore[arg-type]
        request.session[SESSION_KEY] = wanted
    return redirect("dashboard:home")


def invite_accept(request: HttpRequest, token: str) -> HttpResponse:
    """An invitation link. Signed out, the page asks to sign in or sign up first and comes back here."""
    try:
        invitation = invitation_for_token(token=token)
    except NotFound as error:
        return render(request, "dashboard/invite.html", {"error": error.message}, status=404)
    if request.method == "POST" and request.user.is_authenticated:
        try:
            membership = invitation_accept(token=token, user=request.user)  # type: ignore[arg-type]
        except NotFound as error:
            return render(request, "dashboard/invite.html", {"error": error.message}, status=404)
        request.session[SESSION_KEY] = membership.organization.public_id
        messages.success(request, f"You joined {membership.organization.name} as {membership.role}.")
        return redirect("dashboard:home")
    response = render(request, "dashboard/invite.html", {"invitation": invitation, "next": request.path})
    response["Referrer-Policy"] = "no-referrer"
    return response
