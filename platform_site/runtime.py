"""Process-wide runtime facts reported by /status: start time, open streams and sockets, loaded models.

Lower layers cannot import the apps that own these facts, so those apps register a reporter here instead.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

STARTED_AT = time.time()
_counters: dict[str, int] = {"open_streams": 0, "open_websockets": 0}
_loaded_models_reporters: list[Callable[[], list[str]]] = []
_shutdown_hooks: list[Callable[[], Awaitable[None]]] = []
_startup_hooks: list[Callable[[], Awaitable[None]]] = []


def counter_add(name: str, delta: int) -> None:
    _counters[name] = _counters.get(name, 0) + delta


def counters() -> dict[str, int]:
    return dict(_counters)


def register_loaded_models_reporter(reporter: Callable[[], list[str]]) -> None:
    if reporter not in _loaded_models_reporters:
        _loaded_models_reporters.append(reporter)


def loaded_models() -> list[str]:
    return sorted({name for reporter in _loaded_models_reporters for name in reporter()})


def uptime_seconds() -> float:
    return round(time.time() - STARTED_AT, 3)


def register_startup_hook(hook: Callable[[], Awaitable[None]]) -> None:
    """Run `hook` when the ASGI server starts the application (lifespan.startup; uvicorn speaks it, daphne
    does not, so a hook must also be safe to skip)."""
    if hook not in _startup_hooks:
        _startup_hooks.append(hook)


async def run_startup_hooks() -> None:
    for hook in _startup_hooks:
        await hook()


def register_shutdown_hook(hook: Callable[[], Awaitable[None]]) -> None:
    """Run `hook` when the ASGI server shuts the application down (lifespan.shutdown)."""
    if hook not in _shutdown_hooks:
        _shutdown_hooks.append(hook)


async def run_shutdown_hooks() -> None:
    for hook in _shutdown_hooks:
        await hook()
