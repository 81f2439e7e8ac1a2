"""The ASGI handler of the API path: lean on purpose, because it runs for every proxied request.

Django's ASGIHandler does per request what a bearer-token API does not need and pays for it: it sends the
request_started/request_finished signals and closes the response through `sync_to_async` (two thread
hops), spools the body to a temporary file, and runs the dashboard's middleware. This handler keeps what
matters — Django's request object, URL resolution, async views, streaming with disconnect detection — and
drops the rest. Database connections on this path are returned by `platform_site.kernel.orm.orm`, which
is what the skipped signals would otherwise do.

A response is closed the way Django closes it — its resource closers run, which is how a streaming answer
settles what its client did not read — but without the request_finished signal, whose receivers are the
chores this path does on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
from typing import Any

from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, ASGIRequest
from django.http import HttpResponse, HttpResponseBase
from django.http.request import split_domain_port, validate_host
from django.urls import ResolverMatch, get_resolver
from django.utils.module_loading import import_string

from platform_site.kernel.conf import settings  # Django's, read faster (the module says why)
from platform_site.kernel.errors import ApiError, error_response, server_error
from platform_site.kernel.params import nul_byte_error, nul_byte_param
from platform_site.middleware import new_request_id

logger = logging.getLogger(__name__)


def close_response(response: HttpResponseBase) -> None:
    """HttpResponseBase.close() without the request_finished signal. Synchronous on purpose: it must run
    even while the request's task is being cancelled."""
    closers, response._resource_closers = response._resource_closers, []  # type: ignore[attr-defined]
    for closer in closers:
        try:
            closer()
        except Exception:
            logger.exception("Closing a response failed")
    response.closed = True


# What an event stream the server stops mid-way ends with: an error event (any `data:` object with an `error`
# makes the OpenAI SDKs raise) and the end of the stream.
_SHUTDOWN_FRAMES = (
    b'data: {"error": {"message": "The server shut down before this answer finished.", "type": "server_error", '
    b'"param": null, "code": "server_shutting_down"}}\n\ndata: [DONE]\n\n'
)


class _BodyTooLarge(Exception):
    pass


_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))
# Statuses whose answers never have a body, nor a Content-Length (RFC 9110, 8.6).
_BODILESS = frozenset((204, 304))
# Webhook ingress carries no API key: its body is signed, so the body must be read before it is judged.
_SIGNED_PREFIX = "/hooks/"


@functools.cache
def _authenticator() -> Any:
    # Named in settings: wiring may name the apps above it, never import them. Resolved once.
    return import_string(settings.API_AUTHENTICATOR)


# CORS as OpenAI answers it: any origin may call with a bearer key, and no cookie is ever involved, so a
# browser app (and the dashboard's playground) can call the API. Only this path: the management API and the
# dashboard, which do use cookies, answer no cross-origin request.
_CORS_METHODS = "GET, POST, DELETE, OPTIONS"
_CORS_EXPOSED = (
    "x-request-id, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, "
    "x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens, retry-after, "
    "x-keyway-model, x-keyway-provider, x-session-id"
)


class _StaticRoutes:
    """Matches of the URL conf's literal routes (`v1/chat/completions`), by path. Django's resolver walks its
    patterns' regular expressions for every request: 11.5 µs for a chat completion, about 1.5 % of a proxied
    request's CPU. A match is kept only when its route is the path itself, so the cache holds at most one entry
    per literal route, whatever paths clients send; a route with parameters, or a catch-all, is resolved each
    time. A new URL conf (tests change it) starts afresh."""

    def __init__(self) -> None:
        self._resolver: Any = None
        self._matches: dict[str, ResolverMatch] = {}

    def resolve(self, path: str) -> ResolverMatch:
        resolver = get_resolver()
        if resolver is not self._resolver:
            self._resolver, self._matches = resolver, {}
        match = self._matches.get(path)
        if match is None:
            match = resolver.resolve(path)
            if not match.args and not match.kwargs and match.route == path[1:]:
                self._matches[path] = match
        return match


