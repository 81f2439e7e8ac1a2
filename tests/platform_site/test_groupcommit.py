"""Group commit: concurrent writes share one call, a lone write is not delayed, a bad row fails alone."""

from __future__ import annotations

import asyncio

import pytest

from platform_site.kernel.groupcommit import GroupCommit

# The writes run through orm(), which hands the ORM thread's connection back after each.
pytestmark = pytest.mark.django_db


async def test_writes_that_arrive_during_a_flush_share_the_next_one_and_a_bad_row_fails_alone() -> None:
    calls: list[list[int]] = []

    def write_many(rows: list[int]) -> None:
        calls.append(list(rows))
        if -1 in rows:
            raise ValueError("a row the database refuses")

    writer: GroupCommit[int] = GroupCommit("test rows", write_many)
    await writer.write(0)
    assert calls == [[0]]  # alone: written at once, by itself

    # Forty at once: one call for all of them.
    await asyncio.gather(*(writer.write(n) for n in range(1, 41)))
    assert calls[1:] == [list(range(1, 41))]

    # One bad row among them: the batch fails, each row is written alone, and only the bad one fails.
    calls.clear()
    results = await asyncio.gather(*(writer.write(n) for n in range(41, 51)), writer.write(-1),
                                   return_exceptions=True)
    assert [type(result) for result in results] == [type(None)] * 10 + [ValueError]
    assert calls[0] == [*range(41, 51), -1] and calls[1:] == [[n] for n in [*range(41, 51), -1]]


async def test_a_write_whose_request_is_cancelled_is_still_made() -> None:
    calls: list[list[int]] = []
    writer: GroupCommit[int] = GroupCommit("test rows", lambda rows: calls.append(list(rows)))
    task = asyncio.get_running_loop().create_task(writer.write(7))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0.1)
    assert calls == [[7]]
