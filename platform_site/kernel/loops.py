"""Resources that belong to one event loop: HTTP client sessions, Redis clients.

An aiohttp session or a redis.asyncio connection must never cross event loops, and a server process runs
one loop, so each resource is made once per loop, lazily, on first use (never at import), and made anew if
it was closed. `close_all()` closes this loop's resources, in the reverse order they were declared in; the
lifespan shutdown (and the end of a test session) calls it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

_all: list[PerLoop[object]] = []


class PerLoop(Generic[T]):
    """`get()` returns this loop's instance, made by `create()`; `close(instance)` releases it, and
    `is_closed(instance)` says whether it must be made again."""

    def __init__(
        self,
        name: str,
        create: Callable[[], T],
        close: Callable[[T], Awaitable[None]],
        is_closed: Callable[[T], bool] = lambda instance: False,
    ) -> None:
        self.name = name
        self._create = create
        self._close = close
        self._is_closed = is_closed
        self._instances: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()
        _all.append(self)  # type: ignore[arg-type]

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        instance = self._instances.get(loop)
        if instance is None or self._is_closed(instance):
            instance = self._instances[loop] = self._create()
        return instance

    def instances(self) -> list[T]:
        """Every loop's instance (for a synchronous clean-up at exit)."""
        return list(self._instances.values())

    async def close_current(self) -> None:
        instance = self._instances.pop(asyncio.get_running_loop(), None)
        if instance is not None and not self._is_closed(instance):
            await self._close(instance)


async def close_all() -> None:
    for resource in reversed(_all):
        await resource.close_current()
