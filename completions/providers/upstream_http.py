"""The upstream's JSON calls (chat completions, embeddings) over a small HTTP/1.1 client of Keyway's own.

Streams and realtime WebSockets stay on aiohttp (openai_compatible). A JSON call is the proxy's hottest path,
and aiohttp's client is most of its cost: measured with bench/upstream_client_bench.py against the fake
upstream, aiohttp costs 80 µs of CPU per call at concurrency 32 and 165 µs at concurrency 1; this client
costs about a quarter of that. The work it leaves out is work a JSON POST to a configured upstream never
needs: cookies, redirects, proxies, multipart, tracing hooks, per-call timer and payload objects.

What it does do, and the bounds it keeps:
- HTTP/1.1 with keep-alive: one pool of idle connections per origin and event loop, newest first; a
  connection idle for 30 s, closed by the server, or in any state but "answered whole" is never reused. A POST
  is never sent twice (as aiohttp does not), so a server that closes an idle connection just as a call takes
  it fails that call, which the router then sends to the next deployment.
- Responses parsed by httptools (llhttp, the parser uvicorn uses): Content-Length, chunked, or ended by the
  server closing; 1xx interim answers skipped; gzip and deflate bodies decompressed (Keyway asks for
  identity, but an upstream may compress anyway).
- Bounds: the head at most 64 KiB, the body at most MAX_ANSWER (compressed and decompressed); the whole call
  (connecting included) within its timeout, the connect within its own. A call cancelled or timed out closes
  its connection.
- TLS with the default context (certificates and host names verified against the system's CAs, or
  SSL_CERT_FILE's).
- Header names and values checked when the origin is built: a CR, LF or NUL in the provider's configured
  headers or key raises ValueError rather than reach the wire.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
import zlib
from typing import NamedTuple
from urllib.parse import urlsplit

import httptools

from platform_site.kernel.loops import PerLoop

# The most an answer's body may hold, compressed or not: large embeddings answers run to tens of MiB.
MAX_ANSWER = 256 * 1024 * 1024
_MAX_HEAD = 64 * 1024
_KEEP_IDLE = 30.0
_MAX_IDLE = 512  # idle connections kept per origin and loop (the upstream gate bounds those in use)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FORBIDDEN_IN_VALUE = re.compile(r"[\r\n\0]")


class UpstreamHTTPError(Exception):
    """The call did not get a whole answer; `reason` says how (a short name for the client's message)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Answer(NamedTuple):
    status: int
    body: bytes
    retry_after: str | None


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def check_header(name: str, value: str) -> None:
    """ValueError unless `name: value` can be sent as one header line as it is."""
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid header name")
    if _FORBIDDEN_IN_VALUE.search(value):
        raise ValueError(f"the value of header {name!r} holds a line break or NUL")


class Origin:
    """Where a provider's calls go and the header lines they all carry, encoded once."""

    __slots__ = ("key", "host", "port", "tls", "_prefix", "_query", "_head")

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the base URL is not an http(s) URL with a host")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = parts.scheme == "https"
        self.key = (parts.scheme, self.host, self.port)
        self._prefix = parts.path.rstrip("/")
        self._query = f"?{parts.query}" if parts.query else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if parts.port and parts.port != (443 if self.tls else 80):
            host = f"{host}:{parts.port}"
        lines = [f"Host: {host}", "User-Agent: keyway", "Accept-Encoding: identity"]
        for name, value in headers.items():
            check_header(name, value)
            lines.append(f"{name}: {value}")
        self._head = "".join(f"{line}\r\n" for line in lines).encode()

    def request(self, path: str, body: bytes) -> bytes:
        target = f"{self._prefix}{path}{self._query}".encode()
        return b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (target, self._head, len(body), body)


class _Connection(asyncio.Protocol):
    """One connection to an origin; between calls it waits in its pool."""

    def __init__(self, pool: UpstreamHTTP, key: tuple[str, str, int]) -> None:
        self.pool, self.key = pool, key
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Answer] | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reusable = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.chunks: list[bytes] = []
        self.size = self.head_size = 0
        self.encoding = b""
        self.retry_after: str | None = None
        self.delimited = False  # a Content-Length or chunked body: not ended by the connection closing

    def begin(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Answer]:
        self._reset()
        self.reusable = False
        self.waiter = loop.create_future()
        return self.waiter

    def fail(self, error: BaseException) -> None:
        """End the call in progress with `error` and close the connection."""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        self.close()

    def time_out(self) -> None:
        self.fail(TimeoutError())

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self.close()  # bytes nobody asked for: this connection's state is unknown now
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(UpstreamHTTPError("UnexpectedUpgrade"))
        except httptools.HttpParserError:
            self.fail(UpstreamHTTPError("MalformedAnswer"))

    def eof_received(self) -> bool:
        return False  # close: an answer ended by EOF is complete in connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if self.status >= 200 and not self.delimited:
                # A body without a length or chunks ends where the connection does.
                self.on_message_complete()
            else:
                waiter.set_exception(UpstreamHTTPError(type(exc).__name__ if exc else "ServerDisconnected"))
        else:
            self.pool.forget(self)

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > _MAX_HEAD:
            self.fail(UpstreamHTTPError("AnswerHeadTooLarge"))
            return
        name = name.lower()
        if name == b"content-encoding":
            self.encoding = value.strip().lower()
        elif name == b"retry-after":
            self.retry_after = value.decode("latin-1")
        elif name in (b"content-length", b"transfer-encoding"):
            self.delimited = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_ANSWER:
            self.fail(UpstreamHTTPError("AnswerTooLarge"))
            return
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.status < 200:
            self._reset()  # 100 Continue and the like: the answer follows
            return
        self.reusable = not self.closed and self.parser.should_keep_alive()
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks = []
        waiter.set_result(Answer(self.status, body, self.retry_after))


