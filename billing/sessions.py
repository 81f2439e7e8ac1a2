"""Open realtime sessions: how many each key holds (a limit, counted across workers), and how many are open.

With Redis every session holds a lease in two sorted sets, its key's and the deployment-wide one, scored by
when the lease runs out. Opening is one atomic script: drop the key's dead leases, count what is left against
the limit, add the new one. Each worker renews the leases of its own sessions in one pipeline every
_RENEW_EVERY seconds, so a worker that dies frees its sessions' places within _LEASE seconds, and /status
counts the live leases. Without Redis (the embedded default, one process) the same is kept in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from django.conf import settings

from apikeys.auth import AuthenticatedKey
from billing.exceptions import CountersUnavailable, TooManySessions
from platform_site.kernel import breaker, process
from platform_site.kernel.loops import PerLoop

logger = logging.getLogger(__name__)

_LEASE = 30.0
_RENEW_EVERY = 10.0

_OPEN = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
return 1
"""


def _key_set(key_id: int) -> str:
    return f"{settings.KEYWAY_CACHE_PREFIX}:rt:key:{key_id}"


def _all_set() -> str:
    return f"{settings.KEYWAY_CACHE_PREFIX}:rt:open"


class _RedisSessions:
    def __init__(self) -> None:
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        timeout = settings.KEYWAY_REDIS_TIMEOUT
        # A blocking pool: a burst of sockets opening at once waits for a connection instead of failing.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.REDIS_URL, max_connections=16, timeout=max(2.0, 4 * timeout), socket_connect_timeout=timeout,
            socket_timeout=timeout, retry=Retry(NoBackoff(), 1),
        )
        self.client = redis.asyncio.Redis(connection_pool=pool)
        self.open_script = self.client.register_script(_OPEN)

    async def open(self, key_id: int, session_id: str, limit: int) -> bool:
        now = time.time()
        admitted = await self.open_script(
            keys=[_key_set(key_id), _all_set()], args=[now, now + _LEASE, limit, session_id, int(_LEASE) + 1]
        )
        return bool(int(admitted))

    async def close(self, key_id: int, session_id: str) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zrem(_key_set(key_id), session_id)
            pipe.zrem(_all_set(), session_id)
            await pipe.execute()

    async def renew(self, sessions: dict[str, int]) -> None:
        expiry = time.time() + _LEASE
        async with self.client.pipeline(transaction=False) as pipe:
            for session_id, key_id in sessions.items():
                pipe.zadd(_key_set(key_id), {session_id: expiry}, xx=True)
                pipe.expire(_key_set(key_id), int(_LEASE) + 1)
                pipe.zadd(_all_set(), {session_id: expiry}, xx=True)
            await pipe.execute()

    async def count(self) -> int:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(_all_set(), "-inf", time.time())
            pipe.zcard(_all_set())
            _, count = await pipe.execute()
        return int(count)

    async def aclose(self) -> None:
        await self.client.aclose()


async def _close_store(store: _RedisSessions) -> None:
    await store.aclose()


_stores: PerLoop[_RedisSessions] = PerLoop("realtime sessions (Redis)", _RedisSessions, _close_store)
# This process's open sessions (session id → key id): what it renews, and the whole count without Redis.
_mine: dict[str, int] = {}
_renewer: asyncio.Task[None] | None = None


def _per_key_here(key_id: int) -> int:
    return sum(1 for owner in _mine.values() if owner == key_id)


async def _renew_forever() -> None:
    while _mine:
        await asyncio.sleep(_RENEW_EVERY)
        try:
            await _stores.get().renew(dict(_mine))
        except breaker.connection_errors() as error:
            breaker.redis.failed(error)  # logged once by the breaker; renewed again when Redis answers
        except Exception:
            logger.exception("Could not renew the leases of open realtime sessions; will retry")


def _start_renewing() -> None:
    global _renewer
    loop = asyncio.get_running_loop()
    if _renewer is None or _renewer.done() or _renewer.get_loop() is not loop:
        _renewer = loop.create_task(_renew_forever())


async def session_open(*, key: AuthenticatedKey, session_id: str) -> None:
    """Take one of the key's places for an open session, or raise TooManySessions."""
    limit = settings.KEYWAY_REALTIME_SESSIONS_PER_KEY
    if settings.REDIS_URL and breaker.redis.allows():
        try:
            opened = await _stores.get().open(key.id, session_id, limit)
        except breaker.connection_errors() as error:
            breaker.redis.failed(error)
            opened = None
            # Idle connections are as dead as this one if Redis restarted: the next try opens fresh ones.
            with contextlib.suppress(Exception):
                await _stores.get().client.connection_pool.disconnect(inuse_connections=False)
        else:
            breaker.redis.succeeded()
    else:
        opened = None
    if opened is not None:
        if not opened:
            raise TooManySessions(limit)
        _mine[session_id] = key.id
        _start_renewing()
    elif settings.REDIS_URL and settings.KEYWAY_RATE_LIMITS_WITHOUT_REDIS == "closed":
        raise CountersUnavailable("rate_limits_unavailable")
    else:
        # No Redis (one process), or Redis down with limits "open": this process's own sessions are counted.
        if _per_key_here(key.id) >= limit:
            raise TooManySessions(limit)
        _mine[session_id] = key.id
    process.counter_add("open_websockets", 1)


async def session_close(*, session_id: str) -> None:
    """Give the session's place back. Safe to call for a session that never opened, and more than once."""
    key_id = _mine.pop(session_id, None)
    if key_id is None:
        return
    process.counter_add("open_websockets", -1)
    if settings.REDIS_URL and breaker.redis.allows():
        try:
            await _stores.get().close(key_id, session_id)
        except breaker.connection_errors() as error:
            breaker.redis.failed(error)  # the lease runs out by itself within _LEASE seconds
        except Exception:
            # The lease runs out by itself within _LEASE seconds.
            logger.exception("Could not release a realtime session's lease")


async def open_session_count() -> int:
    """Open realtime sessions: on every worker where there is Redis, in this process otherwise."""
    if settings.REDIS_URL:
        return await _stores.get().count()
    return len(_mine)


def reset() -> None:
    """Forget this process's sessions (tests)."""
    _mine.clear()
