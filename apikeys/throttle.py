"""Failed authentications are throttled per client address, in this process, without touching the database.

A key that is not in any cache costs a query to refuse (cached as unknown for 2 s only, so that a new key
works at once). An address that keeps presenting wrong keys — guessing, or a client stuck with a revoked
key — would turn each attempt into a query; past KEYWAY_AUTH_FAILURES_PER_MINUTE failures in a minute, its
requests are refused with 429 before any lookup, until the minute is over. Counted per worker process:
the bound is per worker, and needs no shared state on the path that is under attack.
"""

from __future__ import annotations

import time

from django.conf import settings

_WINDOW = 60.0
_MAX_ADDRESSES = 100_000
_failures: dict[str, tuple[float, int]] = {}


def retry_after(address: str) -> int | None:
    """Seconds until `address` may try again, or None if it may now."""
    entry = _failures.get(address)
    if entry is None:
        return None
    started, count = entry
    left = started + _WINDOW - time.monotonic()
    if left <= 0:
        del _failures[address]
        return None
    return max(int(left + 0.999), 1) if count >= settings.KEYWAY_AUTH_FAILURES_PER_MINUTE else None


def record_failure(address: str) -> None:
    now = time.monotonic()
    started, count = _failures.get(address, (now, 0))
    if now - started >= _WINDOW:
        started, count = now, 0
    if len(_failures) >= _MAX_ADDRESSES and address not in _failures:
        _failures.clear()
    _failures[address] = (started, count + 1)


def reset() -> None:
    """Forget every count (tests; registered in AppConfig.ready)."""
    _failures.clear()
