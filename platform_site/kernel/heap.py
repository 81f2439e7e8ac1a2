"""The garbage collector of a server process: the start-up heap frozen, and every collection's pause measured.

A worker's heap after start-up is about 130,000 tracked objects (Django, the apps, the URL conf, the SDKs) that
live as long as the process does. CPython's full collection walks every one of them, and freed nothing:
bench/hotpath_bench.py on PostgreSQL + Redis measured pauses of 113-157 ms, about one per 1,000 requests at
concurrency 32, which every request in flight saw as its p99. `gc.freeze()` moves what is alive into a
permanent generation that no collection walks; the oldest generation then holds a few hundred objects, and
the longest pause measured is 2-6 ms of CPU.

The heap is frozen twice: when the ASGI application has been built (every server, daphne included), and once
more at a worker's `WARM_UP_REQUESTS`th HTTP request, after the first calls of each kind have built what they
keep for good (provider clients, tokenizers, SDK types, connection pools). That second freeze is one pause,
once (10-25 ms).

The youngest generation is collected after 2,500 new container objects, not CPython's 700. At concurrency 32 a
worker holds a few thousand young objects of the requests in flight, and at 700 every young collection walked
them again: bench/hotpath_bench.py measured 56-59 young collections per 1,000 JSON requests, 16-18 µs of CPU a
request (3.5-4 %). At 2,500: 2-3 per 1,000 and 2 µs a request, with the longest young pause at 0.7-1.8 ms. At
5,000 the cost fell only 1 µs more while the longest pauses doubled (up to 3.7 ms in a stream case), too close
to the 5 ms a stall is counted from.

Each collection's pause is recorded in `keyway_gc_pause_seconds` by generation, so a stall is visible in
production, not only in a benchmark. It is the collector's CPU time, not the wall time: on a busy machine the
process is often descheduled in the middle of a collection (bench/targets.py counted 24-31 wall-time pauses
over 5 ms in 10 s at concurrency 32, on two cores shared by two workers, the load generator, the upstream,
PostgreSQL and Redis, and 0-1 in CPU time), and that wait is the machine's, not the collector's.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from platform_site.kernel import metrics

# New container objects (allocations less deallocations) between two collections of the youngest generation.
YOUNG_THRESHOLD = 2_500

# HTTP requests a worker serves before its heap is frozen the second time.
WARM_UP_REQUESTS = 500

# Pauses noted and not yet recorded: bounded, for a process that serves no HTTP request for a long time.
_MAX_PENDING = 10_000
_pending: list[tuple[int, float]] = []
_started: list[float] = [0.0]
_watching = False
_served = 0


def freeze() -> None:
    """Collect what is garbage now, then move everything alive into the permanent generation."""
    gc.collect()
    gc.freeze()


def collect_young_less_often() -> None:
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


def _pause(phase: str, info: dict[str, Any]) -> None:
    # Runs inside the collector, wherever the allocation that triggered it was: it must never raise (the
    # interrupted code could be left broken; it was, inside the compiler) and never take a lock, which the
    # interrupted code may hold (prometheus-client's does while it creates a metric: that deadlocked a test
    # process). So it only notes the pause; `request_served` hands the notes to the metrics.
    if phase == "start":
        _started[0] = time.thread_time()
    elif len(_pending) < _MAX_PENDING:
        _pending.append((info["generation"], time.thread_time() - _started[0]))


def watch_pauses() -> None:
    """Note every collection's pause from now on (once per process)."""
    global _watching
    if not _watching:
        _watching = True
        gc.callbacks.append(_pause)


def request_served() -> None:
    """Called for every HTTP request: the `WARM_UP_REQUESTS`th freezes the heap a second time (one pause,
    once), and the pauses noted since the last request go to the metrics."""
    global _served, _pending
    _served += 1
    if _served == WARM_UP_REQUESTS:
        freeze()
    if _pending:
        # A collection during the loop below notes its pause in the new list.
        noted, _pending = _pending, []
        for generation, seconds in noted:
            metrics.gc_paused(generation, seconds)
