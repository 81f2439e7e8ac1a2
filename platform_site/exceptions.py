"""Errors of tenancy: what the dashboard shows on a form and the management API returns as OpenAI errors."""

from __future__ import annotations

from platform_site.kernel.errors import ApiError


class TenancyError(ApiError):
    """A request about organizations, projects, members or invitations that cannot be done as asked."""

    status = 400
    error_type = "invalid_request_error"


class NotPermitted(TenancyError):
    """The caller's role does not allow this. Reported as 403, with the role that would."""

    status = 403
    error_type = "permission_error"
    code = "insufficient_permissions"


class NotFound(TenancyError):
    """No such object among the caller's organization's. Tenants never learn whether another's exists."""

    status = 404
    code = "not_found"


class Conflict(TenancyError):
    """The change contradicts the current state (the last owner leaving, archiving the default project)."""

    status = 409
    code = "conflict"
