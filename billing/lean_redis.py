"""A lean Redis client for billing's Lua scripts: EVALSHA on one Redis, nothing else.

Every admission that asks for a slice and every settlement batch runs one of billing's scripts
(billing.counters); at concurrency 1 the settlement's round trip is on each answer's path (`Meter.recorded`).
redis-py 8's asyncio client spends most of that round trip's CPU in its own layers: pool, retry, event
dispatch, observability attributes, two `asyncio.timeout` scopes and stream objects, about 240 Python calls
for one PING. Measured alone (`bench/redis_scripts_bench.py`), an EVALSHA cost 230 µs of CPU through
redis-py and 45 µs through a bare asyncio protocol, 5 times less, on the same (slow) day. No option of redis-py
removes those layers, and there is no well-kept asyncio Redis client that is leaner (aioredis became
redis-py's asyncio client). So this module keeps billing's script calls on a small client of Keyway's own, as
`completions.providers.upstream_http` does for upstream HTTP calls. Replies are parsed by hiredis (redis-py's
own C parser, already a dependency).

It speaks RESP2 to one Redis, `redis://` or `rediss://` (TLS, checked against the system's CAs or
SSL_CERT_FILE's), with the URL's user, password and database. It leaves out everything billing's scripts do
not need: Redis Cluster (`supports()` says no, and billing keeps redis-py's cluster client), unix sockets,
URL query options, RESP3, pipelining, pub/sub and any command but the scripts'. redis-py stays billing's client
for the rest (streams, reconciliation, tests).

It behaves as billing's redis-py client does:
- no retries: a call that failed or timed out may have run, and only the caller knows whether running it again
  is safe;
- redis-py's exceptions: ConnectionError (refused, reset, no connection free in time), TimeoutError,
  AuthenticationError, BusyLoadingError, NoScriptError, ReadOnlyError, ResponseError;
- a pool of at most `pool_size` connections, newest first; past it a call waits for a free one, up to
  max(2 s, 4 × timeout), as the blocking pool does;
- a connection idle for 30 s is closed rather than used (redis-py pings it first);
- a call that times out or is cancelled closes its connection: its reply would answer the next call.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import ssl
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
from redis import exceptions

IDLE_LIMIT = 30.0  # seconds a pooled connection may sit unused and still be used

Arg = str | bytes | int | float


def supports(url: str) -> bool:
    """Whether this client can reach the Redis at `url` as redis-py would."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or parts.query or parts.fragment:
        return False
    path = parts.path.strip("/")
    return not path or path.isdigit()


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class _ErrorReply(Exception):
    """An error reply, as hiredis hands it over (returned, not raised; `_raise_for` turns it into redis-py's)."""


def _error(message: str) -> exceptions.RedisError:
    code = message.split(" ", 1)[0]
    if code == "NOSCRIPT":
        return exceptions.NoScriptError(message)
    if code == "LOADING":
        return exceptions.BusyLoadingError(message)
    if code == "READONLY":
        return exceptions.ReadOnlyError(message)
    if code in ("NOAUTH", "WRONGPASS", "NOPERM"):
        return exceptions.AuthenticationError(message)
    return exceptions.ResponseError(message)


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            raise exceptions.DataError(f"Cannot send a {type(arg).__name__} to Redis")
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


def _time_out(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(exceptions.TimeoutError("Timeout reading from Redis"))


class _Connection(asyncio.Protocol):
    """One connection: one call at a time, its replies read by hiredis."""

    def __init__(self, client: LeanRedis) -> None:
        self.client = client
        self.reader = hiredis.Reader(replyError=_ErrorReply)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Any] | None = None
        self.replies: list[Any] = []
        self.expected = 0
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as error:
                self._fail(exceptions.ConnectionError(f"Protocol error from Redis: {error}"))
                return
            if reply is False:
                return
            waiter = self.waiter
            if waiter is None or waiter.done():
                # A reply nobody asked for: this connection's replies no longer match its calls.
                self._fail(exceptions.ConnectionError("An unexpected reply from Redis"))
                return
            self.replies.append(reply)
            if len(self.replies) == self.expected:
                waiter.set_result(self.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exceptions.ConnectionError("Connection closed by Redis" if exc is None else
                                              f"Connection to Redis lost ({type(exc).__name__})"))

    def _fail(self, error: exceptions.RedisError) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.client._forget(self)

    def send(self, payload: bytes, replies: int, timeout: float) -> tuple[asyncio.Future[list[Any]], Any]:
        """Write `payload` (that many commands) now; `wait()` on what this returns for their replies."""
        if self.closed:
            raise exceptions.ConnectionError("Connection to Redis lost")
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        self.replies, self.expected = [], replies
        assert self.transport is not None
        self.transport.write(payload)
        return waiter, loop.call_later(timeout, _time_out, waiter)

    async def wait(self, sent: tuple[asyncio.Future[list[Any]], Any]) -> list[Any]:
        """The replies (error replies as _ErrorReply) of what `send` wrote."""
        waiter, timer = sent
        try:
            return await waiter
        except BaseException:
            self.close()  # a reply still to come would answer the next call
            raise
        finally:
            timer.cancel()
            self.waiter = None

    async def call(self, payload: bytes, replies: int, timeout: float) -> list[Any]:
        return await self.wait(self.send(payload, replies, timeout))


