"""The billing API's errors, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

These views are DRF views: the one mapping (platform_site.kernel.errors.to_api_error, which knows DRF's own
exceptions too) is installed as a DRF exception handler on the billing views only
(BillingApi.get_exception_handler), so no other DRF view changes behaviour. Every error is JSON, never the
HTML of Django's error pages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.views import SpectacularJSONAPIView
from rest_framework.response import Response
from rest_framework.views import set_rollback

from platform_site.kernel.errors import ApiError, error_response, to_api_error


def invalid_param(param: str, message: str) -> ApiError:
    return ApiError(message, param=param, code="invalid_value")


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


@csrf_exempt  # it changes nothing; a POST with a key (no cookie) got Django's HTML 403 page, not this 404
def unknown_route(request: HttpRequest, rest: str = "") -> HttpResponse:
    """Any path under a DRF API (billing, management) that names no endpoint: a JSON 404, not an HTML page."""
    error = ApiError(f"Unknown API route: {request.method} {request.path}.", status=404, code="unknown_url")
    return error_response(error, request_id=_request_id(request))


class OpenApiDocumentView(SpectacularJSONAPIView):  # type: ignore[misc]
    """drf-spectacular's document view with the APIs' error object (a POST to it was DRF's own 405 body)."""

    def get_exception_handler(self) -> Callable[[Exception, dict[str, Any]], Response]:
        return openai_exception_handler
