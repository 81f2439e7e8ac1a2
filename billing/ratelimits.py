"""Rate limits as OpenAI reports them: the x-ratelimit-* headers and the 429 they lead to.

The counting itself is part of admission (billing.counters): one atomic step per request that also
reserves credit, so a request pays one Redis round trip for limits and quota together.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

WINDOW = 60


def duration(seconds: float) -> str:
    """Go-style durations, as OpenAI writes them: 850ms, 1s, 9.812s, 6m0s. Rounded up to the millisecond, never
    down: a client that waits exactly this long finds the window reset (a floor to whole seconds sent clients
    back up to a second early)."""
    millis = max(math.ceil(seconds * 1000 - 1e-6), 1)
    if millis < 1000:
        return f"{millis}ms"
    minutes, rest = divmod(millis, 60_000)
    text = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".") + "s"
    return f"{minutes}m{text}" if minutes else text


_DURATION = re.compile(r"^(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str) -> float:
    """Seconds in a duration as `duration` writes it (for surfaces that report limits in seconds)."""
    if text.endswith("ms"):
        return int(text[:-2]) / 1000
    match = _DURATION.match(text)
    if match is None or not text:
        raise ValueError(f"Not a duration: {text!r}")
    minutes, seconds = match.groups()
    return int(minutes or 0) * 60 + float(seconds or 0)


@dataclass(frozen=True, slots=True)
class RateState:
    limit_requests: int
    remaining_requests: int
    limit_tokens: int
    remaining_tokens: int
    reset: float

    def headers(self) -> dict[str, str]:
        reset = duration(self.reset)
        return {
            "x-ratelimit-limit-requests": str(self.limit_requests),
            "x-ratelimit-remaining-requests": str(max(self.remaining_requests, 0)),
            "x-ratelimit-reset-requests": reset,
            "x-ratelimit-limit-tokens": str(self.limit_tokens),
            "x-ratelimit-remaining-tokens": str(max(self.remaining_tokens, 0)),
            "x-ratelimit-reset-tokens": reset,
        }

    @property
    def retry_after(self) -> int:
        return max(int(self.reset + 0.999), 1)


def tighter(one: RateState, other: RateState) -> RateState:
    """Of two windows that both apply (a key's and its project's), the one with fewer requests left, and the
    one with fewer tokens left: what a client pacing itself must go by."""
    requests = one if one.remaining_requests <= other.remaining_requests else other
    tokens = one if one.remaining_tokens <= other.remaining_tokens else other
    return RateState(
        limit_requests=requests.limit_requests,
        remaining_requests=requests.remaining_requests,
        limit_tokens=tokens.limit_tokens,
        remaining_tokens=tokens.remaining_tokens,
        reset=max(one.reset, other.reset),
    )


def estimate_tokens(payload: Any) -> int:
    """A cheap estimate of a prompt's tokens before the model has counted them (~4 bytes each)."""
    return len(orjson.dumps(payload)) // 4 + 1
