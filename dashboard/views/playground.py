"""The playground: chat with any chat model the organization may call, the answer streamed token by token from
Keyway's own /v1/chat/completions into the page (static/dashboard/playground.js).

The page calls the API as any client does, with an API key: a short-lived chat-only key minted for the
signed-in member (apikeys.services.playground_key_create) by a POST the page makes before its first message.
The secret travels in that one JSON answer, marked not to be cached, and nowhere else: not in a cookie, the
session or the page's HTML. The page keeps it in memory and reuses it until shortly before it expires. So
the playground's calls are admitted, limited, metered and billed exactly like every other call, and no key of
the member's own is ever handed to a web page.
"""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_POST
from django_ratelimit.core import get_usage

from apikeys.services import playground_key_create
from completions.selectors import catalog_for_organization
from dashboard.context import actor_for, current_membership
from dashboard.views.common import member_required, no_store
from platform_site.access import KEY_MAKERS, Actor
from platform_site.kernel.errors import ApiError, error_response
from platform_site.selectors import default_project, project_get, project_list

MINT_GROUP = "dashboard.playground-key"


def _mint_rate(group: str, request: HttpRequest) -> str:
    return f"{settings.KEYWAY_PLAYGROUND_KEYS_PER_HOUR}/h"


@member_required
def playground_view(request: HttpRequest) -> HttpResponse:
    actor: Actor = request.actor  # type: ignore[attr-defined]
    catalog = catalog_for_organization(organization=actor.organization)
    context = {
        "models": catalog.chat_models,
        "pinned_model": catalog.pinned_model,
        "projects": project_list(organization=actor.organization),
        "may_play": actor.role in KEY_MAKERS,
        "key_minutes": max(1, settings.KEYWAY_PLAYGROUND_KEY_TTL // 60),
        "mint_url": reverse("dashboard:playground-key"),
        "chat_url": reverse("v1:chat-completions"),
    }
    return render(request, "dashboard/playground.html", context)


def _error(request: HttpRequest, error: ApiError) -> HttpResponse:
    return no_store(error_response(error, request_id=getattr(request, "request_id", "")))


@require_POST
def playground_key_view(request: HttpRequest) -> HttpResponse:
    """Mint the playground's key and answer with its secret, once: 201 and JSON, never cached. Refused with an
    error object instead: 401 signed out, 403 without an organization or as a reader, 404 for a project that
    is not the organization's, 429 past the per-user rate (KEYWAY_PLAYGROUND_KEYS_PER_HOUR). The CSRF check
    has run before this view: a page of another site cannot make a member mint one."""
    if not request.user.is_authenticated:
        return _error(request, ApiError("Sign in to use the playground.", status=401, code="not_signed_in"))
    membership = current_membership(request)
    if membership is None:
        return _error(request, ApiError("Create or join an organization first.", status=403, code="no_organization"))
    usage = get_usage(request, group=MINT_GROUP, key="user", rate=_mint_rate, method="POST", increment=True)
    if usage is not None and usage["should_limit"]:
        # django-ratelimit reports a cache it could not reach as a limit with no time left: the count cannot be
        # kept, so minting fails closed rather than unlimited, and says why.
        if usage["time_left"] < 0:
            return _error(request, ApiError(
                "The playground cannot make keys right now (its rate limit cannot be counted). Try again shortly.",
                status=503, error_type="server_error", code="rate_limits_unavailable",
            ))
        return _error(request, ApiError(
            f"You made {settings.KEYWAY_PLAYGROUND_KEYS_PER_HOUR} playground keys this hour, the most allowed. "
            f"Try again in {usage['time_left']}s, or keep this page open: it reuses its key until it expires.",
            status=429, error_type="requests", code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, usage["time_left"]))},
        ))
    actor = actor_for(request, membership)
    wanted = request.POST.get("project", "")
    try:
        project = (
            project_get(organization=actor.organization, public_id=wanted)
            if wanted
            else default_project(organization=actor.organization)
        )
        key, raw_key = playground_key_create(by=actor, project=project)
    except ApiError as error:
        return _error(request, error)
    assert key.expires_at is not None  # playground keys always expire; this tells mypy so
    payload = {
        "key": raw_key,
        "id": key.public_id,
        "masked": key.masked,
        "name": key.name,
        "expires_at": key.expires_at.isoformat(),
        "expires_in": settings.KEYWAY_PLAYGROUND_KEY_TTL,
        "project": {"id": project.public_id, "name": project.name},
        "organization": {"id": actor.organization.public_id, "name": actor.organization.name},
    }
    return no_store(JsonResponse(payload, status=201))
