"""Per-process copies of slow-changing data for the hot path: one single-flight TTL cache.

Keys, account terms, prices and the model catalog change rarely and are read by every request. Each is
kept here for a few seconds, and when a copy expires, every request that sees it at that moment shares one
load instead of queueing identical queries (measured for keys: p99 408 ms → 68 ms at concurrency 32).

- A copy is timestamped with the start of its load, so it never counts as fresher than it is.
- `invalidate()` drops copies at once, and a load that was already under way when it was called is not
  kept: it may hold exactly what the invalidation meant to replace.
- A copy that has lived 3/4 of its TTL and is read again is reloaded in the background while it goes on being
  served, until it expires. A steadily read copy is so replaced before it expires, and no request waits for
  its load: each such wait was a pause on the hot path, once per TTL (the loads of an organization's terms,
  prices and limits every second: 8-13 ms for one request at concurrency 1, bench/targets.py's p99.9).
  A copy is still never served past its TTL, so the TTL still bounds how long a change takes to be seen.
- With `stale_while_revalidate`, an expired copy keeps being served while its replacement loads in the
  background, so no request waits on the database except the very first of a process.
- A reload that nobody waits for (the two above) starts _BACKGROUND_DELAY after it is asked for, or at once if
  a request comes to need it meanwhile. Loads run one at a time in the ORM thread, and the request that found
  a copy stale goes on to load the others it needs there: a background reload started at once went ahead of
  them. After a quiet spell every copy has expired, and the catalog's reload (two queries, 2.6-4.4 ms then)
  delayed the terms, limits and prices the request waited for (bench/targets.py's sparse row: 11.9 → 8.4 ms).
  A delayed reload that an invalidation overtook before its turn, and that nobody waits for, is dropped.
- With `stale_if_error`, a load that fails because the database is unreachable (PostgreSQL restarting) is
  answered with the expired copy, if there is one: the requests that need nothing else go on being served.
- Loads are synchronous ORM functions, run through `orm()`.
- `prefetch()` starts the loads of several caches' copies that a request is about to read, one after another,
  in one ORM visit: one thread hand-off and one connection checkout (with its health check round trip) for
  them all, where each load paid its own. After a quiet spell, an organization's terms, its project's limits
  and the prices are all due at once: two checkouts fewer (bench/targets.py's sparse row, two pairs of runs: p50
  11.3 → 9.3 and 8.4 → 6.6 ms; the machine moved more than that between the pairs).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

from django.db import InterfaceError, OperationalError

from platform_site.kernel.orm import orm

K = TypeVar("K")
V = TypeVar("V")

logger = logging.getLogger(__name__)


# The share of its TTL after which a copy that is read is reloaded in the background.
_REFRESH_AFTER = 0.75
# How long a background reload lets the loads that requests wait for go first (the module says why).
_BACKGROUND_DELAY = 0.02


class _Failed:
    """What a load of `prefetch`'s batch raised, handed to the request that waits for that copy."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _load_each(loads: list[tuple[Callable[[Any], Any], Any]]) -> list[Any]:
    """Every load in turn, in one ORM visit; one that raises does not stop the others."""
    outcomes: list[Any] = []
    for load, key in loads:
        try:
            outcomes.append(load(key))
        except Exception as error:  # noqa: BLE001 - re-raised to the request that waits for this copy
            outcomes.append(_Failed(error))
    return outcomes


def prefetch(*wanted: tuple[SingleFlight[Any, Any], Any]) -> None:
    """Start, in one ORM visit, the loads of those of `wanted` (cache, key) copies that `get` would have to
    load and wait for: missing or expired, with no load under way (a stale-while-revalidate copy is served
    stale meanwhile, so it is not one of them). The `get` calls that follow join these loads as they would
    join any other. Nothing is started unless two or more are due."""
    now = time.monotonic()
    due = [(cache, key) for cache, key in wanted if cache._due(key, now)]
    if len(due) < 2:
        return
    together = asyncio.get_running_loop().create_task(orm(_load_each, [(cache._load, key) for cache, key in due]))
    for index, (cache, key) in enumerate(due):
        cache._adopt(key, now, together, index)


class _Superseded(Exception):
    """A delayed background reload that an invalidation overtook before its turn, with nobody waiting for it."""


