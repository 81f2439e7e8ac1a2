"""Who may read an organization's usage, and which organization a request reads.

Two kinds of caller: an API key holding the `usage:read` scope, which reads its own organization and no
other; and a logged-in member of an organization (a dashboard session), who names the organization with
`?organization=<slug>` when they belong to several. Anyone else learns nothing, not even whether an
organization exists: a slug the user is not a member of is answered exactly like an unknown one.
"""

from __future__ import annotations

from django.contrib.auth.models import AnonymousUser
from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import AuthenticationFailed, NotFound, PermissionDenied
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.views import APIView

from apikeys.auth import AuthenticatedKey, authenticate_key_sync, parse_bearer
from apikeys.exceptions import InvalidApiKey, MissingScope
from apikeys.scopes import USAGE_READ
from platform_site.kernel.errors import ApiError
from platform_site.models import Organization
from platform_site.selectors import organizations_for_user


class ApiKeyAuthentication(BaseAuthentication):
    """`Authorization: Bearer sk-kw-…`. A request without the header is left to session authentication."""

    def authenticate(self, request: Request) -> tuple[AnonymousUser, AuthenticatedKey] | None:
        header = request.META.get("HTTP_AUTHORIZATION")
        if not header:
            return None
        try:
            key = authenticate_key_sync(parse_bearer(header))
        except InvalidApiKey as exc:
            raise AuthenticationFailed(exc.message, code="invalid_api_key") from None
        # The key, not a user, is the principal: request.user stays anonymous so no code path can mistake a
        # key for a member with the rights of some user.
        return AnonymousUser(), key

    def authenticate_header(self, request: Request) -> str:
        # Without a WWW-Authenticate challenge DRF would turn every 401 into a 403.
        return 'Bearer realm="keyway"'


class CanReadUsage(BasePermission):
    """A key with the usage:read scope, or an authenticated user (membership is checked per organization)."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        key = request.auth
        if isinstance(key, AuthenticatedKey):
            if USAGE_READ not in key.scopes:
                raise PermissionDenied(MissingScope(USAGE_READ).message, code="missing_scope")
            return True
        return bool(request.user and request.user.is_authenticated)


def reader_organization(request: Request) -> Organization:
    """The organization this request reads, or NotFound / PermissionDenied / a 400 naming `organization`."""
    slug = request.query_params.get("organization", "").strip()
    key = request.auth
    if isinstance(key, AuthenticatedKey):
        if slug and slug != key.organization_slug:
            raise NotFound(_not_found(slug), code="organization_not_found")
        return Organization.objects.get(pk=key.organization_id)
    assert request.user.is_authenticated, "CanReadUsage lets only authenticated users through"
    mine = organizations_for_user(user=request.user)  # type: ignore[arg-type]
    if slug:
        organization = mine.filter(slug=slug).first()
        if organization is None:
            raise NotFound(_not_found(slug), code="organization_not_found")
        return organization
    candidates = list(mine.order_by("slug")[:2])
    if not candidates:
        raise PermissionDenied("You are not a member of any organization.", code="no_organization")
    if len(candidates) > 1:
        raise ApiError(
            "You belong to several organizations; name the one to read with ?organization=<slug>.",
            param="organization",
            code="organization_required",
        )
    return candidates[0]


def _not_found(slug: str) -> str:
    return f"No organization '{slug}' among the organizations you can read."
