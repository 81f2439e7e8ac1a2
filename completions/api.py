"""What every API view shares: request ids, authentication, JSON bodies and the error mapping."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from django.http import HttpRequest, HttpResponse, HttpResponseBase

from apikeys.auth import AuthenticatedKey, authenticate_header
from completions.errors import ApiError, error_response, to_api_error
from platform_site.middleware import new_request_id

View = Callable[..., Awaitable[HttpResponseBase]]


class ApiRequest(HttpRequest):
    request_id: str
    api_key: AuthenticatedKey
    # Set by metered views once the rate limiter has counted the request; sent on every response after that.
    rate_headers: dict[str, str]


def json_response(payload: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> HttpResponse:
    # OPT_SERIALIZE_NUMPY writes embedding vectors straight from their arrays, without a Python list between.
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return HttpResponse(body, status=status, content_type="application/json", headers=headers)


def api_endpoint(*, methods: tuple[str, ...], scope: str | None) -> Callable[[View], Any]:
    """Wrap an async API view: request id, method check, bearer authentication and scope, error mapping.

    Errors are values here: anything a view raises becomes an OpenAI error object, never an HTML page.
    """

    # Returns Any: the typed URL patterns of the mypy plugin for Django know only sync views.
    def decorate(view: View) -> Any:
        @functools.wraps(view)
        async def wrapper(request: ApiRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            request.request_id = request_id = new_request_id()
            request.rate_headers = {}
            try:
                if request.method not in methods:
                    raise ApiError(
                        f"Method {request.method} is not allowed on {request.path}. Allowed: {', '.join(methods)}.",
                        status=405,
                        code="method_not_allowed",
                        headers={"Allow": ", ".join(methods)},
                    )
                if scope is not None:
                    request.api_key = await authenticate_header(request.headers.get("Authorization"))
                    request.api_key.require_scope(scope)
                response = await view(request, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the one mapping from exceptions to error objects
                response = error_response(to_api_error(exc, request_id=request_id), request_id=request_id)
            for name, value in request.rate_headers.items():
                response.setdefault(name, value)
            response["x-request-id"] = request_id
            return response

        return wrapper

    return decorate


def json_body(request: HttpRequest) -> dict[str, Any]:
    # The Content-Type is not checked: `curl -d` sends form encoding by default and OpenAI parses JSON anyway.
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        raise ApiError(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload.)",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.", code="invalid_json")
    return body
