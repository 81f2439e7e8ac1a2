"""The one place that frames Server-Sent Events: chat streams (`data:` lines, no `event:` names) and
Responses streams (`event:` + `data:`)."""

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


def event_frame(event: dict[str, Any]) -> bytes:
    """A Responses stream event: `event: <type>` and `data:` with the event, whose `type` is the same name."""
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
