"""billing.lean_redis, the client of billing's scripts: against this machine's Redis (scripts, their errors,
a flushed script cache, a password, a database), and against servers on loopback scripted to answer wrongly,
late, or not at all."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from django.test import override_settings
from redis import exceptions

from billing import connections, lean_redis
from billing.lean_redis import LeanRedis

HOST = "127.0.0.1:6379"
COUNT = "return {redis.call('INCRBY', KEYS[1], ARGV[1]), #KEYS, ARGV[2]}"


@pytest.fixture
async def redis_probe() -> AsyncIterator[Any]:
    import redis.asyncio

    probe = redis.asyncio.Redis.from_url(f"redis://{HOST}/14")
    try:
        await probe.ping()
    except Exception:  # noqa: BLE001
        pytest.skip(f"no Redis on {HOST}")
    yield probe
    await probe.aclose()


@pytest.fixture
async def lean() -> AsyncIterator[Callable[..., LeanRedis]]:
    made: list[LeanRedis] = []

    def make(url: str = f"redis://{HOST}/14", *, timeout: float = 2.0, pool_size: int = 4) -> LeanRedis:
        client = LeanRedis(url, timeout=timeout, pool_size=pool_size)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


async def test_a_script_runs_and_answers_as_redis_py_would(redis_probe: Any, lean: Callable[..., LeanRedis]) -> None:
    name = f"lean-{uuid.uuid4().hex}"
    client = lean()
    script = client.script(COUNT)
    assert await script(keys=[name, "other"], args=[5, b"\x00bytes\xff"]) == [5, 2, b"\x00bytes\xff"]
    assert await script(keys=[name], args=[-2, "é"]) == [3, 1, "é".encode()]
    # The same script through redis-py answers the same, on the same counter, in database 14.
    assert await redis_probe.register_script(COUNT)(keys=[name], args=[1, "x"]) == [4, 1, b"x"]
    assert int(await redis_probe.get(name)) == 4
    # One connection did it all, kept between calls.
    assert len(client.connections) == 1
    await redis_probe.delete(name)


async def test_a_flushed_script_cache_costs_one_round_trip_and_runs_once(
    redis_probe: Any, lean: Callable[..., LeanRedis]
) -> None:
    name = f"lean-{uuid.uuid4().hex}"
    script = lean().script(COUNT)
    await redis_probe.script_flush()
    assert await script(keys=[name], args=[7, ""]) == [7, 1, b""]  # NOSCRIPT, then EVAL: run once
    assert await redis_probe.script_exists(script.sha) == [True]  # and cached again
    assert await script(keys=[name], args=[1, ""]) == [8, 1, b""]
    await redis_probe.delete(name)


async def test_error_replies_raise_redis_pys_exceptions_and_keep_the_connection(
    redis_probe: Any, lean: Callable[..., LeanRedis]
) -> None:
    client = lean()
    with pytest.raises(exceptions.ResponseError, match="no good"):
        await client.script("return redis.error_reply('no good')")()
    with pytest.raises(exceptions.ResponseError):
        await client.script("this is not lua")()
    with pytest.raises(exceptions.DataError):
        await client.script(COUNT)(keys=["a"], args=[None])  # type: ignore[list-item]
    with pytest.raises(exceptions.DataError):
        await client.script(COUNT)(keys=["a"], args=[True])
    assert await client.script("return 1")() == 1
    assert len(client.connections) == 1


async def test_a_password_and_a_database_from_the_url(redis_probe: Any, lean: Callable[..., LeanRedis]) -> None:
    user, password = f"lean-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await redis_probe.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all"])
    name = f"lean-{uuid.uuid4().hex}"
    try:
        client = lean(f"redis://{user}:{password}@{HOST}/13")
        assert await client.script("return redis.call('SET', KEYS[1], 'here')")(keys=[name]) == b"OK"
        assert await redis_probe.get(name) is None  # database 14 does not have it
        other = redis_probe.client()
        await other.select(13)
        assert await other.get(name) == b"here"
        await other.delete(name)
        with pytest.raises(exceptions.AuthenticationError):
            await lean(f"redis://{user}:wrong@{HOST}/13").script("return 1")()
        with pytest.raises(exceptions.AuthenticationError):
            await lean(f"redis://:wrong@{HOST}/13").script("return 1")()  # the default user has no password
    finally:
        await redis_probe.acl_deluser(user)


def test_which_urls_it_takes_and_which_it_leaves_to_redis_py() -> None:
    for url in ("redis://localhost", "redis://h:6380/3", "rediss://u:p@h/0", "redis://:p@h:1/"):
        assert lean_redis.supports(url), url
    for url in ("unix:///tmp/redis.sock", "redis://h/0?ssl_cert_reqs=none", "redis://h/db", "http://h/", "redis://"):
        assert not lean_redis.supports(url), url
    # (Overridden here, not with the `settings` fixture: the test hook that writes usage runs before it restores.)
    with override_settings(KEYWAY_BILLING_REDIS_URL="redis://h/0?socket_keepalive=1"):
        assert connections.scripts_client(timeout=1, pool_size=1) is None
    with override_settings(KEYWAY_BILLING_REDIS_URL="redis://h:1/2"):
        assert isinstance(connections.scripts_client(timeout=1, pool_size=1), LeanRedis)
    with override_settings(KEYWAY_BILLING_REDIS_URL="redis://h:1/0", KEYWAY_BILLING_REDIS_CLUSTER=True):
        assert connections.scripts_client(timeout=1, pool_size=1) is None


Answerer = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


class FakeRedis:
    """A server on loopback that reads commands and lets `answer` reply to each (with the raw command)."""

    def __init__(self, answer: Answerer) -> None:
        self.answer = answer
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.closed_by_client = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                count = int((await reader.readline()).strip()[1:] or 0)
                if not count:
                    self.closed_by_client += 1
                    break
                command = b""
                for _ in range(count):
                    length = int((await reader.readline()).strip()[1:])
                    command += (await reader.readexactly(length + 2))[:-2] + b" "
                await self.answer(command, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client += 1
        finally:
            self.open -= 1
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def fake() -> AsyncIterator[Callable[[Answerer], Awaitable[tuple[FakeRedis, str]]]]:
    servers: list[FakeRedis] = []

    async def start(answer: Answerer) -> tuple[FakeRedis, str]:
        server = FakeRedis(answer)
        servers.append(server)
        return server, await server.start()

    yield start
    for server in servers:
        await server.stop()


def replying(data: bytes, delay: float = 0.0) -> Answerer:
    async def answer(command: bytes, writer: asyncio.StreamWriter) -> None:
        if delay:
            await asyncio.sleep(delay)
        writer.write(data)
        await writer.drain()

    return answer


async def test_a_reply_in_pieces_and_several_calls_on_one_connection(fake: Any, lean: Callable[..., LeanRedis]) -> None:
    async def in_pieces(command: bytes, writer: asyncio.StreamWriter) -> None:
        for piece in (b"*2\r\n:1", b"2\r\n$3\r", b"\nabc\r", b"\n"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.005)

    server, url = await fake(in_pieces)
    script = lean(url).script("return 1")
    assert [await script(keys=["k"], args=[1]) for _ in range(3)] == [[12, b"abc"]] * 3
    assert server.connections == 1


async def test_a_silent_server_times_out_and_its_connection_is_closed(
    fake: Any, lean: Callable[..., LeanRedis]
) -> None:
    async def silent(command: bytes, writer: asyncio.StreamWriter) -> None:
        pass

    server, url = await fake(silent)
    client = lean(url, timeout=0.1)
    with pytest.raises(exceptions.TimeoutError):
        await client.script("return 1")()
    await asyncio.sleep(0.05)
    assert server.closed_by_client == 1 and not client.connections and not client.idle


async def test_a_cancelled_call_closes_its_connection(fake: Any, lean: Callable[..., LeanRedis]) -> None:
    server, url = await fake(replying(b":1\r\n", delay=0.2))
    client = lean(url)
    call = asyncio.ensure_future(client.script("return 1")())
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert not client.connections
    # The next call does not read the late reply meant for the cancelled one: it has a connection of its own.
    assert await client.script("return 1")() == 1
    assert server.connections == 2
    await asyncio.sleep(0.1)
    assert server.closed_by_client == 1  # the server saw the first connection end, once it had answered


@pytest.mark.parametrize("reply", [b"@garbage\r\n", b":1\r\n:2\r\n"], ids=["garbage", "one-reply-too-many"])
async def test_a_broken_reply_fails_the_call_and_drops_the_connection(
    fake: Any, lean: Callable[..., LeanRedis], reply: bytes
) -> None:
    async def broken(command: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(reply[:4])
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(reply[4:])

    server, url = await fake(broken)
    client = lean(url)
    if reply.count(b"\r\n") == 2:
        assert await client.script("return 1")() == 1  # the first reply answers; the extra one kills the connection
        await asyncio.sleep(0.05)
    else:
        with pytest.raises(exceptions.ConnectionError, match="Protocol error"):
            await client.script("return 1")()
    assert not client.connections


async def test_a_server_that_hangs_up_mid_call(fake: Any, lean: Callable[..., LeanRedis]) -> None:
    async def hang_up(command: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"*2\r\n:1")
        writer.close()

    _, url = await fake(hang_up)
    client = lean(url)
    with pytest.raises(exceptions.ConnectionError, match="closed"):
        await client.script("return 1")()
    assert not client.connections


async def test_connection_refused_is_a_connection_error(lean: Callable[..., LeanRedis]) -> None:
    from platform_site.kernel import breaker

    server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(exceptions.ConnectionError) as raised:
        await lean(f"redis://127.0.0.1:{port}").script("return 1")()
    assert isinstance(raised.value, breaker.connection_errors())


async def test_the_pool_bounds_connections_and_a_call_waits_for_one(fake: Any, lean: Callable[..., LeanRedis]) -> None:
    server, url = await fake(replying(b":1\r\n", delay=0.05))
    client = lean(url, pool_size=2)
    script = client.script("return 1")
    assert await asyncio.gather(*(script() for _ in range(10))) == [1] * 10
    assert server.connections == 2 and server.most_open == 2
    # Past the wait, no connection: a ConnectionError, as redis-py's blocking pool raises.
    client.wait_for_connection = 0.01
    calls = [asyncio.ensure_future(script()) for _ in range(3)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results.count(1) == 2
    assert [type(result) for result in results if result != 1] == [exceptions.ConnectionError]


async def test_a_connection_idle_too_long_is_replaced(
    fake: Any, lean: Callable[..., LeanRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, url = await fake(replying(b":1\r\n"))
    client = lean(url)
    script = client.script("return 1")
    await script()
    await script()
    assert server.connections == 1
    monkeypatch.setattr(lean_redis, "IDLE_LIMIT", 0.0)
    await asyncio.sleep(0.01)
    await script()
    await asyncio.sleep(0.05)
    assert server.connections == 2 and server.closed_by_client == 1
    await client.drop_idle()
    await asyncio.sleep(0.05)
    assert server.closed_by_client == 2 and not client.connections