class Script:
    """A Lua script, called as redis-py's registered scripts are: `await script(keys=[...], args=[...])`."""

    __slots__ = ("client", "source", "sha")

    def __init__(self, client: LeanRedis, source: str) -> None:
        self.client, self.source = client, source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1

    async def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Any:
        return await self._finish(self.client.execute("EVALSHA", self.sha, len(keys), *keys, *args), keys, args)

    def begin(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Coroutine[Any, Any, Any] | None:
        """The call written to Redis now, before this returns, if a connection is free (None if not: then await
        the script as usual); await what this returns for the reply. For a caller with work of its own to do
        while Redis runs the script."""
        started = self.client.begin("EVALSHA", self.sha, len(keys), *keys, *args)
        return None if started is None else self._finish(started, keys, args)

    async def _finish(self, started: Awaitable[Any], keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        try:
            return await started
        except exceptions.NoScriptError:
            # Not run (a Redis that restarted or flushed its scripts): EVAL runs it and caches it, in one trip.
            return await self.client.execute("EVAL", self.source, len(keys), *keys, *args)


class LeanRedis:
    """Connections to one Redis for this event loop (see the module's docstring)."""

    def __init__(self, url: str, *, timeout: float, pool_size: int) -> None:
        if not supports(url):
            raise ValueError("not a redis:// or rediss:// URL without options")
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        self.port = parts.port or 6379
        self.tls = parts.scheme == "rediss"
        self.timeout = timeout
        self.pool_size = max(1, pool_size)
        self.wait_for_connection = max(2.0, 4 * timeout)
        handshake: list[bytes] = []
        if parts.password is not None:
            user, password = unquote(parts.username or ""), unquote(parts.password)
            handshake.append(pack(["AUTH", user, password] if user else ["AUTH", password]))
        database = int(parts.path.strip("/") or 0)
        if database:
            handshake.append(pack(["SELECT", database]))
        self.handshake = b"".join(handshake), len(handshake)
        self.authenticates = parts.password is not None
        self.idle: list[_Connection] = []  # oldest first
        self.connections: set[_Connection] = set()  # open or opening
        self.opening = 0
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.is_closed = False

    def script(self, source: str) -> Script:
        return Script(self, source)

    async def execute(self, *args: Arg) -> Any:
        """One command's reply; an error reply raised as redis-py would."""
        return await self._start(await self._acquire(), args)

    def begin(self, *args: Arg) -> Coroutine[Any, Any, Any] | None:
        """`execute`, with the command written before this returns, on a connection that is free now; None if
        none is (nothing is written)."""
        connection = self._idle_connection(asyncio.get_running_loop().time())
        return None if connection is None else self._start(connection, args)

    def _start(self, connection: _Connection, args: tuple[Arg, ...]) -> Coroutine[Any, Any, Any]:
        """The command written on `connection` now; its reply (or error) from awaiting what this returns."""
        try:
            sent = connection.send(pack(args), 1, self.timeout)
        except BaseException:
            self._release(connection)
            raise
        return self._reply(connection, sent)

    async def _reply(self, connection: _Connection, sent: tuple[asyncio.Future[list[Any]], Any]) -> Any:
        try:
            (reply,) = await connection.wait(sent)
        finally:
            self._release(connection)
        if type(reply) is _ErrorReply:
            raise _error(str(reply))
        return reply

    def _idle_connection(self, now: float) -> _Connection | None:
        while self.idle:
            connection = self.idle.pop()
            if connection.closed:
                continue
            if now - connection.idle_since > IDLE_LIMIT:
                connection.close()
                continue
            return connection
        return None

    async def _acquire(self) -> _Connection:
        loop = asyncio.get_running_loop()
        while True:
            connection = self._idle_connection(loop.time())
            if connection is not None:
                return connection
            if len(self.connections) + self.opening < self.pool_size:
                return await self._connect()
            waiter = loop.create_future()
            self.waiting.append(waiter)
            try:
                async with asyncio.timeout(self.wait_for_connection):
                    await waiter
            except TimeoutError:
                raise exceptions.ConnectionError("No connection available.") from None
            finally:
                if waiter in self.waiting:
                    self.waiting.remove(waiter)

    async def _connect(self) -> _Connection:
        if self.is_closed:
            raise exceptions.ConnectionError("The Redis client is closed")
        loop = asyncio.get_running_loop()
        self.opening += 1
        try:
            async with asyncio.timeout(self.timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port,
                    ssl=_tls_context() if self.tls else None, server_hostname=self.host if self.tls else None,
                )
        except TimeoutError:
            raise exceptions.TimeoutError("Timeout connecting to Redis") from None
        except OSError as error:
            raise exceptions.ConnectionError(f"Could not connect to Redis ({type(error).__name__})") from error
        finally:
            self.opening -= 1
            self._wake()
        self.connections.add(connection)
        payload, count = self.handshake
        if count:
            try:
                replies = await connection.call(payload, count, self.timeout)
            except BaseException:
                connection.close()
                raise
            for index, reply in enumerate(replies):
                if type(reply) is _ErrorReply:
                    connection.close()
                    if index == 0 and self.authenticates:
                        raise exceptions.AuthenticationError(str(reply))
                    raise _error(str(reply))
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.closed:
            return
        if self.is_closed:
            connection.close()
            return
        connection.idle_since = asyncio.get_running_loop().time()
        self.idle.append(connection)
        self._wake()

    def _forget(self, connection: _Connection) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            self._wake()  # room for a new connection

    def _wake(self) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def drop_idle(self) -> None:
        """After a failed call: the idle connections are as dead as that one if Redis restarted."""
        idle, self.idle = self.idle, []
        for connection in idle:
            connection.close()

    async def aclose(self) -> None:
        self.is_closed = True
        for connection in list(self.connections):
            connection.close()
        self.idle.clear()
