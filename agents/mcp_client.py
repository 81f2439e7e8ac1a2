"""MCP connectors over streamable HTTP with the official `mcp` SDK: their tools listed (and cached) and called,
one session (initialize, request, close) per call. Reached through agents.connectors, which imports this
module on first use: the SDK takes about a second to import."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import httpcore2
import httpx2
import orjson
from django.conf import settings
from mcp import ClientSession, MCPError
from mcp import types as mcp_types
from mcp.client.streamable_http import streamable_http_client

from agents.connectors import (
    USER_AGENT,
    ConnectorError,
    McpServerSpec,
    ToolOutcome,
    ToolSpec,
    _elapsed_ms,
    _Failed,
    _finish,
    _refuse_private_host,
    logger,
)
from platform_site.kernel import outbound

T = TypeVar("T")

# How long closing an MCP session (its DELETE) may take beyond the call's own time-out, so that a server
# that answered in time is also told the session is over.
_CLOSE_GRACE = 1.0
# A tool list is not bounded by a connector's max_response_bytes (that is for results), but it is bounded.
_LIST_MAX_BYTES = 4 * 1024 * 1024
_LIST_MAX_PAGES = 20
_LIST_CACHE_MAX_ENTRIES = 10_000
_CLIENT_INFO = mcp_types.Implementation(name="keyway", version="1")


# MCP connectors: the HTTP client under the SDK -----------------------------------------------------------


class _Guard:
    """What went wrong below the SDK, where its own errors say less: set by the transport, read afterwards."""

    __slots__ = ("failure", "limit", "wire_limit")

    def __init__(self, limit: int, wire_limit: int) -> None:
        self.limit = limit
        self.wire_limit = wire_limit
        self.failure: _Failed | None = None


class _PublicOnlyBackend(httpcore2.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses vetted in the same lookup. The SDK takes an
    httpx2 client, and its transport's pool takes a network backend: so the MCP connection gets the same DNS
    rebinding protection as aiohttp's public-only resolver gives the HTTP connectors (TLS still checks the
    certificate against the host name, which httpcore passes to start_tls apart from the address)."""

    def __init__(self, guard: _Guard) -> None:
        self._inner = httpcore2.AnyIOBackend()
        self._guard = guard

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore2.AsyncNetworkStream:
        if outbound.private_addresses_allowed():
            return await self._inner.connect_tcp(host, port, timeout=timeout, local_address=local_address,
                                                 socket_options=socket_options)
        try:
            addresses = await outbound.resolve(host)
        except OSError as exc:
            raise httpcore2.ConnectError("the host cannot be resolved") from exc
        if not all(outbound.is_public_text(address) for address in addresses):
            self._guard.failure = _Failed("refused", "the connector's address is private")
            raise httpcore2.ConnectError("the host resolves to a private address")
        last: httpcore2.ConnectError | None = None
        for address in dict.fromkeys(addresses):
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except httpcore2.ConnectError as exc:
                last = exc
        raise last or httpcore2.ConnectError("the host has no address")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _CappedStream(httpx2.AsyncByteStream):
    """A response body that stops at the guard's limit: the SDK reads a JSON reply whole, with no bound."""

    def __init__(self, inner: httpx2.AsyncByteStream, guard: _Guard) -> None:
        self._inner = inner
        self._guard = guard

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in self._inner:
            received += len(chunk)
            if received > self._guard.wire_limit:
                self._guard.failure = _Failed("error", f"response larger than {self._guard.limit} bytes")
                # A StreamError is what the SDK expects of a body it cannot read: it answers the waiting
                # request with an error instead of tearing the session down.
                raise httpx2.StreamError("the reply is larger than the limit")
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Made once: loading the CA bundle costs more than the rest of setting up a call's client.
    return httpx2.create_ssl_context()


class _GuardedTransport(httpx2.AsyncHTTPTransport):
    """The SDK's HTTP client's transport for one call: public addresses only, bounded replies."""

    def __init__(self, guard: _Guard) -> None:
        super().__init__(verify=_ssl_context())
        self._guard = guard
        # httpx2's transport takes no network backend of its own, but its connection pool does: the pool
        # (`_pool`, as in httpx) is replaced by one with the same TLS context around the public-only backend.
        # tests/agents/test_connectors.py proves a name that turns private after the first check is refused.
        self._pool = httpcore2.AsyncConnectionPool(ssl_context=_ssl_context(), max_connections=4,
                                                   network_backend=_PublicOnlyBackend(guard))

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        # Requests ask for no compression, so that the cap below counts the bytes that will be held; a server
        # that compresses anyway could send a small bomb.
        if response.headers.get("content-encoding", "identity").lower() != "identity":
            await response.aclose()
            self._guard.failure = _Failed("error", "the MCP server compressed its reply though asked not to")
            raise httpx2.DecodingError("compressed reply", request=request)
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        response.stream = _CappedStream(response.stream, self._guard)
        return response


