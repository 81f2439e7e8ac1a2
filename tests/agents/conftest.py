"""Fixtures for the agents' connectors: a real HTTP tool server and a real MCP server, both on loopback.

- `tool_server` (per test, on the test's event loop): an aiohttp server whose routes play an HTTP connector's
  endpoint, well or badly. `.url(path)`, `.secret` (the HMAC key it checks signatures with), `.requests`
  (every request it received: method, path, headers, body).
- `mcp_server` (per session, in a thread of its own): the `mcp` SDK's MCPServer (FastMCP's name in mcp 2.x)
  over streamable HTTP under uvicorn, with the tools add, lookup_order, explode and sleepy. `.url` (the
  endpoint), `.requests` (the HTTP method and JSON-RPC method of every request), `.calls_started` (the tools
  that began running). Its thread has its own event loop, so its tasks never show up among the test's.
- `allow_loopback`: connectors may reach private addresses (these servers) for the test.
- `closed_port_url`: a loopback URL nothing listens on.
- `silent_url`: a loopback URL whose server takes connections and never answers.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
import pytest
import uvicorn
from aiohttp import web

from agents import connectors

SLOW_SECONDS = 5.0
BIG_BYTES = 1024 * 1024


@pytest.fixture(autouse=True)
def _forget_tool_lists() -> Iterator[None]:
    """No test sees another's cached MCP tool lists."""
    connectors.reset()
    yield
    connectors.reset()


@pytest.fixture
def allow_loopback(settings: Any) -> None:
    settings.KEYWAY_FETCH_ALLOW_PRIVATE = True


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL nothing listens on (the port was free a moment ago, and connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/mcp"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A loopback URL whose server never answers: the socket listens but nothing accepts, so the kernel
    completes connections into its backlog and the requests sent on them wait for ever. No task or thread
    of the test's own serves it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/mcp"


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class ToolServer:
    port: int
    secret: str
    requests: list[RecordedRequest] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _tool_app(server: ToolServer) -> web.Application:
    flaky_calls = 0

    @web.middleware
    async def record(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        server.requests.append(RecordedRequest(request.method, request.path, dict(request.headers),
                                               await request.read()))
        return await handler(request)

    async def ok(request: web.Request) -> web.Response:
        body = await request.read()
        # The receiver's side of the contract: it checks the signature with Keyway's own `verify`.
        if not connectors.verify(server.secret, request.headers.get(connectors.SIGNATURE_HEADER), body,
                                 now=time.time()):
            return web.json_response({"signature_valid": False}, status=401)
        return web.json_response({"echo": orjson.loads(body)["arguments"], "signature_valid": True})

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500, text="internal error: secret stack trace")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(SLOW_SECONDS)
        return web.json_response({"late": True})

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * BIG_BYTES, content_type="text/plain")

    async def flaky(request: web.Request) -> web.Response:
        # Every other call fails: first 503, then 200.
        nonlocal flaky_calls
        flaky_calls += 1
        if flaky_calls % 2:
            return web.Response(status=503, text="try again")
        return web.json_response({"ok": True, "attempt": flaky_calls})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    async def latin1(request: web.Request) -> web.Response:
        return web.Response(body=b"caf\xe9", content_type="text/plain")

    app = web.Application(middlewares=[record])
    for path, handler in (("/ok", ok), ("/fail", fail), ("/slow", slow), ("/big", big), ("/flaky", flaky),
                          ("/redirect", redirect), ("/latin1", latin1)):
        app.router.add_post(path, handler)
    return app


@pytest.fixture
async def tool_server() -> AsyncIterator[ToolServer]:
    server = ToolServer(port=0, secret="whsec_test_" + "k" * 32)
    runner = web.AppRunner(_tool_app(server), access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = runner.addresses[0][1]
    yield server
    await runner.cleanup()


@dataclass(slots=True)
class SeenRequest:
    http_method: str
    rpc_method: str = ""


@dataclass(slots=True)
class McpTestServer:
    url: str
    requests: list[SeenRequest] = field(default_factory=list)
    calls_started: list[str] = field(default_factory=list)

    def rpc_methods(self) -> list[str]:
        return [seen.rpc_method for seen in self.requests if seen.rpc_method]


def _mcp_app(server: McpTestServer) -> Any:
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    mcp = MCPServer("keyway-test-tools", instructions="Tools for Keyway's connector tests.")

    @mcp.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        server.calls_started.append("add")
        return a + b

    @mcp.tool()
    def lookup_order(order_id: str) -> str:
        """Look an order up by its id."""
        server.calls_started.append("lookup_order")
        return f"order {order_id}: shipped"

    @mcp.tool()
    def explode() -> str:
        """Always fails."""
        server.calls_started.append("explode")
        # A ToolError's message reaches the client; any other exception's stays on the server (mcp 2.x).
        raise ToolError("the tool blew up")

    @mcp.tool()
    async def sleepy(seconds: float) -> str:
        """Sleep, then say so."""
        server.calls_started.append("sleepy")
        await anyio.sleep(seconds)
        return f"slept {seconds} s"

    # Bound to 127.0.0.1, the SDK turns on its DNS-rebinding protection for loopback host names on its own,
    # and 127.0.0.1:<any port> is among them: no transport_security needed.
    inner = mcp.streamable_http_app(host="127.0.0.1")

    async def recording(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        seen = SeenRequest(scope["method"])
        server.requests.append(seen)
        body = bytearray()

        async def tapped() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
                if not message.get("more_body"):
                    try:
                        seen.rpc_method = str(orjson.loads(body).get("method", ""))
                    except (orjson.JSONDecodeError, AttributeError):
                        pass
            return message

        await inner(scope, tapped, send)

    return recording


@pytest.fixture(scope="session")
def mcp_server() -> Iterator[McpTestServer]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = McpTestServer(url=f"http://127.0.0.1:{port}/mcp")
    config = uvicorn.Config(_mcp_app(server), loop="asyncio", lifespan="on", log_level="warning",
                            access_log=False, timeout_graceful_shutdown=1)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [listener]}, name="mcp-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the MCP test server did not start")
        time.sleep(0.01)
    yield server
    uv.should_exit = True
    thread.join(10)
    listener.close()
