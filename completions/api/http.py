"""What every REST API view shares: request ids, authentication, JSON bodies and responses, and errors.

Views are surfaces: they parse the body into a typed request (completions.api.requests), make one engine
call (completions.engine.calls) and turn its result into a response. Anything a view raises becomes an
OpenAI error object through the one mapping (platform_site.kernel.errors), never an HTML page.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from django.http import HttpRequest, HttpResponse, HttpResponseBase

from apikeys.auth import AuthenticatedKey, authenticate_header
from completions.engine.calls import Caller
from platform_site.kernel import jsonbody, logs, metrics
from platform_site.kernel.errors import ApiError, error_response, to_api_error
from platform_site.middleware import new_request_id

View = Callable[..., Awaitable[HttpResponseBase]]


class ApiRequest(HttpRequest):
    """The attributes `api_endpoint` sets on Django's request (a type for views, never instantiated)."""

    request_id: str
    api_key: AuthenticatedKey
    # Who makes the engine calls this request leads to.
    caller: Caller


def json_response(payload: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> HttpResponse:
    # OPT_SERIALIZE_NUMPY writes embedding vectors straight from their arrays, without a Python list between.
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return HttpResponse(body, status=status, content_type="application/json", headers=headers)


# Where authenticate_before_body leaves the key it checked, in the request's ASGI scope.
PREAUTHENTICATED = "keyway.api_key"


async def authenticate_before_body(scope: dict[str, Any]) -> HttpResponseBase | None:
    """Run by the lean handler (settings.API_AUTHENTICATOR) on a request that carries a body, before any of
    it is read: the key in the headers must be valid, or the client gets its 401 (or 429, for an address
    that keeps failing) at once, and the server neither reads nor waits for the body. The key found is kept
    for the view, which does not look it up again."""
    header = None
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            header = value.decode("latin-1")
            break
    client = scope.get("client") or ("", 0)
    try:
        scope[PREAUTHENTICATED] = await authenticate_header(header, address=str(client[0] or ""))
    except Exception as exc:  # noqa: BLE001 - the one mapping from exceptions to error objects
        request_id = new_request_id()
        response = error_response(to_api_error(exc, request_id=request_id), request_id=request_id)
        response["x-request-id"] = request_id
        return response
    return None


def api_endpoint(*, methods: tuple[str, ...], scope: str | None) -> Callable[[View], Any]:
    """Wrap an async API view: request id, method check, bearer authentication and scope, error mapping."""

    # Returns Any: the typed URL patterns of the mypy plugin for Django know only sync views.
    def decorate(view: View) -> Any:
        @functools.wraps(view)
        async def wrapper(request: ApiRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            began = time.perf_counter()
            request.request_id = request_id = new_request_id()
            logs.current_request_id.set(request_id)
            try:
                if request.method not in methods:
                    raise ApiError(
                        f"Method {request.method} is not allowed on {request.path}. Allowed: {', '.join(methods)}.",
                        status=405,
                        code="method_not_allowed",
                        headers={"Allow": ", ".join(methods)},
                    )
                if scope is not None:
                    # The lean handler may have checked the key already, before it read the body.
                    request.api_key = getattr(request, "scope", {}).get(PREAUTHENTICATED) or await authenticate_header(
                        request.headers.get("Authorization"), address=request.META.get("REMOTE_ADDR") or ""
                    )
                    request.api_key.require_scope(scope)
                    request.caller = Caller(key=request.api_key, request_id=request_id)
                response = await view(request, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the one mapping from exceptions to error objects
                response = error_response(to_api_error(exc, request_id=request_id), request_id=request_id)
            response["x-request-id"] = request_id
            metrics.request_answered(endpoint, response.status_code, time.perf_counter() - began)
            return response

        endpoint = view.__name__
        # A bearer-token API: no cookie authenticates a call, so there is no cross-site request to forge.
        # (Marked for when Django's full stack serves these views; the lean handler runs no middleware.)
        wrapper.csrf_exempt = True  # type: ignore[attr-defined]
        return wrapper

    return decorate


def json_body(request: HttpRequest) -> dict[str, Any]:
    # The Content-Type is not checked: `curl -d` sends form encoding by default and OpenAI parses JSON anyway.
    try:
        body = jsonbody.loads(request.body)
    except jsonbody.TooDeep:
        raise jsonbody.too_deep_error() from None
    except orjson.JSONDecodeError:
        raise ApiError(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload.)",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.", code="invalid_json")
    return body


@api_endpoint(methods=("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"), scope=None)
async def unknown_route(request: ApiRequest, rest: str = "") -> HttpResponseBase:
    raise ApiError(f"Invalid URL ({request.method} {request.path})", status=404, code="unknown_url")
