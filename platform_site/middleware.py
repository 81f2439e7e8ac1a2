"""Middleware of the full stack (the dashboard, the management and billing APIs). The lean API path does not
run this stack (see platform_site.asgi) and makes the same checks itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, HttpResponseBase

from platform_site.kernel import ids, logs
from platform_site.kernel.errors import error_response
from platform_site.kernel.params import nul_byte_error, nul_byte_param

# Paths answered with OpenAI error objects (JSON) rather than pages.
API_PREFIXES = ("/v1/", "/api/")


def new_request_id() -> str:
    return f"req_{ids.token_hex(16)}"


class RequestIdMiddleware:
    """Gives every dashboard response an x-request-id, as the API does, so support can find any request."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]]):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):  # type: ignore[no-untyped-def]
        if self.is_async:
            return self._acall(request)
        request.request_id = new_request_id()  # type: ignore[attr-defined]
        logs.current_request_id.set(request.request_id)  # type: ignore[attr-defined]
        response = self.get_response(request)
        response["x-request-id"] = request.request_id  # type: ignore[attr-defined,index]
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        request.request_id = new_request_id()  # type: ignore[attr-defined]
        logs.current_request_id.set(request.request_id)  # type: ignore[attr-defined]
        response = await self.get_response(request)  # type: ignore[misc]
        response["x-request-id"] = request.request_id  # type: ignore[attr-defined]
        return response


class RejectNulBytesMiddleware:
    """A NUL byte in the path or the query string gets a 400 before any view runs: PostgreSQL refuses one in
    any string, so every lookup it reached was a 500. API paths get an OpenAI error naming the parameter."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        param = nul_byte_param(request.path, request.META.get("QUERY_STRING", ""))
        if param is None:
            return self.get_response(request)
        error = nul_byte_error(param)
        if request.path.startswith(API_PREFIXES):
            response: HttpResponse = error_response(error, request_id=getattr(request, "request_id", "") or
                                                    new_request_id())
            return response
        return HttpResponseBadRequest(error.message)
