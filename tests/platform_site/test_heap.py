"""The garbage collector of a server process: the start-up heap frozen, pauses recorded, one more freeze after
warm-up. The pauses they save are measured in bench/targets.py, not here."""

from __future__ import annotations

import gc
import re

import pytest

from platform_site.kernel import heap, metrics


def gc_pauses(generation: str) -> float:
    body = metrics.exposition()[0].decode()
    match = re.search(rf'keyway_gc_pause_seconds_count{{generation="{generation}"}} (\S+)', body)
    return float(match.group(1)) if match else 0.0


def test_building_the_asgi_application_freezes_what_is_alive_and_watches_the_collector() -> None:
    import platform_site.asgi  # noqa: F401 - built as a server builds it

    assert gc.get_freeze_count() > 50_000  # Django, the apps, the URL conf: out of every collection's walk
    assert heap._pause in gc.callbacks
    assert gc.get_threshold()[0] == heap.YOUNG_THRESHOLD


def test_every_collection_is_recorded_by_generation_at_the_next_request() -> None:
    heap.watch_pauses()
    heap.request_served()
    before = gc_pauses("2"), gc_pauses("0")
    gc.collect()
    gc.collect(0)
    heap.request_served()
    assert gc_pauses("2") >= before[0] + 1 and gc_pauses("0") >= before[1] + 1


def test_the_collector_callback_only_notes_the_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """It may run inside code that holds prometheus-client's lock (creating a metric allocates): recording the
    pause there took the same lock again and deadlocked a test process."""
    recorded: list[int] = []
    monkeypatch.setattr(metrics, "gc_paused", lambda generation, seconds: recorded.append(generation))
    monkeypatch.setattr(heap, "_pending", [])
    heap._pause("start", {"generation": 1})
    heap._pause("stop", {"generation": 1})
    assert recorded == [] and len(heap._pending) == 1
    heap.request_served()
    assert 1 in recorded and heap._pending == []


def test_the_heap_is_frozen_again_once_after_the_warm_up_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    freezes: list[int] = []
    monkeypatch.setattr(heap, "freeze", lambda: freezes.append(heap._served))
    monkeypatch.setattr(heap, "_served", 0)
    for _ in range(heap.WARM_UP_REQUESTS * 3):
        heap.request_served()
    assert freezes == [heap.WARM_UP_REQUESTS]


def test_the_notes_are_bounded_when_no_request_comes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_pending", [])
    for _ in range(heap._MAX_PENDING + 10):
        heap._pause("start", {"generation": 0})
        heap._pause("stop", {"generation": 0})
    assert len(heap._pending) == heap._MAX_PENDING
