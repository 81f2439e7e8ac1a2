"""Errors of key authentication and authorization. Each carries its status, type and code; the message is
safe to show to the caller and never contains a secret."""

from __future__ import annotations

from platform_site.kernel.errors import ApiError


class ApiKeyError(ApiError):
    """Base class: a key that may not do what was asked."""

    status = 403
    error_type = "permission_error"


class InvalidApiKey(ApiKeyError):
    """Missing, malformed, unknown, revoked, expired or rotated-out key: 401 invalid_api_key."""

    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class MissingScope(ApiKeyError):
    code = "missing_scope"

    def __init__(self, scope: str) -> None:
        super().__init__(f"This API key does not have the '{scope}' scope required for this endpoint.")
        self.scope = scope


class ModelNotAllowed(ApiKeyError):
    code = "model_not_allowed"

    def __init__(self, model: str) -> None:
        super().__init__(f"This API key is not allowed to use the model '{model}'.", param="model")
        self.model = model


class InvalidKeySettings(ApiKeyError):
    """A key asked for with settings it cannot have (an unknown scope, a negative limit, a past expiry)."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_value"


class TooManyFailedAuthentications(ApiKeyError):
    """429: this client address presented too many wrong keys this minute (apikeys.throttle)."""

    status = 429
    error_type = "requests"
    code = "too_many_failed_authentications"

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            f"Too many requests with an invalid API key from this address. Please try again in {retry_after}s.",
            headers={"Retry-After": str(retry_after)},
        )
