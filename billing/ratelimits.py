"""Per-key rate limits: requests per minute through django-ratelimit, tokens per minute through a counter in
the same cache. With REDIS_URL that cache is Redis, so a limit holds across every worker process.

Every metered response carries OpenAI's six x-ratelimit-* headers; a refused request gets 429 with
Retry-After. Requests are counted when they arrive; tokens (input + output) when the answer is known, with
the prompt estimated up front so one request cannot overshoot the token budget by much.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache, caches
from django.core.cache.backends.locmem import LocMemCache
from django.http import HttpRequest
from django_ratelimit.core import get_usage

from apikeys.auth import AuthenticatedKey
from billing.exceptions import RateLimitExceeded

_GROUP = "keyway.rpm"
_WINDOW = 60


def _duration(seconds: float) -> str:
    """Go-style durations, as OpenAI writes them: 850ms, 1s, 6m0s."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 1)}ms"
    whole = int(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


@dataclass(frozen=True, slots=True)
class RateState:
    limit_requests: int
    remaining_requests: int
    reset_requests: float
    limit_tokens: int
    remaining_tokens: int
    reset_tokens: float

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self.limit_requests),
            "x-ratelimit-remaining-requests": str(max(self.remaining_requests, 0)),
            "x-ratelimit-reset-requests": _duration(self.reset_requests),
            "x-ratelimit-limit-tokens": str(self.limit_tokens),
            "x-ratelimit-remaining-tokens": str(max(self.remaining_tokens, 0)),
            "x-ratelimit-reset-tokens": _duration(self.reset_tokens),
        }


def _tokens_key(public_id: str, now: float) -> str:
    return f"tpm:{public_id}:{int(now) // _WINDOW}"


def _check(request: HttpRequest, key: AuthenticatedKey, estimated_tokens: int) -> RateState:
    rpm = key.rpm_limit or settings.KEYWAY_DEFAULT_RPM
    tpm = key.tpm_limit or settings.KEYWAY_DEFAULT_TPM
    usage = get_usage(
        request, group=_GROUP, key=lambda group, req: key.public_id, rate=f"{rpm}/m", increment=True
    ) or {"count": 0, "time_left": _WINDOW, "should_limit": False}
    now = time.time()
    used_tokens = int(cache.get(_tokens_key(key.public_id, now)) or 0)
    state = RateState(
        limit_requests=rpm,
        remaining_requests=rpm - usage["count"],
        reset_requests=max(float(usage["time_left"]), 0.001),
        limit_tokens=tpm,
        remaining_tokens=tpm - used_tokens,
        reset_tokens=_WINDOW - now % _WINDOW,
    )
    if usage["should_limit"]:
        raise RateLimitExceeded(kind="requests", limit=rpm, retry_after=max(int(usage["time_left"]), 1),
                                headers=state.headers())
    if used_tokens + estimated_tokens > tpm:
        raise RateLimitExceeded(kind="tokens", limit=tpm, retry_after=max(int(state.reset_tokens), 1),
                                headers=state.headers())
    return state


def _record(public_id: str, tokens: int) -> None:
    counter = _tokens_key(public_id, time.time())
    cache.add(counter, 0, timeout=_WINDOW * 2)
    cache.incr(counter, tokens)


def _in_process() -> bool:
    return isinstance(caches["default"], LocMemCache)


async def check_rate_limits(
    request: HttpRequest, key: AuthenticatedKey, estimated_tokens: int
) -> RateState | None:
    """Count this request and refuse it (RateLimitExceeded) if the key is over either limit; None when
    limiting is turned off."""
    if not settings.KEYWAY_RATE_LIMITS:
        return None
    if _in_process():
        # The in-process cache does no I/O: calling it on the event loop is cheaper than a thread hop.
        return _check(request, key, estimated_tokens)
    return await sync_to_async(_check, thread_sensitive=False)(request, key, estimated_tokens)


async def record_tokens(key: AuthenticatedKey, tokens: int) -> None:
    if tokens <= 0:
        return
    if _in_process():
        _record(key.public_id, tokens)
    else:
        await sync_to_async(_record, thread_sensitive=False)(key.public_id, tokens)


def estimate_tokens(payload: Any) -> int:
    """A cheap upper-ish estimate of the prompt's tokens before the model has counted them (~4 bytes each)."""
    import orjson

    return len(orjson.dumps(payload)) // 4 + 1


_pending: set[asyncio.Task[None]] = set()


def record_tokens_later(key: AuthenticatedKey, tokens: int) -> None:
    """Count tokens without making the response wait for the cache."""
    if not settings.KEYWAY_RATE_LIMITS or tokens <= 0:
        return
    task = asyncio.get_running_loop().create_task(record_tokens(key, tokens))
    _pending.add(task)
    task.add_done_callback(_pending.discard)
