"""Process-wide state: start-up and shutdown hooks, runtime facts for /status, and what tests reset.

Nothing registers itself at import. Each app wires its hooks in its `AppConfig.ready()`, and the ASGI
lifespan (platform_site.asgi) runs them; servers without lifespan (daphne) skip the start-up hooks, so a
start-up hook must be a chore that is also done otherwise. Lower layers cannot import the apps that own
these facts, so those apps register here instead.

State that outlives a request (cached copies, in-process counters) registers a reset function with
`resettable`; `reset()` runs them all, so one test fixture makes every test start clean.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from platform_site.kernel import metrics

STARTED_AT = time.time()
_counters: dict[str, int] = {"open_streams": 0, "open_websockets": 0}
_loaded_models_reporters: list[Callable[[], list[str]]] = []
_shutdown_hooks: list[Callable[[], Awaitable[None]]] = []
_startup_hooks: list[Callable[[], Awaitable[None]]] = []
_resets: list[Callable[[], None]] = []


def counter_add(name: str, delta: int) -> None:
    _counters[name] = _counters.get(name, 0) + delta
    metrics.open_changed(name.removeprefix("open_"), delta)


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
    """Run `hook` when the ASGI server starts the application (lifespan.startup)."""
    if hook not in _startup_hooks:
        _startup_hooks.append(hook)


async def run_startup_hooks() -> None:
    for hook in _startup_hooks:
        await hook()


def register_shutdown_hook(hook: Callable[[], Awaitable[None]], *, first: bool = False) -> None:
    """Run `hook` when the ASGI server shuts the application down (lifespan.shutdown), in the order of
    registration; a hook registered `first` runs before the others (work that ends calls, which the later
    hooks then write down)."""
    if hook not in _shutdown_hooks:
        if first:
            _shutdown_hooks.insert(0, hook)
        else:
            _shutdown_hooks.append(hook)


async def run_shutdown_hooks() -> None:
    for hook in _shutdown_hooks:
        await hook()


def resettable(reset_function: Callable[[], None]) -> None:
    """Register a function that forgets some process-wide state (run between tests by `reset`)."""
    _resets.append(reset_function)


def reset() -> None:
    """Forget every cached copy and in-process counter (tests: each starts as a fresh process would)."""
    for reset_function in list(_resets):
        reset_function()
