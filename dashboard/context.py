"""Which organization a dashboard request acts in, and the actor it acts as.

The organization is the one the member last switched to (kept in the session by public id), else their
first. A session naming an organization the user no longer belongs to falls back the same way, so removing a
member takes effect on their next page.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from platform_site.access import Actor
from platform_site.models import Membership
from platform_site.selectors import memberships_of_user

SESSION_KEY = "keyway_organization"


def client_ip(request: HttpRequest) -> str | None:
    return request.META.get("REMOTE_ADDR") or None


def current_membership(request: HttpRequest) -> Membership | None:
    if not request.user.is_authenticated:
        return None
    if hasattr(request, "_keyway_membership"):
        return request._keyway_membership  # type: ignore[no-any-return]
    memberships = list(memberships_of_user(user=request.user))  # type: ignore[arg-type]
    wanted = request.session.get(SESSION_KEY)
    chosen = next((m for m in memberships if m.organization.public_id == wanted), None)
    if chosen is None and memberships:
        chosen = memberships[0]
    request._keyway_memberships = memberships  # type: ignore[attr-defined]
    request._keyway_membership = chosen  # type: ignore[attr-defined]
    return chosen


def actor_for(request: HttpRequest, membership: Membership) -> Actor:
    return Actor(
        organization=membership.organization,
        role=membership.role,
        user=request.user,  # type: ignore[arg-type]
        ip_address=client_ip(request),
    )


def dashboard(request: HttpRequest) -> dict[str, Any]:
    """Template context of every page: the current organization and the others the user may switch to."""
    membership = current_membership(request)
    return {
        "membership": membership,
        "organization": membership.organization if membership is not None else None,
        "memberships": getattr(request, "_keyway_memberships", []),
    }
