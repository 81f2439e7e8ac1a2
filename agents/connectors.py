"""Calling an agent's server-side tools (connectors): plain async I/O, no ORM, for the agent loop.

Two kinds of connector:
- HTTP: Keyway POSTs `{"tool", "arguments", ...context}` as JSON, signed like Keyway's webhook ingress
  (`X-Keyway-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`), and the 2xx body is
  what the model reads next.
- MCP: the server's tools are listed and called over streamable HTTP with the official `mcp` SDK, one
  session (initialize, request, close) per call.

Both follow the same outbound-address rules as image fetching (platform_site.kernel.outbound): private
addresses are refused unless `KEYWAY_FETCH_ALLOW_PRIVATE`, checked before anything is sent and again by the
connection's own resolution. Every call is bounded by the connector's `timeout_ms` and `max_response_bytes`.

A tool that fails is a value, not an exception: the calls return a `ToolOutcome`, whose `error` is written
to an audit row and so never carries argument or result text. Nothing here logs secrets or payloads.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson

from platform_site.kernel import outbound
from platform_site.kernel.loops import PerLoop

logger = logging.getLogger(__name__)

T = TypeVar("T")

USER_AGENT = "Keyway connectors"
SIGNATURE_HEADER = "X-Keyway-Signature"
# Connections of the HTTP connectors' own pool (per worker), apart from the upstream and image pools: a slow
# tenant endpoint must not take connections the proxy hop needs.
_POOL_SIZE = 16


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One tool as the model sees it."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class HttpConnectorSpec:
    public_id: str
    name: str
    url: str
    secret: str  # the plaintext HMAC key
    timeout_ms: int
    max_response_bytes: int


@dataclass(frozen=True, slots=True)
class McpServerSpec:
    public_id: str
    name: str
    url: str
    authorization: str  # "" or an Authorization header value
    timeout_ms: int
    max_response_bytes: int


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    outcome: str  # "ok" | "error" | "timeout" | "refused"
    content: str  # what the model reads next: the result text, or a short description of the failure
    error: str  # "" when ok; else a short reason without payload or argument text (it goes to an audit row)
    duration_ms: int


class ConnectorError(Exception):
    """A connector whose tools cannot be listed (unreachable, refused address, bad reply). The message names
    the connector and the reason, never its URL or credentials."""


class _Failed(Exception):
    """A call that failed before it had a result: the outcome and the audit-safe reason."""

    def __init__(self, outcome: str, error: str) -> None:
        super().__init__(error)
        self.outcome = outcome
        self.error = error


# Signatures ----------------------------------------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value: `t=<timestamp>,v1=<hex HMAC-SHA256 of b"<timestamp>." + body>`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str | None, body: bytes, *, now: float, tolerance: int = 300) -> bool:
    """True when `header` is a valid signature of `body` made within `tolerance` seconds of `now`. A header
    may carry several v1 values (a receiver rotating its secret); any one that matches will do."""
    if not header:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, separator, value = item.strip().partition("=")
        if not separator:
            return False
        if key == "t":
            if not value.isascii() or not value.isdigit():
                return False
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates or abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).rpartition("v1=")[2].encode()
    # Every candidate is compared, so the time taken does not say which one came close.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate.encode("ascii", "replace"))
    return matched


# Shared steps --------------------------------------------------------------------------------------------


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _finish(kind: str, spec: HttpConnectorSpec | McpServerSpec, tool: str, started: float, outcome: str, *,
            content: str | None = None, error: str = "") -> ToolOutcome:
    """The outcome, logged. `content` defaults to a description of the failure."""
    duration = _elapsed_ms(started)
    if content is None:
        content = _failure_text(tool, outcome, error, spec.timeout_ms)
    # The connector's public id and the outcome only: arguments, results and secrets stay out of logs.
    logger.info("%s connector %s: %s%s in %d ms", kind, spec.public_id, outcome, f" ({error})" if error else "",
                duration)
    return ToolOutcome(outcome=outcome, content=content, error=error, duration_ms=duration)


def _failure_text(tool: str, outcome: str, error: str, timeout_ms: int) -> str:
    """What the model reads when a tool failed: enough to decide whether to try again or go on without it."""
    if outcome == "timeout":
        return f"The tool {tool} did not answer within {timeout_ms} ms."
    if outcome == "refused":
        return f"The tool {tool} could not be called: its address is not allowed."
    return f"The tool {tool} failed: {error}."


async def _refuse_private_host(url: str) -> None:
    """The check before anything is sent: a URL whose host names a private address is refused without being
    contacted. The connection's own resolution checks once more (see `outbound`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Failed("error", "the connector's URL is not an http(s) URL")
    if outbound.private_addresses_allowed():
        return
    try:
        public = await outbound.resolves_to_public_only(parts.hostname)
    except OSError:
        raise _Failed("error", "the connector's host cannot be resolved") from None
    if not public:
        raise _Failed("refused", "the connector's address is private")