class _ServedHosts:
    """Which Host headers name this server, remembered: Django's split_domain_port and validate_host cost 8.6 µs a
    request on a slow day (about 1 % of a proxied request's CPU), for the same few values every time. Only Host
    headers found valid are kept, at most 64 of them, so that clients sending made-up hosts cannot grow it; a
    new ALLOWED_HOSTS (tests change it) starts afresh."""

    LIMIT = 64

    def __init__(self) -> None:
        self._allowed: Any = None
        self._valid: set[str] = set()

    def serves(self, host: str) -> bool:
        allowed = settings.ALLOWED_HOSTS
        if allowed is not self._allowed:
            self._allowed, self._valid = allowed, set()
        if host in self._valid:
            return True
        domain, _ = split_domain_port(host)
        if not domain or not validate_host(domain, allowed):
            return False
        if len(self._valid) < self.LIMIT:
            self._valid.add(host)
        return True


_served_hosts = _ServedHosts()


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class ApiHandler(ASGIHandler):
    def __init__(self) -> None:
        super().__init__()
        self._routes = _StaticRoutes()

    def load_middleware(self, is_async: bool = False) -> None:
        # No middleware on the API path; the views do request ids, authentication and error mapping.
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        self._middleware_chain = self._get_response_async  # type: ignore[attr-defined]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"The API handler serves HTTP only, not {scope['type']}.")
        cors = _header(scope, b"origin") is not None
        early = self._refusal(scope)
        if early is not None:
            await self._send(early, send, cors=cors)
            return
        if scope["method"] in _BODY_METHODS and not scope["path"].startswith(_SIGNED_PREFIX):
            # Identity before body: a request without a valid key is answered before any of its body is read.
            refused = await _authenticator()(scope)
            if refused is not None:
                await self._send(refused, send, cors=cors)
                return
        try:
            async with asyncio.timeout(settings.KEYWAY_BODY_READ_TIMEOUT):
                body = await self._read_body(scope, receive)
        except RequestAborted:
            return
        except _BodyTooLarge:
            error = ApiError("The request body is too large.", status=413, code="request_too_large")
            await self._send(error_response(error, request_id=new_request_id()), send, cors=cors)
            return
        except TimeoutError:
            error = ApiError(
                f"The request body did not arrive within {settings.KEYWAY_BODY_READ_TIMEOUT:g} seconds.",
                status=408, code="request_timeout",
            )
            await self._send(error_response(error, request_id=new_request_id()), send, cors=cors)
            return
        request = ASGIRequest(scope, io.BytesIO(body))
        task = asyncio.current_task()
        assert task is not None
        disconnected = asyncio.Event()
        listener = asyncio.create_task(self._listen_for_disconnect(receive, task, disconnected))
        response: HttpResponseBase | None = None
        try:
            response = await self._respond(request)
            await self._send(response, send, cors=cors)
        except asyncio.CancelledError:
            # The client went away: the view (and any stream it was producing) has been cancelled.
            if not disconnected.is_set():
                # Not the client: the server is stopping this request (a graceful shutdown's deadline). The
                # client is told so rather than cut off, and the request ends normally.
                task.uncancel()
                await self._stopped(response, send, cors=cors)
        finally:
            listener.cancel()
            # Finished or abandoned: a stream that never started (or stopped half-way) settles here.
            if response is not None:
                close_response(response)

    async def _stopped(self, response: HttpResponseBase | None, send: Any, *, cors: bool) -> None:
        """The end of a request the server stopped: a 503 the SDKs retry (elsewhere) if nothing was sent yet,
        or, in the middle of an event stream, an error event and the stream's end, which the SDKs raise as
        an error rather than take for a whole answer."""
        with contextlib.suppress(Exception):
            if response is None:
                error = ApiError("The server is shutting down; retry the request.", status=503,
                                 error_type="server_error", code="server_shutting_down", headers={"Retry-After": "1"})
                await self._send(error_response(error, request_id=new_request_id()), send, cors=cors)
            elif response.streaming and response.get("Content-Type", "").startswith("text/event-stream"):
                await send({"type": "http.response.body", "body": _SHUTDOWN_FRAMES, "more_body": False})

    @staticmethod
    def _refusal(scope: dict[str, Any]) -> HttpResponseBase | None:
        """What is answered before the body is read: a CORS preflight, a Host this server is not, a NUL byte
        in the URL."""
        if scope["method"] == "OPTIONS" and _header(scope, b"access-control-request-method") is not None:
            preflight = HttpResponse(status=204)
            preflight["Access-Control-Allow-Methods"] = _CORS_METHODS
            preflight["Access-Control-Allow-Headers"] = (
                _header(scope, b"access-control-request-headers") or "authorization, content-type"
            )[:1000]
            preflight["Access-Control-Max-Age"] = "86400"
            return preflight
        if not _served_hosts.serves(_header(scope, b"host") or ""):
            error = ApiError("The Host header names a host this server does not serve.", code="invalid_host")
            return error_response(error, request_id=new_request_id())
        param = nul_byte_param(scope["path"], scope.get("query_string", b"").decode("latin-1"))
        if param is not None:
            return error_response(nul_byte_error(param), request_id=new_request_id())
        return None

    async def _send(self, response: HttpResponseBase, send: Any, *, cors: bool) -> None:
        """Every answer of the API path is never cached or sniffed, and readable cross-origin."""
        response.setdefault("Cache-Control", "no-store")
        response["X-Content-Type-Options"] = "nosniff"
        if cors:
            response["Access-Control-Allow-Origin"] = "*"
            response["Access-Control-Expose-Headers"] = _CORS_EXPOSED
        await self.send_response(response, send)

    async def send_response(self, response: HttpResponseBase, send: Any) -> None:
        """Django's, without what this path does not need.
        - A whole answer goes in one body message, with its Content-Length (Django's own handler leaves that to
          middleware this path does not run, so every JSON answer went out chunked).
        - An event stream's parts are sent as they are, without Django's per-part layers: two async
          generators, make_bytes and chunk_bytes for every event, which is a bytes object already (about 3 % of
          a relayed stream's CPU).
        Anything else (a sync iterator) is Django's to send."""
        parts = None
        if response.streaming:
            parts = getattr(response, "_iterator", None) if getattr(response, "is_async", False) else None
            if parts is None or not hasattr(parts, "aclose"):
                await super().send_response(response, send)
                return
        headers = [(name.encode("ascii"), value.encode("latin-1")) for name, value in response.items()]
        headers += [(b"Set-Cookie", cookie.output(header="").encode("ascii").strip())
                    for cookie in response.cookies.values()]
        if parts is None:
            body = response.content  # type: ignore[attr-defined]
            if response.status_code not in _BODILESS and not response.has_header("Content-Length"):
                headers.append((b"Content-Length", str(len(body)).encode("ascii")))
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        async with contextlib.aclosing(parts):
            async for part in parts:
                body = part if type(part) is bytes else response.make_bytes(part)
                await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body"})

    async def _read_body(self, scope: dict[str, Any], receive: Any) -> bytes:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and limit is not None and int(value) > limit:
                raise _BodyTooLarge
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestAborted
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if limit is not None and size > limit:
                    raise _BodyTooLarge
                parts.append(chunk)
            if not message.get("more_body", False):
                return parts[0] if len(parts) == 1 else b"".join(parts)

    @staticmethod
    async def _listen_for_disconnect(receive: Any, task: asyncio.Task[Any], disconnected: asyncio.Event) -> None:
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnected.set()
            task.cancel()

    async def _respond(self, request: ASGIRequest) -> HttpResponseBase:
        try:
            match = self._routes.resolve(request.path_info)
            request.resolver_match = match
            response: HttpResponseBase = await match.func(request, *match.args, **match.kwargs)
            return response
        except asyncio.CancelledError:
            raise
        except Exception:
            # Views map their own errors; this is the last resort for failures outside them. Never a traceback
            # to the client, and the log names the request id the client is given.
            request_id = getattr(request, "request_id", None) or new_request_id()
            logger.exception("Unhandled error on the API path in request %s", request_id)
            return error_response(server_error(request_id=request_id), request_id=request_id)
