"""The one place that frames Server-Sent Events for chat streams (`data: <json>` lines, no `event:` names)."""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CONTENT_TYPE = "text/event-stream"


def frame(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_frame(body: dict[str, Any]) -> bytes:
    """An error after the first byte: the SDKs raise APIError for any data object with an `error` key."""
    return frame(body)
