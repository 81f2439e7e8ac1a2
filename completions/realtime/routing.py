"""Which WebSocket paths exist: /v1/realtime (and /api/v1/realtime, like the REST API's alias). A socket to
any other path is refused at the handshake (HTTP 403), never left to fail."""

from __future__ import annotations

import re
from typing import Any

from completions.realtime.consumer import RealtimeConsumer

_REALTIME_PATH = re.compile(r"^/(?:api/)?v1/realtime/?$")
_realtime = RealtimeConsumer.as_asgi()


async def websocket_application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if _REALTIME_PATH.match(scope["path"]):
        await _realtime(scope, receive, send)
        return
    # Closing before accepting: the server answers the handshake with 403.
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close"})
