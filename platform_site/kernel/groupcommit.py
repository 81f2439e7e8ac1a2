"""Group commit: concurrent requests that must each see their row written before they answer share one write.

    writer = GroupCommit("stored responses", write_many)   # write_many(rows): one transaction, synchronous
    await writer.write(row)                                # returns once `row` is committed (or raises)

Each write from the async API path costs a hop to the ORM thread and a round trip to the database, and a
worker has one ORM thread: under load, requests queue for it one by one. Here a write that finds a flush
under way waits for the next one, which takes everything that arrived meanwhile in one `write_many` call.
Nothing waits for a timer, so a lone request is written at once; under load the hop and the round trip are
shared by every request of a batch. If a batch fails, its rows are written one at a time, so that one bad
row fails only its own request.

One writer per event loop (a server process runs one; tests run one per test).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from platform_site.kernel.loops import PerLoop
from platform_site.kernel.orm import orm

T = TypeVar("T")


class _Batcher(Generic[T]):
    def __init__(self, write_many: Callable[[list[T]], None], max_batch: int) -> None:
        self.write_many = write_many
        self.max_batch = max_batch
        self.pending: list[tuple[T, asyncio.Future[None]]] = []
        self.flushing = False
        self.task: asyncio.Task[None] | None = None

    async def write(self, row: T) -> None:
        done = asyncio.get_running_loop().create_future()
        self.pending.append((row, done))
        if not self.flushing:
            self.flushing = True
            self.task = asyncio.get_running_loop().create_task(self._flush())
        await done

    async def _flush(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
                await self._write(batch)
        finally:
            self.flushing = False

    async def _write(self, batch: list[tuple[T, asyncio.Future[None]]]) -> None:
        try:
            await orm(self.write_many, [row for row, _ in batch])
        except Exception as exc:  # noqa: BLE001 - each row is retried alone, and fails alone
            if len(batch) == 1:
                _settle(batch[0][1], exc)
                return
            for row, done in batch:
                try:
                    await orm(self.write_many, [row])
                except Exception as alone:  # noqa: BLE001 - handed to the request that wrote it
                    _settle(done, alone)
                else:
                    _settle(done, None)
            return
        for _, done in batch:
            _settle(done, None)


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():
        return  # its request was cancelled; the row is written all the same
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


class GroupCommit(Generic[T]):
    def __init__(self, name: str, write_many: Callable[[list[T]], None], *, max_batch: int = 256) -> None:
        self._batchers: PerLoop[_Batcher[T]] = PerLoop(name, lambda: _Batcher(write_many, max_batch), _drain)

    async def write(self, row: T) -> None:
        await self._batchers.get().write(row)


async def _drain(batcher: _Batcher[T]) -> None:
    while batcher.flushing:
        await asyncio.sleep(0.01)