class UpstreamHTTP:
    """This event loop's connections to every origin."""

    def __init__(self) -> None:
        self.idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self.is_closed = False

    async def post(self, origin: Origin, path: str, body: bytes, *, timeout: float, connect_timeout: float) -> Answer:
        """POST `body` (JSON) to `path` under `origin`'s base URL; the whole answer, decompressed. Raises
        TimeoutError past `timeout` (connect_timeout for the connect alone), UpstreamHTTPError otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        connection = self._take(origin.key, loop.time())
        if connection is None:
            connection = await self._connect(origin, min(connect_timeout, timeout))
        waiter = connection.begin(loop)
        assert connection.transport is not None
        connection.transport.write(origin.request(path, body))
        timer = loop.call_at(deadline, connection.time_out)
        try:
            answer = await waiter
        except BaseException:
            connection.close()  # cancelled, timed out or failed: what the connection holds now is unknown
            raise
        finally:
            timer.cancel()
            connection.waiter = None
        if connection.reusable and not self.is_closed:
            self._put(connection, loop.time())
        else:
            connection.close()
        if connection.encoding not in (b"", b"identity"):
            return answer._replace(body=_decompressed(connection.encoding, answer.body))
        return answer

    async def _connect(self, origin: Origin, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, origin.key), origin.host, origin.port,
                    ssl=_tls_context() if origin.tls else None, server_hostname=origin.host if origin.tls else None,
                )
        except TimeoutError:
            raise  # (an OSError too)
        except OSError as error:  # refused, unreachable, a name that does not resolve, a certificate refused
            raise UpstreamHTTPError(type(error).__name__) from None
        return connection

    def _take(self, key: tuple[str, str, int], now: float) -> _Connection | None:
        idle = self.idle.get(key)
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < _KEEP_IDLE:
                return connection
            connection.close()
        return None

    def _put(self, connection: _Connection, now: float) -> None:
        connection.idle_since = now
        idle = self.idle.setdefault(connection.key, [])
        idle.append(connection)
        if len(idle) > _MAX_IDLE:
            idle.pop(0).close()

    def forget(self, connection: _Connection) -> None:
        """A connection closed while idle (by the server, or by `close`): out of its pool."""
        idle = self.idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def connections(self) -> int:
        """Idle connections held, for tests."""
        return sum(len(idle) for idle in self.idle.values())

    async def close(self) -> None:
        self.is_closed = True
        for idle in list(self.idle.values()):
            for connection in list(idle):
                connection.close()
        self.idle.clear()


def _decompressed(encoding: bytes, body: bytes) -> bytes:
    if encoding in (b"gzip", b"x-gzip"):
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == b"deflate":
        # RFC 9110's deflate is zlib-wrapped; some servers send the raw stream.
        decompressor = zlib.decompressobj(zlib.MAX_WBITS if body[:1] == b"\x78" else -zlib.MAX_WBITS)
    else:
        raise UpstreamHTTPError("UnsupportedContentEncoding")
    try:
        plain = decompressor.decompress(body, MAX_ANSWER)
    except zlib.error:
        raise UpstreamHTTPError("MalformedCompressedBody") from None
    if decompressor.unconsumed_tail:
        raise UpstreamHTTPError("AnswerTooLarge")
    return plain


async def _close(client: UpstreamHTTP) -> None:
    await client.close()


# One client (and so one set of pools) per event loop: a connection belongs to the loop that opened it.
upstream_http: PerLoop[UpstreamHTTP] = PerLoop(
    "upstream HTTP (JSON calls)", UpstreamHTTP, _close, is_closed=lambda client: client.is_closed
)
