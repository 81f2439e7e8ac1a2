"""Prometheus metrics, summed over every worker process of a server (prometheus-client's multiprocess mode).

Each process writes its samples to memory-mapped files in one directory per server run,
KEYWAY_METRICS_DIR/run-<process group>: uvicorn's workers share their master's process group, and a new
`make run` or service start is a new group, so a restart starts its counters from zero, as Prometheus
expects. Directories of runs that are gone are removed when a new run starts. `/metrics` (platform_site.health)
reads the whole directory, so whichever worker answers the scrape reports every worker's figures.

Labels are bounded: endpoint names, status codes, the catalog's model ids, provider names. Never a key, a
tenant or a prompt.

Recording is a few memory writes (measured in bench/hotpath_bench.py); nothing here blocks.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from django.conf import settings

# Garbage collections: a young one takes tens of microseconds; over 5 ms is a stall (bench/targets.py).
_PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _setup() -> Path:
    """Point prometheus-client at this run's directory; clear what dead runs and dead workers left."""
    from prometheus_client import multiprocess, values

    root = Path(settings.KEYWAY_METRICS_DIR)
    group = os.getpgid(0)
    directory = root / f"run-{group}"
    directory.mkdir(parents=True, exist_ok=True)
    for other in root.glob("run-*"):
        suffix = other.name.removeprefix("run-")
        if other != directory and suffix.isdigit() and not _alive(int(suffix)):
            shutil.rmtree(other, ignore_errors=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue()
    # Live gauges of workers that died without a clean shutdown would be summed forever.
    for stale in directory.glob("gauge_live*_*.db"):
        pid = stale.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                multiprocess.mark_process_dead(int(pid), str(directory))
            except PermissionError:
                pass
    return directory


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        # Nothing goes in prometheus-client's default registry: /metrics reads every worker's files
        # (exposition), and a second registration of a name there raises DuplicateTimeseries.
        counter = functools.partial(Counter, registry=None)
        gauge = functools.partial(Gauge, registry=None)
        histogram = functools.partial(Histogram, registry=None)
        self.directory = _setup()
        self.requests = counter("keyway_requests", "API requests answered, by endpoint and HTTP status.",
                                ["endpoint", "status"])
        self.latency = histogram("keyway_request_duration_seconds",
                                 "Seconds until an API response starts (a stream's headers), by endpoint.",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS)
        self.tokens = counter("keyway_tokens", "Tokens metered, by model and kind (prompt, completion).",
                              ["model", "kind"])
        self.spend = counter("keyway_spend_usd", "Spend charged to organizations, in USD, by model.", ["model"])
        self.calls = counter("keyway_calls", "Model calls settled, by model and outcome.", ["model", "outcome"])
        self.open = gauge("keyway_open", "Streams and WebSockets open now.", ["kind"], multiprocess_mode="livesum")
        self.queue = gauge("keyway_model_queue", "Generations of an embedded model running and waiting now.",
                           ["model", "state"], multiprocess_mode="livesum")
        self.upstream_errors = counter("keyway_upstream_errors",
                                       "Failed or refused upstream attempts, by provider and kind.",
                                       ["provider", "kind"])
        self.backing = gauge("keyway_backing_service_up",
                             "1 while every worker reaches the backing service (redis), 0 while any does not.",
                             ["service"], multiprocess_mode="livemin")
        self.drift = counter("keyway_counter_drift_micros",
                             "Drift between the shared billing counters and the ledger, corrected by reconciliation "
                             "(absolute micro-USD, by counter kind).", ["counter"])
        self.reconciled = counter("keyway_counter_corrections",
                                  "Shared counters corrected by reconciliation, by counter kind.", ["counter"])
        self.gc_pause = histogram("keyway_gc_pause_seconds",
                                  "CPU seconds of each garbage collection, by generation (2: a full collection).",
                                  ["generation"], buckets=_PAUSE_BUCKETS)
        self.usage_backlog = gauge("keyway_usage_stream_backlog",
                                   "Usage events in the shared stream not yet written to the ledger (the newest "
                                   "figure any worker read).", multiprocess_mode="mostrecent")
        self.usage_written = counter("keyway_usage_events_written",
                                     "Usage events this worker wrote to the ledger, by where it read them (stream: "
                                     "new, retried or claimed from a lost worker; journal).", ["source"])
        self.round_trips = counter("keyway_admission_round_trips",
                                   "Admissions that went to Redis: the others were admitted from a worker's slice "
                                   "without a round trip (billing.slices).")
        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), cached: labels() costs more than the write it prepares."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


_instance: _Metrics | None = None
_made = threading.Lock()


def metrics() -> _Metrics:
    """This process's metrics, made once: the event loop and the worker's threads (the usage writer, the
    reconciler, sync_to_async's pool) may all ask first at the same time."""
    found = _instance
    if found is None:
        found = _make()
    return found


def _make() -> _Metrics:
    global _instance
    with _made:
        if _instance is None:
            _instance = _Metrics()
        return _instance


def request_answered(endpoint: str, status: int, seconds: float) -> None:
    recorded = metrics()
    recorded.child(recorded.requests, endpoint, str(status)).inc()
    recorded.child(recorded.latency, endpoint).observe(seconds)


def usage_settled(model: str, outcome: str, prompt_tokens: int, completion_tokens: int, cost_micros: int) -> None:
    recorded = metrics()
    recorded.child(recorded.calls, model, outcome).inc()
    if prompt_tokens:
        recorded.child(recorded.tokens, model, "prompt").inc(prompt_tokens)
    if completion_tokens:
        recorded.child(recorded.tokens, model, "completion").inc(completion_tokens)
    if cost_micros:
        recorded.child(recorded.spend, model).inc(cost_micros / 1_000_000)


def admission_round_trip() -> None:
    metrics().round_trips.inc()


def open_changed(kind: str, delta: int) -> None:
    recorded = metrics()
    recorded.child(recorded.open, kind).inc(delta)


def queue_depth(model: str, running: int, waiting: int) -> None:
    recorded = metrics()
    recorded.child(recorded.queue, model, "running").set(running)
    recorded.child(recorded.queue, model, "waiting").set(waiting)


def upstream_error(provider: str, kind: str) -> None:
    recorded = metrics()
    recorded.child(recorded.upstream_errors, provider, kind).inc()


def backing_service(service: str, *, up: bool) -> None:
    recorded = metrics()
    recorded.child(recorded.backing, service).set(1 if up else 0)


def counter_corrected(kind: str, drift_micros: int) -> None:
    recorded = metrics()
    recorded.child(recorded.reconciled, kind).inc()
    recorded.child(recorded.drift, kind).inc(abs(drift_micros))


def usage_written(source: str, events: int) -> None:
    recorded = metrics()
    recorded.child(recorded.usage_written, source).inc(events)


def usage_backlog(events: int) -> None:
    metrics().usage_backlog.set(events)


def gc_paused(generation: int, seconds: float) -> None:
    recorded = metrics()
    recorded.child(recorded.gc_pause, _GENERATIONS[generation]).observe(seconds)


_GENERATIONS = ("0", "1", "2")


def exposition() -> tuple[bytes, str]:
    """Every worker's metrics of this run, in Prometheus' text format: (body, content type)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    directory = metrics().directory
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def process_ended() -> None:
    """This worker is going away: its live gauges stop counting."""
    recorded = _instance
    if recorded is not None:
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(os.getpid(), str(recorded.directory))
