"""The upstream's chat completions (whole and streamed) and embeddings over a lean HTTP/1.1 client of Keyway's
own. Realtime WebSockets stay on aiohttp (openai_compatible).

Why not aiohttp: a call to the upstream is the proxy's hottest path, and aiohttp's client was most of its
cost. Measured with bench/upstream_client_bench.py against the fake upstream, a JSON call costs 78-83 µs of
CPU through aiohttp at concurrency 32 (154-158 at concurrency 1) and 21-22 (51-53) through this client. What
it leaves out, a POST to a configured upstream never needs: cookies, redirects, proxies, multipart, tracing
hooks, per-call timer and payload objects.

What it does, and the bounds it keeps:
- HTTP/1.1 with keep-alive: one pool of idle connections per origin and event loop, newest first. A connection
  idle for 30 s, closed by the server, or in any state but "answered to its end" is never reused. A POST is
  never sent twice (aiohttp does not either), so a server that closes an idle connection just as a call takes
  it fails that call, which the router then sends to the next deployment.
- Answers parsed by httptools (llhttp, the parser uvicorn uses): Content-Length, chunked, or ended by the
  server closing; 1xx interim answers skipped. Whole answers compressed with gzip or deflate are unpacked
  (Keyway asks for identity, but a server may compress anyway); a compressed stream is refused.
- Bounds: the head at most 64 KiB; a whole answer at most MAX_ANSWER, compressed and unpacked; a stream read
  at most _READ_AHEAD (and one socket read) ahead of its reader, after which the connection stops reading and
  TCP holds the upstream back. A whole answer (connecting included) within its timeout; a stream's head and
  each of its reads within the read timeout; the connect within its own. A call cancelled, timed out, or a
  stream closed before its end closes its connection, which tells the upstream to stop.
- TLS with the default context: certificates and host names checked against the system's CAs (or
  SSL_CERT_FILE's).
- Header names and values checked when the origin is built: a CR, LF or NUL in a provider's configured
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
# The most of a stream read ahead of its reader: past it the connection stops reading until the reader catches up.
_READ_AHEAD = 256 * 1024
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
    """One connection to an origin; between calls it waits in its pool. A call reads its answer whole
    (`post`) or as it arrives (`open_stream`)."""

    def __init__(self, pool: UpstreamHTTP, key: tuple[str, str, int]) -> None:
        self.pool, self.key = pool, key
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Answer] | None = None  # the whole answer, or a stream's head
        self.reader: asyncio.Future[None] | None = None  # a stream's reader, waiting for more
        self.active = False  # a call is using it
        self.whole = True
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        self.reusable = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.chunks: list[bytes] = []
        self.size = self.head_size = self.buffered = 0
        self.encoding = b""
        self.retry_after: str | None = None
        self.delimited = False  # a Content-Length or chunked body: not ended by the connection closing
        self.ended = False
        self.error: BaseException | None = None

    def begin(self, loop: asyncio.AbstractEventLoop, *, whole: bool) -> asyncio.Future[Answer]:
        self._reset()
        self.whole, self.active, self.reusable = whole, True, False
        self.waiter = loop.create_future()
        return self.waiter

    def finish(self) -> None:
        self.active = False
        self.waiter = self.reader = None

    def fail(self, error: BaseException) -> None:
        """End the call in progress with `error` and close the connection."""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        elif self.active and self.error is None:
            self.error = error
            self._wake()
        self.close()

    def time_out(self) -> None:
        self.fail(TimeoutError())

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        if self.reader is not None and not self.reader.done():
            self.reader.set_result(None)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.active or self.ended or self.error is not None:
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
        if not self.active:
            self.pool.forget(self)
        elif not self.ended and self.error is None:
            if self.status >= 200 and not self.delimited:
                self.on_message_complete()  # a body without a length or chunks ends where the connection does
            else:
                self.fail(UpstreamHTTPError(type(exc).__name__ if exc else "ServerDisconnected"))

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
        if self.whole or self.status < 200 or self.waiter is None or self.waiter.done():
            return
        if self.encoding not in (b"", b"identity"):
            self.fail(UpstreamHTTPError("UnsupportedContentEncoding"))  # asked for identity; a stream is not unpacked
            return
        self.waiter.set_result(Answer(self.status, b"", self.retry_after))

    def on_body(self, body: bytes) -> None:
        if self.error is not None:
            return
        self.size += len(body)
        if self.whole:
            if self.size > MAX_ANSWER:
                self.fail(UpstreamHTTPError("AnswerTooLarge"))
                return
            self.chunks.append(body)
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _READ_AHEAD and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()  # TCP holds the upstream back until the reader catches up
        self._wake()

    def on_message_complete(self) -> None:
        if not self.active or self.error is not None:
            return
        if self.status < 200:
            self._reset()  # 100 Continue and the like: the answer follows
            return
        self.ended = True
        self.reusable = not self.closed and self.parser.should_keep_alive()
        if self.whole:
            if self.waiter is not None and not self.waiter.done():
                body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
                self.chunks = []
                self.waiter.set_result(Answer(self.status, body, self.retry_after))
        else:
            self._wake()


def _time_out(reader: asyncio.Future[None]) -> None:
    if not reader.done():
        reader.set_exception(TimeoutError())


class Stream:
    """An answer read as it arrives (a chat completion's server-sent events). `close()` it when done."""

    __slots__ = ("status", "retry_after", "_connection", "_read_timeout", "_loop")

    def __init__(self, connection: _Connection, head: Answer, read_timeout: float) -> None:
        self.status, self.retry_after = head.status, head.retry_after
        self._connection, self._read_timeout = connection, read_timeout
        self._loop = asyncio.get_running_loop()

    async def read_any(self) -> bytes:
        """Whatever has arrived since the last read, waiting up to the read timeout for something; b"" once
        the answer has ended. Raises TimeoutError, or UpstreamHTTPError if it broke (after what came before)."""
        connection = self._connection
        while not connection.chunks:
            if connection.error is not None:
                raise connection.error
            if connection.ended:
                return b""
            reader = connection.reader = self._loop.create_future()
            timer = self._loop.call_later(self._read_timeout, _time_out, reader)
            try:
                await reader
            finally:
                timer.cancel()
                connection.reader = None
        chunks = connection.chunks
        connection.chunks, connection.buffered = [], 0
        if connection.paused and not connection.closed:
            connection.paused = False
            assert connection.transport is not None
            connection.transport.resume_reading()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def read_whole(self) -> bytes:
        """The rest of the answer (an error's body), MAX_ANSWER at most."""
        parts, size = [], 0
        while block := await self.read_any():
            size += len(block)
            if size > MAX_ANSWER:
                raise UpstreamHTTPError("AnswerTooLarge")
            parts.append(block)
        return b"".join(parts)

    def close(self) -> None:
        """Back to its pool if the answer was read to its end and the server keeps the connection; closed
        otherwise, which tells the upstream to stop generating."""
        connection = self._connection
        connection.pool.release(connection, read_to_end=connection.ended and not connection.chunks,
                                now=self._loop.time())


class UpstreamHTTP:
    """This event loop's connections to every origin."""

    def __init__(self) -> None:
        self.idle: dict[tuple[str, str, int], list[_Connection]] = {}  # per origin, oldest first
        self.is_closed = False
        self.swept = 0.0

    async def post(self, origin: Origin, path: str, body: bytes, *, timeout: float, connect_timeout: float) -> Answer:
        """POST `body` (JSON) to `path` under `origin`'s base URL; the whole answer, decompressed. Raises
        TimeoutError past `timeout` (connect_timeout for the connect alone), UpstreamHTTPError otherwise."""
        connection, answer = await self._exchange(origin, path, body, whole=True, wait=timeout,
                                                  connect_timeout=connect_timeout)
        self.release(connection, read_to_end=True, now=asyncio.get_running_loop().time())
        if connection.encoding not in (b"", b"identity"):
            return answer._replace(body=_decompressed(connection.encoding, answer.body))
        return answer

    async def open_stream(self, origin: Origin, path: str, body: bytes, *, read_timeout: float,
                          connect_timeout: float) -> Stream:
        """POST `body` and return the answer once its head has arrived (within `read_timeout` of the connection,
        as each read after it); its body is read from the Stream. Raises TimeoutError, UpstreamHTTPError."""
        connection, head = await self._exchange(origin, path, body, whole=False, wait=read_timeout,
                                                connect_timeout=connect_timeout)
        return Stream(connection, head, read_timeout)

    async def _exchange(self, origin: Origin, path: str, body: bytes, *, whole: bool, wait: float,
                        connect_timeout: float) -> tuple[_Connection, Answer]:
        """Send the request on a kept connection or a new one, and wait for the whole answer (`wait` seconds from
        now, connecting included) or a stream's head (`wait` seconds from the connection)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        connection = self._take(origin.key, started)
        if connection is None:
            connection = await self._connect(origin, min(connect_timeout, wait))
        waiter = connection.begin(loop, whole=whole)
        assert connection.transport is not None
        connection.transport.write(origin.request(path, body))
        timer = loop.call_at((started if whole else loop.time()) + wait, connection.time_out)
        try:
            return connection, await waiter
        except BaseException:
            connection.close()  # cancelled, timed out or failed: what the connection holds now is unknown
            connection.finish()
            raise
        finally:
            timer.cancel()

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
            transport = connection.transport
            if (not connection.closed and transport is not None and not transport.is_closing()
                    and now - connection.idle_since < _KEEP_IDLE):
                return connection
            connection.close()
        return None

    def release(self, connection: _Connection, *, read_to_end: bool, now: float) -> None:
        """A call's end: its connection back to the pool if its answer was read to the end and the server keeps
        it; closed otherwise."""
        connection.finish()
        if read_to_end and connection.reusable and not connection.closed and not self.is_closed:
            self._put(connection, now)
        else:
            connection.close()

    def _put(self, connection: _Connection, now: float) -> None:
        connection.idle_since = now
        idle = self.idle.setdefault(connection.key, [])
        idle.append(connection)
        if len(idle) > _MAX_IDLE:
            idle.pop(0).close()
        if now - self.swept >= _KEEP_IDLE:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Close the connections idle for _KEEP_IDLE, in every pool (each pool is oldest first)."""
        self.swept = now
        for key, idle in list(self.idle.items()):
            while idle and now - idle[0].idle_since >= _KEEP_IDLE:
                idle.pop(0).close()
            if not idle:
                del self.idle[key]

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
