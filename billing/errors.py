"""The billing API's errors, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

completions.errors does this for the OpenAI-compatible surface, but billing may not import it (layers), and
these views are DRF views: the mapping is a DRF exception handler, installed on the billing views only
(BillingApi.get_exception_handler), so no other DRF view changes behaviour. Every error is JSON, never the
HTML of Django's error pages.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import set_rollback

from platform_site.api_errors import ApiError, server_error

logger = logging.getLogger(__name__)


def invalid_param(param: str, message: str) -> ApiError:
    return ApiError(message, param=param, code="invalid_value")


def _detail_code(exc: exceptions.APIException, default: str | None) -> str | None:
    code = getattr(exc.detail, "code", None)
    return code if isinstance(code, str) and code != exc.default_code else default


def _first_message(detail: Any) -> tuple[str | None, str]:
    """(param, message) of a DRF ValidationError's detail, which may be a dict, a list or a string."""
    if isinstance(detail, dict):
        param, value = next(iter(detail.items()))
        return str(param), _first_message(value)[1]
    if isinstance(detail, list) and detail:
        return _first_message(detail[0])
    return None, str(detail)


def to_api_error(exc: BaseException, *, request_id: str) -> ApiError:
    """Classify any exception raised in a billing view. Unknown ones become a 500 naming the request id."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, exceptions.NotAuthenticated):
        return ApiError(
            "You didn't provide an API key. Provide it in the Authorization header as 'Bearer YOUR_KEY', or "
            "sign in to the dashboard.",
            status=401,
            code="invalid_api_key",
        )
    if isinstance(exc, exceptions.AuthenticationFailed):
        return ApiError(str(exc.detail), status=401, code=_detail_code(exc, "invalid_api_key"))
    if isinstance(exc, exceptions.PermissionDenied | DjangoPermissionDenied):
        message = str(exc.detail) if isinstance(exc, exceptions.APIException) else "Permission denied."
        code = _detail_code(exc, None) if isinstance(exc, exceptions.APIException) else None
        return ApiError(message, status=403, error_type="permission_error", code=code)
    if isinstance(exc, exceptions.NotFound | Http404):
        message = str(exc.detail) if isinstance(exc, exceptions.APIException) else "Not found."
        code = _detail_code(exc, "not_found") if isinstance(exc, exceptions.APIException) else "not_found"
        return ApiError(message, status=404, code=code)
    if isinstance(exc, exceptions.MethodNotAllowed):
        return ApiError(str(exc.detail), status=405, code="method_not_allowed")
    if isinstance(exc, exceptions.ValidationError | exceptions.ParseError):
        param, message = _first_message(exc.detail)
        return ApiError(message, param=param, code="invalid_value")
    if isinstance(exc, exceptions.APIException):
        return ApiError(str(exc.detail), status=exc.status_code, code=_detail_code(exc, exc.default_code))
    logger.exception("Unhandled error in billing API request %s", request_id, exc_info=exc)
    return server_error(request_id=request_id)


def _request_id(request: Any) -> str:
    return str(getattr(request, "request_id", "") or "unknown")


def openai_exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    error = to_api_error(exc, request_id=_request_id(context.get("request")))
    if error.status >= 500:
        set_rollback()
    response = Response(error.body(), status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    # DRF attaches the authenticator's challenge to 401s; RFC 9110 requires it on every 401.
    challenge = getattr(exc, "auth_header", None)
    if error.status == 401 and challenge:
        response["WWW-Authenticate"] = challenge
    return response


def unknown_route(request: HttpRequest, rest: str = "") -> JsonResponse:
    """Any path under /api/billing/ that names no endpoint: a JSON 404, not Django's HTML page."""
    error = ApiError(
        f"Unknown billing API route: {request.method} {request.path}.", status=404, code="unknown_url"
    )
    return JsonResponse(error.body(), status=404)
