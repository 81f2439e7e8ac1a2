"""The realtime wire: the handshake (key, dialect, subprotocol), the two dialects' event names, error events
and the rate-limit event.

A client speaks GA (`realtime`, the default and what openai-python ≥ 1.107 sends) or beta (the
`OpenAI-Beta: realtime=v1` header or the `openai-beta.realtime-v1` subprotocol). They share the client
events; the server's differ in a few names and shapes, and `Dialect` holds those differences so the rest of
the package writes each event once.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from billing.ratelimits import parse_duration
from platform_site.kernel.errors import ApiError

GA_PROTOCOL = "realtime"
BETA_PROTOCOL = "openai-beta.realtime-v1"
KEY_PROTOCOL_PREFIX = "openai-insecure-api-key."

# Close codes. A session that ends normally (idle, expired) closes with 1000; one ended by an error closes
# with 4000 + the error's HTTP status (4401 a bad or revoked key, 4403 a missing scope, 4404 an unknown
# model, 4429 too many sessions), which a client can act on without parsing the error event. Servers may
# send only 1000 and 3000-4999 (daphne refuses anything else), so RFC 6455's 1008 is not an option.
CLOSE_NORMAL = 1000


def close_code(status: int) -> int:
    return 4000 + status if 400 <= status <= 599 else 4500


@dataclass(frozen=True, slots=True)
class Handshake:
    """What the opening request says: the raw key (never logged, never echoed), the model, the dialect, and
    the subprotocol to accept with."""

    raw_key: str | None
    model: str
    beta: bool
    subprotocol: str | None
    has_call_id: bool


def read_handshake(scope: dict[str, Any]) -> Handshake:
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", ())}
    offered = [str(protocol).strip() for protocol in scope.get("subprotocols") or ()]
    raw_key: str | None = None
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        raw_key = token.strip() if scheme.lower() == "bearer" else ""
    else:
        for protocol in offered:
            if protocol.startswith(KEY_PROTOCOL_PREFIX):
                raw_key = protocol[len(KEY_PROTOCOL_PREFIX):]
                break
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    beta = BETA_PROTOCOL in offered or "realtime=v1" in headers.get("openai-beta", "").replace(" ", "").split(",")
    # A browser that offered subprotocols fails the handshake unless one is chosen; the key's is never it.
    if GA_PROTOCOL in offered:
        subprotocol: str | None = GA_PROTOCOL
    elif BETA_PROTOCOL in offered:
        subprotocol = BETA_PROTOCOL
    else:
        subprotocol = None
    return Handshake(
        raw_key=raw_key,
        model=(query.get("model") or [""])[0].strip(),
        beta=beta,
        subprotocol=subprotocol,
        has_call_id=bool(query.get("call_id")),
    )


@dataclass(frozen=True, slots=True)
class Dialect:
    """Where GA and beta differ in what the server sends."""

    beta: bool

    @property
    def text_delta(self) -> str:
        return "response.text.delta" if self.beta else "response.output_text.delta"

    @property
    def text_done(self) -> str:
        return "response.text.done" if self.beta else "response.output_text.done"

    def content_type(self, canonical: str) -> str:
        """An assistant content part's type as this dialect names it (stored in GA's names)."""
        if self.beta:
            return {"output_text": "text", "output_audio": "audio"}.get(canonical, canonical)
        return canonical


class ClientGone(Exception):
    """The client's socket is gone: a send to it failed (it hung up mid-answer, or straight after the
    handshake). Nobody is left to tell; what ran is settled as the client's disconnection."""


class RealtimeError(ApiError):
    """An error answered with an `error` event; the socket stays open."""

    code = "invalid_value"


def invalid(message: str, param: str | None, code: str = "invalid_value") -> RealtimeError:
    return RealtimeError(message, param=param, code=code)


class EventIds:
    """Server event ids: a random prefix per connection and a counter, unique without a random draw each."""

    __slots__ = ("prefix", "count")

    def __init__(self) -> None:
        self.prefix = f"event_{secrets.token_hex(6)}"
        self.count = 0

    def next(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count:x}"


def error_event(error: ApiError, *, event_id: str, client_event_id: str | None) -> dict[str, Any]:
    body = error.body()["error"]
    body["event_id"] = client_event_id
    return {"type": "error", "event_id": event_id, "error": body}


def rate_limits_event(headers: dict[str, str], *, event_id: str) -> dict[str, Any] | None:
    """`rate_limits.updated` from the x-ratelimit-* headers every engine call (and every rate or quota
    refusal after admission) carries; None where there are none (limits off)."""
    limits = []
    for name in ("requests", "tokens"):
        limit, remaining = headers.get(f"x-ratelimit-limit-{name}"), headers.get(f"x-ratelimit-remaining-{name}")
        reset = headers.get(f"x-ratelimit-reset-{name}")
        if limit is None or remaining is None or reset is None:
            continue
        limits.append(
            {"name": name, "limit": int(limit), "remaining": int(remaining), "reset_seconds": parse_duration(reset)}
        )
    if not limits:
        return None
    return {"type": "rate_limits.updated", "event_id": event_id, "rate_limits": limits}


def refusal_events(error: ApiError, *, ids: EventIds, client_event_id: str | None) -> list[dict[str, Any]]:
    """What a refused response.create gets: the error, then the limits where the refusal carries them."""
    events = [error_event(error, event_id=ids.next(), client_event_id=client_event_id)]
    limits = rate_limits_event(error.headers, event_id=ids.next())
    if limits is not None:
        events.append(limits)
    return events
