"""Sharing an embedded model's slots: who runs, who waits, who is refused. Generations here are plain step
counters, so the order is exact; the real model under two keys is in tests/e2e/test_fairness.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from completions.providers.base import ProviderBusy, UpstreamTimeout
from completions.providers.slots import Cancelled, Job, Limits, Slots

LIMITS = Limits(per_key=1, per_org=2, queue=4, queue_per_key=2, queue_wait=30.0)


class Recorder:
    """Jobs whose steps are logged as (key, step) and which end after `steps` steps."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.ended: dict[str, BaseException | None] = {}
        self.done = threading.Event()

    def job(self, name: str, *, org: str = "org", key: str | None = None, steps: int = 3,
            deadline: float = 60.0) -> Job:
        def start(instance: Any) -> Iterator[None]:
            for step in range(steps):
                time.sleep(0.001)  # about a token's work, so that deadlines can pass
                self.log.append((name, step))
                yield

        def finish(error: BaseException | None) -> None:
            self.ended[name] = error
            self.done.set()

        return Job(organization=org, key=key or name, start=start, finish=finish,
                   deadline=time.monotonic() + deadline)

    def wait_for(self, *names: str) -> None:
        until = time.monotonic() + 5
        while not all(name in self.ended for name in names):
            assert time.monotonic() < until, f"not ended: {set(names) - set(self.ended)}"
            time.sleep(0.005)


@pytest.fixture
def slots() -> Iterator[Slots]:
    made = Slots("test", ["a", "b"], LIMITS)
    yield made
    made.close()


def test_running_generations_take_turns_a_step_each(slots: Slots) -> None:
    recorder = Recorder()
    slots.submit(recorder.job("one", org="x", steps=50))
    slots.submit(recorder.job("two", org="y", steps=50))
    recorder.wait_for("one", "two")
    steps = [name for name, _ in recorder.log]
    # Stepped in turn: neither runs all its steps before the other starts.
    assert steps.index("two") < len(steps) - 3 and steps.index("one") < len(steps) - 3
    assert recorder.ended == {"one": None, "two": None}


def test_a_key_at_its_cap_waits_and_the_other_key_goes_first(slots: Slots) -> None:
    recorder = Recorder()
    slots.submit(recorder.job("a1", key="a", steps=300))
    slots.submit(recorder.job("a2", key="a", steps=2))
    slots.submit(recorder.job("b1", key="b", steps=100))
    time.sleep(0.05)
    # Key a holds one slot (its cap); b took the other although it came after a's second request.
    assert slots.depth() == (2, 1)
    recorder.wait_for("a1", "a2", "b1")
    first_of = {name: next(i for i, (n, _) in enumerate(recorder.log) if n == name) for name in ("a2", "b1")}
    assert first_of["b1"] < first_of["a2"]


def test_a_key_that_queues_too_much_gets_429_and_a_full_queue_503(slots: Slots) -> None:
    recorder = Recorder()
    slots.submit(recorder.job("a1", key="a", steps=5000))
    time.sleep(0.05)  # a1 takes a slot
    slots.submit(recorder.job("a2", key="a"))
    slots.submit(recorder.job("a3", key="a"))
    with pytest.raises(ProviderBusy) as refused:
        slots.submit(recorder.job("a4", key="a"))
    assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
    assert int(refused.value.headers["Retry-After"]) >= 1
    slots.submit(recorder.job("b1", key="b", steps=5000))
    time.sleep(0.05)  # b1 takes the other
    slots.submit(recorder.job("b2", key="b"))
    slots.submit(recorder.job("c1", key="c"))  # four wait now: a2, a3, b2 and c1
    with pytest.raises(ProviderBusy) as overloaded:
        slots.submit(recorder.job("d1", key="d"))
    assert overloaded.value.status == 503 and overloaded.value.code == "server_overloaded"


def test_a_generation_past_its_deadline_is_stopped_with_a_timeout(slots: Slots) -> None:
    recorder = Recorder()
    slots.submit(recorder.job("slow", steps=10_000, deadline=0.05))
    recorder.wait_for("slow")
    assert isinstance(recorder.ended["slow"], UpstreamTimeout)
    assert slots.depth() == (0, 0)


def test_a_cancelled_waiting_generation_leaves_the_queue(slots: Slots) -> None:
    recorder = Recorder()
    slots.submit(recorder.job("a1", key="a", steps=100))
    waiting = recorder.job("a2", key="a")
    slots.submit(waiting)
    waiting.cancel.set()
    slots.wake()
    recorder.wait_for("a1", "a2")
    assert isinstance(recorder.ended["a2"], Cancelled)
    assert all(name != "a2" for name, _ in recorder.log)


def test_waiting_too_long_is_a_503(slots: Slots) -> None:
    quick = Slots("quick", ["a"], Limits(per_key=1, per_org=1, queue=4, queue_per_key=4, queue_wait=0.1))
    try:
        recorder = Recorder()
        quick.submit(recorder.job("long", key="a", steps=10_000, deadline=0.6))
        quick.submit(recorder.job("late", key="b"))
        recorder.wait_for("late")
        late = recorder.ended["late"]
        assert isinstance(late, ProviderBusy) and late.status == 503
    finally:
        quick.close()


def test_an_error_in_a_step_ends_only_that_generation(slots: Slots) -> None:
    recorder = Recorder()

    def broken(instance: Any) -> Iterator[None]:
        yield
        raise ValueError("boom")

    ended: list[BaseException | None] = []
    slots.submit(Job(organization="o", key="k", start=broken, finish=ended.append, deadline=time.monotonic() + 5))
    slots.submit(recorder.job("fine", key="other"))
    recorder.wait_for("fine")
    time.sleep(0.05)
    assert isinstance(ended[0], ValueError) and recorder.ended["fine"] is None
    assert slots.depth() == (0, 0)
