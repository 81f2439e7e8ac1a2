from __future__ import annotations

from platform_site.kernel.errors import ApiError


class SessionNotFound(ApiError):
    status = 404
    code = "session_not_found"


class SessionFull(ApiError):
    code = "session_full"


class AgentNotFound(ApiError):
    status = 404
    code = "model_not_found"


class ConnectorNotAllowed(ApiError):
    status = 403
    error_type = "permission_error"
    code = "connector_not_allowed"


class ConnectorUnavailable(ApiError):
    status = 502
    error_type = "server_error"
    code = "connector_unavailable"


class TooManyAgentRuns(ApiError):
    status = 429
    error_type = "rate_limit_error"
    code = "too_many_agent_runs"