def _wire_limit(limit: int) -> int:
    # The reply's text travels inside JSON (and for a tool with an output schema, twice: as text and as
    # structured content), where escaping can make a character six bytes; the exact limit is applied to the
    # decoded text.
    return limit * 12 + 65536


async def _mcp_run(spec: McpServerSpec, guard: _Guard, work: Callable[[ClientSession], Awaitable[T]]) -> T:
    """Open a session with the server, run `work` on it, and close the session, all within the connector's
    time; raises _Failed. Cancellation (the client went away) ends the SDK's task groups and closes the
    session on the way out: nothing is left running."""
    seconds = spec.timeout_ms / 1000
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if spec.authorization:
        headers["Authorization"] = spec.authorization
    deadline = anyio.current_time() + seconds
    try:
        # The outer bound includes closing the session (the SDK's DELETE); the inner ones are the call's own.
        with anyio.fail_after(seconds + _CLOSE_GRACE):
            with anyio.fail_after(seconds):
                await _refuse_private_host(spec.url)
            # trust_env=False: a proxy named in the environment would otherwise be mounted in front of the
            # guarded transport.
            async with (
                httpx2.AsyncClient(transport=_GuardedTransport(guard), headers=headers, trust_env=False,
                                   timeout=httpx2.Timeout(seconds + _CLOSE_GRACE), follow_redirects=False) as http,
                streamable_http_client(spec.url, http_client=http, max_sse_event_size=guard.wire_limit) as streams,
                ClientSession(*streams, client_info=_CLIENT_INFO) as session,
            ):
                with anyio.fail_after(max(deadline - anyio.current_time(), 0)):
                    await session.initialize()
                    return await work(session)
    except _Failed:
        raise
    except Exception as exc:  # The SDK fails in many ways: MCPError, httpx2 errors, groups of them.
        raise guard.failure or _describe(exc) from None


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside the exception groups the SDK's task groups raise."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        exc = (inner or list(exc.exceptions))[0]
    return exc


def _describe(exc: BaseException) -> _Failed:
    leaf = _leaf(exc)
    if isinstance(leaf, TimeoutError | httpx2.TimeoutException):
        return _Failed("timeout", "no reply in time")
    if isinstance(leaf, MCPError):
        return _Failed("error", f"the MCP server answered with error {leaf.code}")
    if isinstance(leaf, httpx2.ConnectError):
        return _Failed("error", "the MCP server cannot be reached")
    return _Failed("error", f"the MCP server failed ({type(leaf).__name__})")


# MCP connectors: listing and calling ---------------------------------------------------------------------


