"""Which WebSocket paths exist: /v1/realtime (and /api/v1/realtime, like the REST API's alias). A socket to
any other path is refused at the handshake (HTTP 403), never left to fail."""

from __future__ import annotations

from typing import Any

from channels.routing import URLRouter
from django.urls import re_path

from completions.realtime.consumer import RealtimeConsumer


async def refuse(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Close before accepting: the server answers the handshake with 403."""
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close"})


websocket_application = URLRouter(
    [
        re_path(r"^(?:api/)?v1/realtime/?$", RealtimeConsumer.as_asgi()),
        re_path(r"", refuse),  # type: ignore[arg-type]  # the stubs know only Django views
    ]
)
