"""The one mapping from exceptions to OpenAI error objects, as JSON before the first byte of a response."""

from __future__ import annotations

import logging

import orjson
from django.core.exceptions import RequestDataTooBig
from django.http import HttpResponse

from apikeys.exceptions import ApiKeyError, InvalidApiKey, MissingScope, ModelNotAllowed
from billing.exceptions import QuotaExceeded, RateLimitExceeded
from completions.providers.base import ProviderError
from platform_site.api_errors import ApiError, server_error

logger = logging.getLogger(__name__)


def model_not_found(model: str) -> ApiError:
    return ApiError(
        f"The model `{model}` does not exist or you do not have access to it.",
        status=404,
        param="model",
        code="model_not_found",
    )


def to_api_error(exc: BaseException, *, request_id: str) -> ApiError:
    """Classify any exception. Unknown ones become a 500 that names the request id and nothing else."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidApiKey):
        return ApiError(exc.message, status=401, code="invalid_api_key")
    if isinstance(exc, MissingScope):
        return ApiError(exc.message, status=403, error_type="permission_error", code="missing_scope")
    if isinstance(exc, ModelNotAllowed):
        return ApiError(
            exc.message, status=403, error_type="permission_error", param="model", code="model_not_allowed"
        )
    if isinstance(exc, ApiKeyError):
        return ApiError(exc.message, status=403, error_type="permission_error")
    if isinstance(exc, RateLimitExceeded):
        return ApiError(
            exc.message,
            status=429,
            error_type=exc.kind,
            code="rate_limit_exceeded",
            headers={**exc.headers, "Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, QuotaExceeded):
        # No Retry-After: waiting does not help, someone has to add credit or raise a cap.
        return ApiError(exc.message, status=429, error_type="insufficient_quota", code=exc.code, headers=exc.headers)
    if isinstance(exc, ProviderError):
        return ApiError(exc.message, status=exc.status, error_type=exc.error_type, param=exc.param, code=exc.code)
    if isinstance(exc, RequestDataTooBig):
        return ApiError(
            "The request body is too large.", status=413, code="request_too_large", error_type="invalid_request_error"
        )
    logger.exception("Unhandled error in request %s", request_id, exc_info=exc)
    return server_error(request_id=request_id)


def error_response(error: ApiError, *, request_id: str) -> HttpResponse:
    response = HttpResponse(orjson.dumps(error.body()), status=error.status, content_type="application/json")
    for name, value in error.headers.items():
        response[name] = value
    response["x-request-id"] = request_id
    return response
