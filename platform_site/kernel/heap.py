"""The garbage collector of a server process: the start-up heap frozen, and every collection's pause measured.

A worker's heap after start-up is about 130,000 tracked objects (Django, the apps, the URL conf, the SDKs) that
live as long as the process does. CPython's full collection walks every one of them: 55-78 ms on this machine,
run by a busy worker about every 2,200 requests, and it freed nothing. Every request in flight saw that pause as
its p99. `gc.freeze()` moves what is alive into a permanent generation that no collection walks; a full
collection then walks only what requests left behind (a few ms at most). Figures: bench/targets.py.

The heap is frozen twice: when the ASGI application has been built (every server, daphne included), and once
after the first requests (`warmed_up`), which import and build what the first call of each kind needs (the
providers' clients, tokenizers, SDK types) and would otherwise stay in the collected generations for good.

Each collection's pause is recorded in `keyway_gc_pause_seconds` by generation, so a stall is visible in
production, not only in a benchmark. It is the collector's CPU time, not the wall time: on a busy machine the
process is often descheduled in the middle of a collection (the bench's two cores, shared by two workers, the
load generator, the upstream, PostgreSQL and Redis, made a third of the wall-time pauses over 5 ms while none
took 5 ms of CPU), and that wait is the machine's, not the collector's.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from platform_site.kernel import metrics

# Requests a worker serves before its heap is frozen the second time: by then the first call of every common
# kind has built what it keeps (measured: the heap grows by ~30,000 objects over the first requests, then
# stays flat).
WARM_UP_REQUESTS = 500

_started: list[float] = [0.0]
_watching = False
_served = 0


def freeze() -> None:
    """Collect what is garbage now, then move everything alive into the permanent generation."""
    gc.collect()
    gc.freeze()


def _pause(phase: str, info: dict[str, Any]) -> None:
    # Runs inside the collector, wherever the allocation that triggered it was (even inside the compiler): it
    # must never raise, or the interrupted code can be left in a broken state.
    if phase == "start":
        _started[0] = time.thread_time()
        return
    try:
        metrics.gc_paused(info["generation"], time.thread_time() - _started[0])
    except Exception:  # noqa: S110 - nothing can be reported from inside a collection
        pass


def watch_pauses() -> None:
    """Record every collection's pause from now on (once per process)."""
    global _watching
    if not _watching:
        _watching = True
        # Built now, not inside a collection's callback, where building it would allocate and could meet
        # itself half-built.
        metrics.metrics()
        gc.callbacks.append(_pause)


def request_served() -> None:
    """Count a served request; the `WARM_UP_REQUESTS`th freezes the heap a second time (one pause, once)."""
    global _served
    _served += 1
    if _served == WARM_UP_REQUESTS:
        freeze()
