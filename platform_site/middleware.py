"""Dashboard middleware. The API path does not run this stack (see platform_site.asgi)."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase


def new_request_id() -> str:
    return f"req_{secrets.token_hex(16)}"


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
        response = self.get_response(request)
        response["x-request-id"] = request.request_id  # type: ignore[attr-defined,index]
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        request.request_id = new_request_id()  # type: ignore[attr-defined]
        response = await self.get_response(request)  # type: ignore[misc]
        response["x-request-id"] = request.request_id  # type: ignore[attr-defined]
        return response
