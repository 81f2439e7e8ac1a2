"""What every dashboard page shares: the signed-in member and their organization, and how service errors
reach the person who caused them."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import redirect

from dashboard.context import actor_for, current_membership
from platform_site.kernel.errors import ApiError

View = TypeVar("View", bound=Callable[..., HttpResponseBase])


def member_required(view: View) -> View:
    """Signed in and a member of an organization: sets request.membership and request.actor. A user with no
    organization yet is sent to create one."""

    @login_required
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        membership = current_membership(request)
        if membership is None:
            return redirect("dashboard:organization-new")
        request.membership = membership  # type: ignore[attr-defined]
        request.actor = actor_for(request, membership)  # type: ignore[attr-defined]
        return view(request, *args, **kwargs)

    return cast(View, wrapper)


# Service errors name the API's parameter; the forms name their fields a little differently.
_FIELD_FOR_PARAM = {"monthly_budget": "monthly_budget", "expires_at": "expires_on", "grace_period": "grace"}


def add_service_error(form: forms.Form, error: ApiError) -> None:
    field = _FIELD_FOR_PARAM.get(error.param or "", error.param or "")
    form.add_error(field if field in form.fields else None, error.message)


def flash_service_error(request: HttpRequest, error: ApiError) -> None:
    messages.error(request, error.message)


def no_store(response: HttpResponse) -> HttpResponse:
    """Pages that show a secret: never cached, by the browser or anything between."""
    response["Cache-Control"] = "no-store"
    response["Pragma"] = "no-cache"
    return response


def api_base_url(request: HttpRequest) -> str:
    return request.build_absolute_uri("/v1")