async def _list_page_by_page(session: ClientSession) -> list[ToolSpec]:
    tools: list[ToolSpec] = []
    cursor: str | None = None
    for _ in range(_LIST_MAX_PAGES):
        page = await session.list_tools(params=mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        tools.extend(ToolSpec(name=tool.name, description=tool.description or "", parameters=tool.input_schema)
                     for tool in page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


async def _list_tools_now(spec: McpServerSpec) -> list[ToolSpec]:
    started = time.monotonic()
    guard = _Guard(_LIST_MAX_BYTES, _LIST_MAX_BYTES)
    try:
        tools = await _mcp_run(spec, guard, _list_page_by_page)
    except _Failed as failed:
        logger.info("MCP connector %s: listing tools %s (%s) in %d ms", spec.public_id, failed.outcome,
                    failed.error, _elapsed_ms(started))
        raise ConnectorError(f"The tools of connector {spec.name!r} cannot be listed: {failed.error}.") from None
    logger.info("MCP connector %s: listed %d tools in %d ms", spec.public_id, len(tools), _elapsed_ms(started))
    return tools


_ListKey = tuple[str, str]


@dataclass(slots=True)
class _Flight:
    task: asyncio.Task[list[ToolSpec]]
    started_at: float
    waiters: int = 0


class _ToolLists:
    """Each MCP server's tool list, kept KEYWAY_MCP_TOOLS_TTL seconds per (URL, Authorization), so that an
    agent run does not list the tools at every step. Callers that find no fresh copy share one listing
    (single flight); a listing nobody waits for any more is cancelled, so a client that went away leaves
    nothing running. Failures are not kept: the next step tries again."""

    def __init__(self) -> None:
        self._copies: dict[_ListKey, tuple[float, list[ToolSpec]]] = {}
        self._flights: dict[_ListKey, _Flight] = {}

    @staticmethod
    def key(spec: McpServerSpec) -> _ListKey:
        # A digest, so the cache does not keep one more copy of the credential.
        return spec.url, hashlib.sha256(spec.authorization.encode()).hexdigest()

    async def get(self, spec: McpServerSpec) -> list[ToolSpec]:
        key = self.key(spec)
        ttl = settings.KEYWAY_MCP_TOOLS_TTL
        hit = self._copies.get(key)
        if hit is not None and time.monotonic() - hit[0] < ttl:
            return list(hit[1])
        loop = asyncio.get_running_loop()
        flight = self._flights.get(key)
        if flight is None or flight.task.get_loop() is not loop:
            flight = _Flight(loop.create_task(_list_tools_now(spec)), time.monotonic())
            self._flights[key] = flight
            flight.task.add_done_callback(lambda done: self._remember(key, flight, done))
        flight.waiters += 1
        try:
            return list(await asyncio.shield(flight.task))
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                # The last caller left (cancelled): end the listing, and let a newcomer start its own. It is
                # waited for, so that when this caller is gone, so is everything it started.
                if self._flights.get(key) is flight:
                    del self._flights[key]
                flight.task.cancel()
                await asyncio.wait({flight.task})

    def _remember(self, key: _ListKey, flight: _Flight, done: asyncio.Task[list[ToolSpec]]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if done.cancelled() or done.exception() is not None:
            return
        if len(self._copies) >= _LIST_CACHE_MAX_ENTRIES:
            self._copies.clear()  # servers come and go; a worker must not keep every one it ever listed
        # Timestamped with the start of the listing, so a copy never counts as fresher than it is.
        self._copies[key] = (flight.started_at, done.result())

    def reset(self) -> None:
        self._copies.clear()
        self._flights.clear()


_tool_lists = _ToolLists()


def reset() -> None:
    _tool_lists.reset()


async def list_tools(spec: McpServerSpec) -> list[ToolSpec]:
    return await _tool_lists.get(spec)


def _result_text(result: mcp_types.CallToolResult) -> str:
    """The tool result as the model reads it: its text contents joined, the others named."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        elif isinstance(block, mcp_types.ImageContent):
            parts.append("[image]")
        elif isinstance(block, mcp_types.AudioContent):
            parts.append("[audio]")
        elif isinstance(block, mcp_types.ResourceLink):
            parts.append(f"[resource link: {block.uri}]")
        elif isinstance(block, mcp_types.EmbeddedResource):
            resource = block.resource
            parts.append(resource.text if isinstance(resource, mcp_types.TextResourceContents) else "[resource]")
    if not parts and result.structured_content is not None:
        parts.append(orjson.dumps(result.structured_content).decode())
    return "\n".join(parts)


async def call_tool(spec: McpServerSpec, *, tool: str, arguments: dict[str, Any]) -> ToolOutcome:
    started = time.monotonic()
    limit = spec.max_response_bytes
    guard = _Guard(limit, _wire_limit(limit))

    async def call(session: ClientSession) -> mcp_types.CallToolResult:
        # send_request rather than session.call_tool: call_tool first lists the tools (one more round trip)
        # to validate structured content against the tool's output schema, and only the text goes on here.
        request = mcp_types.CallToolRequest(params=mcp_types.CallToolRequestParams(name=tool, arguments=arguments))
        return await session.send_request(request, mcp_types.CallToolResult)

    try:
        result = await _mcp_run(spec, guard, call)
    except _Failed as failed:
        return _finish("MCP", spec, tool, started, failed.outcome, error=failed.error)
    text = _result_text(result)
    if len(text.encode()) > limit:
        return _finish("MCP", spec, tool, started, "error", error=f"response larger than {limit} bytes")
    if result.is_error:
        # The tool's own words are what the model needs to correct itself; they stay out of `error`.
        return _finish("MCP", spec, tool, started, "error", content=text, error="the tool reported an error")
    return _finish("MCP", spec, tool, started, "ok", content=text)