class SingleFlight(Generic[K, V]):
    # Every cache of the process, so that one call forgets them all (tests; wired in AppConfig.ready).
    _instances: weakref.WeakSet[SingleFlight[Any, Any]] = weakref.WeakSet()

    def __init__(
        self,
        load: Callable[[K], V],
        *,
        ttl: Callable[[], float],
        stale_while_revalidate: bool = False,
        stale_if_error: bool = False,
        max_entries: int = 100_000,
    ) -> None:
        self._load = load
        self._ttl = ttl
        self._stale_while_revalidate = stale_while_revalidate
        self._stale_if_error = stale_if_error
        self._max_entries = max_entries
        self._copies: dict[K, tuple[float, V]] = {}
        self._inflight: dict[K, asyncio.Task[V]] = {}
        # The turns of background reloads still waiting to start: True when a request came to need one.
        self._waiting: dict[K, asyncio.Future[bool]] = {}
        self._generation = 0
        SingleFlight._instances.add(self)

    async def get(self, key: K) -> V:
        hit = self._copies.get(key)
        if hit is not None:
            # The hot path: one dict lookup, one clock read.
            now = time.monotonic()
            age, ttl = now - hit[0], self._ttl()
            if age < ttl:
                if age >= ttl * _REFRESH_AFTER and key not in self._inflight:
                    self._start(key, now, background=True)  # replaced before it expires; served meanwhile
                return hit[1]
        for attempt in range(3):
            now = time.monotonic()
            hit = self._copies.get(key)
            if hit is not None and now - hit[0] < self._ttl():
                return hit[1]
            generation = self._generation
            stale = hit is not None and self._stale_while_revalidate
            pending = self._start(key, now, background=stale)
            if stale and hit is not None:
                return hit[1]
            try:
                value = await asyncio.shield(pending)
            except _Superseded:
                # A delayed reload whose turn had come but not yet begun when this request joined it, and that an
                # invalidation then overtook: load anew, as below.
                if attempt < 2:
                    continue
                return await orm(self._load, key)
            except (OperationalError, InterfaceError):
                if hit is None or not self._stale_if_error:
                    raise
                return hit[1]
            if generation == self._generation or attempt == 2:
                return value
            # Invalidated while loading: what was loaded may be what the invalidation replaced; load again
            # (a few times at most, so a storm of invalidations cannot hold a request forever).
        raise AssertionError("unreachable")

    def _start(self, key: K, now: float, *, background: bool = False) -> asyncio.Task[V]:
        loop = asyncio.get_running_loop()
        pending = self._inflight.get(key)
        generation = self._generation
        if pending is None or pending.get_loop() is not loop:
            if background:
                turn: asyncio.Future[bool] = loop.create_future()
                self._waiting[key] = turn
                loop.call_later(_BACKGROUND_DELAY, self._take_turn, key, turn, False)
                pending = loop.create_task(self._load_in_turn(key, turn, generation))
            else:
                pending = loop.create_task(orm(self._load, key))
            self._track(key, now, generation, pending)
        elif not background:
            waiting = self._waiting.get(key)
            if waiting is not None:
                self._take_turn(key, waiting, True)  # a request waits for it now: no more delay
        return pending

    def _due(self, key: K, now: float) -> bool:
        hit = self._copies.get(key)
        if hit is not None and (self._stale_while_revalidate or now - hit[0] < self._ttl()):
            return False
        return key not in self._inflight

    def _adopt(self, key: K, now: float, together: asyncio.Task[list[Any]], index: int) -> None:
        """Make this copy's load the `index`th of a prefetched batch."""
        pending = asyncio.get_running_loop().create_task(self._one_of(together, index))
        self._track(key, now, self._generation, pending)

    def _track(self, key: K, now: float, generation: int, pending: asyncio.Task[V]) -> None:
        """`pending` is this copy's load under way: joined by whoever needs it, kept when it ends (_remember)."""
        self._inflight[key] = pending
        pending.add_done_callback(lambda done: self._remember(key, now, generation, done))

    @staticmethod
    async def _one_of(together: asyncio.Task[list[Any]], index: int) -> V:
        outcome = (await asyncio.shield(together))[index]
        if isinstance(outcome, _Failed):
            raise outcome.error
        return cast(V, outcome)

    def _take_turn(self, key: K, turn: asyncio.Future[bool], needed: bool) -> None:
        if self._waiting.get(key) is turn:
            del self._waiting[key]
        if not turn.done():
            turn.set_result(needed)

    async def _load_in_turn(self, key: K, turn: asyncio.Future[bool], generation: int) -> V:
        needed = await turn
        if not needed and generation != self._generation:
            raise _Superseded  # what it would load is dropped anyway (_remember); spare the database
        return await orm(self._load, key)

    def _remember(self, key: K, fetched_at: float, generation: int, done: asyncio.Task[V]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]
        if done.cancelled():
            return
        error = done.exception()
        if isinstance(error, _Superseded):
            return
        if error is not None:
            if isinstance(error, OperationalError | InterfaceError):
                return  # the database is down: the breaker said so, once (platform_site.kernel.breaker)
            if self._stale_while_revalidate or key in self._copies:
                # A background reload nobody awaits: say it failed (the copy at hand goes on serving until it
                # expires; the next read after that loads it again, and waits).
                logger.error("Reloading a cached copy failed", exc_info=error)
            return
        if generation != self._generation:
            return
        if len(self._copies) >= self._max_entries:
            self._copies.clear()
        self._copies[key] = (fetched_at, done.result())

    @classmethod
    def invalidate_all(cls) -> None:
        for cache in list(cls._instances):
            cache.invalidate()

    def invalidate(self, key: K | None = None) -> None:
        """Forget one copy (or all): the next `get` loads it anew."""
        self._generation += 1
        if key is None:
            self._copies.clear()
            self._inflight.clear()
            self._waiting.clear()
        else:
            self._copies.pop(key, None)
            self._inflight.pop(key, None)
            self._waiting.pop(key, None)