# HTTP connectors -----------------------------------------------------------------------------------------


def _new_http_session() -> aiohttp.ClientSession:
    # No cookies (one tenant's endpoint must not set what rides along to another's) and no DNS cache (every
    # call is vetted afresh by the public-only resolver).
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=_POOL_SIZE, use_dns_cache=False,
                                       resolver=outbound.PublicOnlyResolver()),
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": USER_AGENT},
    )


async def _close_http_session(session: aiohttp.ClientSession) -> None:
    await session.close()


http_sessions: PerLoop[aiohttp.ClientSession] = PerLoop(
    "HTTP connectors", _new_http_session, _close_http_session, is_closed=lambda session: session.closed
)


async def http_tool_call(spec: HttpConnectorSpec, *, arguments: dict[str, Any], context: dict[str, str]) -> ToolOutcome:
    """POST the model's arguments to the connector, signed, and return its reply as the tool's result.
    Never raises for a failure of the tool (only cancellation propagates)."""
    started = time.monotonic()
    try:
        body = orjson.dumps({"tool": spec.name, "arguments": arguments, **context})
    except TypeError:
        return _finish("HTTP", spec, spec.name, started, "error", error="the arguments are not JSON")
    try:
        # The whole call (resolution, connection, reply) within the connector's time.
        async with asyncio.timeout(spec.timeout_ms / 1000):
            content = await _http_post(spec, body)
    except TimeoutError:
        return _finish("HTTP", spec, spec.name, started, "timeout", error=f"no reply within {spec.timeout_ms} ms")
    except _Failed as failed:
        return _finish("HTTP", spec, spec.name, started, failed.outcome, error=failed.error)
    return _finish("HTTP", spec, spec.name, started, "ok", content=content)


async def _http_post(spec: HttpConnectorSpec, body: bytes) -> str:
    await _refuse_private_host(spec.url)
    limit = spec.max_response_bytes
    headers = {"Content-Type": "application/json",
               SIGNATURE_HEADER: sign(spec.secret, int(time.time()), body)}
    try:
        # No redirects: the signed request goes to the URL the tenant registered, and nowhere else.
        async with http_sessions.get().post(spec.url, data=body, headers=headers, allow_redirects=False,
                                            timeout=aiohttp.ClientTimeout(total=spec.timeout_ms / 1000)) as response:
            if not 200 <= response.status < 300:
                raise _Failed("error", f"HTTP {response.status}")
            if response.content_length is not None and response.content_length > limit:
                raise _Failed("error", f"response larger than {limit} bytes")
            data = bytearray()
            async for piece in response.content.iter_chunked(65536):
                data += piece
                if len(data) > limit:
                    raise _Failed("error", f"response larger than {limit} bytes")
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, outbound.PrivateAddress) or isinstance(exc.__cause__, outbound.PrivateAddress):
            raise _Failed("refused", "the connector's address is private") from None
        raise _Failed("error", f"the connector cannot be reached ({type(exc).__name__})") from None
    except aiohttp.ClientError as exc:
        raise _Failed("error", f"the request failed ({type(exc).__name__})") from None
    return bytes(data).decode("utf-8", errors="replace")


# MCP connectors ------------------------------------------------------------------------------------------
# The SDK and its HTTP client take about a second to import: they are loaded on the first MCP call, not by
# every process that serves the API or runs a command (agents/mcp_client.py).


async def mcp_list_tools(spec: McpServerSpec) -> list[ToolSpec]:
    """The MCP server's tools: name, description and input schema of each (shared with the cache: read them,
    do not change them). Raises ConnectorError when they cannot be listed."""
    from agents import mcp_client

    return await mcp_client.list_tools(spec)


async def mcp_call_tool(spec: McpServerSpec, *, tool: str, arguments: dict[str, Any]) -> ToolOutcome:
    """Call one tool of the MCP server in a session of its own. Never raises for a failure of the tool (only
    cancellation propagates)."""
    from agents import mcp_client

    return await mcp_client.call_tool(spec, tool=tool, arguments=arguments)


def reset() -> None:
    """Forget the cached tool lists (between tests)."""
    module = sys.modules.get("agents.mcp_client")
    if module is not None:
        module.reset()
