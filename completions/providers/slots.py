"""Fair sharing of an embedded model between tenants: several generations at once, stepped in turn.

A model loaded in-process has a few *slots*: model instances that share the mmapped weights, each with its
own context. One thread per model steps every running generation by one token in turn, so a request that
arrives while others run starts as soon as a slot is free and then advances at the same pace as they do,
instead of waiting for all of them to finish (bench/llama_slots_bench.py measured this against one thread
per instance and against one generation at a time; the note in the module's docstring there).

Who waits, and who is told no:
- a key runs at most `per_key` generations at once and an organization `per_org`; more wait;
- when a slot frees, the waiting generation whose key, then organization, has the fewest running goes first,
  in order of arrival among equals;
- a key with `queue_per_key` generations already waiting is refused: 429 `rate_limit_exceeded`, its own
  doing; when `queue` generations wait in all, or one has waited `queue_wait` seconds, the model is
  overloaded: 503 `server_overloaded`. Both carry `Retry-After`;
- a generation running past its deadline is stopped: 504 `upstream_timeout`.

The counts are per process: each worker process holds its own copy of the model.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from completions.providers.base import ProviderBusy, UpstreamTimeout
from platform_site.kernel import metrics


class Cancelled(Exception):
    """The generation was stopped because its client went away."""


@dataclass(eq=False, slots=True)
class Job:
    """One generation. `start(instance)` returns an iterator doing one step (about one token) per `next()`;
    `finish(error)` is called exactly once, from the stepping thread, with None when it ran to its end."""

    organization: str
    key: str
    start: Callable[[Any], Iterator[Any]]
    finish: Callable[[BaseException | None], object]
    deadline: float
    cancel: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    steps: Iterator[Any] | None = None
    instance: Any = None


@dataclass(frozen=True, slots=True)
class Limits:
    per_key: int
    per_org: int
    queue: int
    queue_per_key: int
    queue_wait: float


class Slots:
    """The slots of one loaded model and the thread that steps them."""

    def __init__(self, name: str, instances: list[Any], limits: Limits) -> None:
        self.name = name
        self.limits = limits
        self._free = list(instances)
        self._waiting: list[Job] = []
        self._running: list[Job] = []
        self._by_key: dict[str, int] = {}
        self._by_org: dict[str, int] = {}
        self._cond = threading.Condition()
        self._closed = False
        # Seconds a generation has lately taken, for Retry-After (an exponential average).
        self._typical = 2.0
        self._thread = threading.Thread(target=self._run, name=f"llama-{name}", daemon=True)
        self._thread.start()

    # Called from the event loop ----------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise ProviderBusy("The model is shutting down.", retry_after=1)
            waiting_for_key = sum(1 for other in self._waiting if other.key == job.key)
            if waiting_for_key >= self.limits.queue_per_key:
                raise ProviderBusy(
                    f"Too many concurrent requests for this key on this model: {self.limits.per_key} run at "
                    f"once and {self.limits.queue_per_key} may wait. Please try again shortly.",
                    retry_after=self._retry_after(), status=429,
                )
            if len(self._waiting) >= self.limits.queue:
                raise ProviderBusy(
                    "The model is overloaded with other requests. Please try again shortly.",
                    retry_after=self._retry_after(),
                )
            self._waiting.append(job)
            # Admitted here and now when a slot is free, so that whether a key's next request waits or is
            # refused never depends on how soon the stepping thread looked.
            self._admit()
            self._cond.notify()

    def wake(self) -> None:
        """Have the stepping thread look at its queue now (a waiting job was cancelled)."""
        with self._cond:
            self._cond.notify()

    def depth(self) -> tuple[int, int]:
        """(running, waiting) now."""
        with self._cond:
            return len(self._running), len(self._waiting)

    def close(self) -> None:
        """Stop the thread after its current step; every generation ends as cancelled."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # The stepping thread -----------------------------------------------------------------------------
    def _report(self) -> None:
        """The queue's depth to the metrics (called with the lock held)."""
        metrics.queue_depth(self.name, len(self._running), len(self._waiting))

    def _retry_after(self) -> int:
        return max(1, min(60, math.ceil(self._typical)))

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    waiting, running = self._waiting, list(self._running)
                    self._waiting = []
                    break
                self._admit()
                if not self._running:
                    self._cond.wait(timeout=1.0 if self._waiting else None)
                    continue
                running = list(self._running)
            for job in running:
                self._step(job)
        for job in waiting:
            job.finish(Cancelled())
        for job in running:
            self._end(job, Cancelled())

    def _admit(self) -> None:
        """Drop waiting jobs that were cancelled or waited too long; start the fairest ones on free slots.
        Called with the lock held, on every round of steps: it does nothing more while nobody waits."""
        if not self._waiting:
            return
        now = time.monotonic()
        for job in list(self._waiting):
            if job.cancel.is_set():
                self._waiting.remove(job)
                job.finish(Cancelled())
            elif now - job.arrived > self.limits.queue_wait or now > job.deadline:
                self._waiting.remove(job)
                job.finish(ProviderBusy(
                    f"The model is overloaded: this request waited {self.limits.queue_wait:g} s for a free slot. "
                    "Please try again shortly.", retry_after=self._retry_after(),
                ))
        while self._free and self._waiting:
            eligible = [
                job for job in self._waiting
                if self._by_key.get(job.key, 0) < self.limits.per_key
                and self._by_org.get(job.organization, 0) < self.limits.per_org
            ]
            if not eligible:
                break
            job = min(eligible, key=lambda j: (self._by_key.get(j.key, 0), self._by_org.get(j.organization, 0),
                                                j.arrived))
            self._waiting.remove(job)
            job.instance = self._free.pop()
            self._by_key[job.key] = self._by_key.get(job.key, 0) + 1
            self._by_org[job.organization] = self._by_org.get(job.organization, 0) + 1
            self._running.append(job)
        self._report()

    def _step(self, job: Job) -> None:
        error: BaseException | None
        try:
            if job.cancel.is_set():
                raise Cancelled
            if time.monotonic() > job.deadline:
                raise UpstreamTimeout("The model did not finish within the deployment's time limit.")
            if job.steps is None:
                job.steps = job.start(job.instance)
            next(job.steps)
            return
        except StopIteration:
            error = None
        except BaseException as exc:  # noqa: BLE001 - handed to the job's owner, on the event loop
            error = exc
        self._end(job, error)

    def _end(self, job: Job, error: BaseException | None) -> None:
        if job.steps is not None:
            close = getattr(job.steps, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001, S110 - a generator that fails to close has nothing to add
                    pass
        with self._cond:
            self._running.remove(job)
            self._free.append(job.instance)
            for counts, owner in ((self._by_key, job.key), (self._by_org, job.organization)):
                counts[owner] -= 1
                if not counts[owner]:
                    del counts[owner]
            self._typical = 0.8 * self._typical + 0.2 * (time.monotonic() - job.arrived)
            self._report()
        job.instance = None
        job.finish(error)
