"""A realtime session relayed to an upstream realtime provider (audio models): Keyway's key, limits and
metering in front, the upstream's own events passed through.

Frames go through as they came, both ways; only these are looked at:
- the client's `response.create` is admitted first (rate limits, a reservation at the worst case), and a
  refused one never reaches the upstream: the client gets an `error` event and `rate_limits.updated`;
- the upstream's `response.created` binds the admitted turn to its response (a response the upstream starts
  by itself, on server VAD, is admitted then, and cancelled upstream if refused);
- the upstream's `response.done` settles the turn from the usage it reports, once;
- the upstream's `session.*` events name Keyway's model and session id (the one its usage events carry),
  and its `rate_limits.updated` (the gateway's own account limits, not the client's) is replaced by the
  client's limits;
- the upstream's socket closing or failing ends the session with an `error` event.
A client that leaves has its open responses cancelled upstream; their usage is awaited briefly, so what was
produced is charged as reported, and estimated only if the upstream stays silent.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from billing.metering import Status
from completions.engine import calls
from completions.engine.catalog import CatalogEntry, DeploymentEntry
from completions.realtime.protocol import EventIds, invalid, rate_limits_event, refusal_events
from platform_site.kernel.errors import ApiError, to_api_error
from platform_site.middleware import new_request_id

logger = logging.getLogger(__name__)

SendText = Callable[[str], Awaitable[None]]
# The longest a leaving client's cancelled responses are waited for, to charge them from reported usage.
_DRAIN_SECONDS = 2.0
# OpenAI's cap on a realtime response's output.
_MAX_OUTPUT = 4096
_STATUS = {"completed": Status.OK, "incomplete": Status.OK, "cancelled": Status.CLIENT_DISCONNECTED,
           "failed": Status.INCOMPLETE}


class UpstreamClosed(ApiError):
    status = 502
    error_type = "upstream_error"
    code = "upstream_error"


class Relay:
    def __init__(
        self,
        *,
        upstream: aiohttp.ClientWebSocketResponse,
        deployment: DeploymentEntry,
        entry: CatalogEntry,
        caller: calls.Caller,
        ids: EventIds,
        send_text: SendText,
        on_upstream_closed: Callable[[ApiError], Awaitable[None]],
        touch: Callable[[], None],
    ) -> None:
        self.upstream = upstream
        self.deployment = deployment
        self.entry = entry
        self.caller = caller
        self.ids = ids
        self._send_text = send_text
        self._on_upstream_closed = on_upstream_closed
        self._touch = touch
        # Admitted turns waiting for the upstream's response.created, in order; then by response id.
        self.pending: deque[calls.RelayTurn] = deque()
        self.turns: dict[str, calls.RelayTurn | None] = {}
        self.produced: dict[str, int] = {}
        # The conversation's size as the upstream last reported it: the next prompt's estimate for TPM.
        self.context_tokens = 0
        self.max_output_tokens: int | None = None
        self.closing = False
        self.pump: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.pump = asyncio.get_running_loop().create_task(self._pump())

    async def _send(self, event: dict[str, Any]) -> None:
        event["event_id"] = self.ids.next()
        await self._send_text(orjson.dumps(event).decode())

    # Client → upstream ---------------------------------------------------------------------------------------
    async def from_client(self, text: str, event: dict[str, Any], client_event_id: str | None) -> None:
        kind = event.get("type")
        if kind == "session.update":
            session = event.get("session")
            if isinstance(session, dict):
                if "model" in session:
                    # The model was chosen (and checked against the key) when the session opened; the
                    # upstream knows it by its own name.
                    if session["model"] != self.entry.public_id:
                        raise invalid(f"The model is chosen when the session opens (`{self.entry.public_id}`); "
                                      "open a new session for another one.", "session.model")
                    session = {**session, "model": self.deployment.upstream_model}
                    text = orjson.dumps({**event, "session": session}).decode()
                limit = session.get("max_output_tokens", session.get("max_response_output_tokens"))
                self.max_output_tokens = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
        elif kind == "response.create":
            response = event.get("response")
            if isinstance(response, dict) and "model" in response:
                raise invalid("A response cannot choose its model; the session's is used.", "response.model",
                              "unknown_parameter")
            turn = await self._admit(event, client_event_id)
            if turn is None:
                return
            self.pending.append(turn)
        await self.upstream.send_str(text)

    def _output_limit(self, event: dict[str, Any]) -> int:
        response = event.get("response")
        limit = None
        if isinstance(response, dict):
            limit = response.get("max_output_tokens", response.get("max_response_output_tokens"))
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            limit = self.max_output_tokens
        return min(limit or _MAX_OUTPUT, _MAX_OUTPUT)

    async def _admit(self, event: dict[str, Any], client_event_id: str | None) -> calls.RelayTurn | None:
        caller = calls.Caller(key=self.caller.key, request_id=new_request_id(), session_id=self.caller.session_id,
                              endpoint=self.caller.endpoint)
        try:
            turn = await calls.relay_turn(self.entry, self.deployment, caller=caller,
                                          prompt_tokens=self.context_tokens + 1,
                                          max_output_tokens=self._output_limit(event))
        except Exception as exc:  # noqa: BLE001 - a refusal is the client's to read, as an error event
            error = to_api_error(exc, request_id=caller.request_id)
            for refusal in refusal_events(error, ids=self.ids, client_event_id=client_event_id):
                await self._send_text(orjson.dumps(refusal).decode())
            return None
        return turn

    # Upstream → client ---------------------------------------------------------------------------------------
    async def _pump(self) -> None:
        reason: ApiError = UpstreamClosed("The upstream realtime provider closed the session.")
        try:
            async for message in self.upstream:
                if message.type == aiohttp.WSMsgType.TEXT:
                    self._touch()
                    await self._from_upstream(message.data)
                elif message.type == aiohttp.WSMsgType.ERROR:
                    reason = UpstreamClosed("The connection to the upstream realtime provider broke.")
                    break
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("Relaying a realtime session failed")
            reason = UpstreamClosed("The connection to the upstream realtime provider broke.")
        self._settle_open(Status.INCOMPLETE)
        if not self.closing:
            await self._on_upstream_closed(reason)

    async def _from_upstream(self, text: str) -> None:
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError:
            return  # not an event; nothing a client could use
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind in ("session.created", "session.updated") and isinstance(event.get("session"), dict):
            event["session"]["model"] = self.entry.public_id
            event["session"]["id"] = self.caller.session_id
            text = orjson.dumps(event).decode()
        elif kind == "rate_limits.updated":
            return  # the gateway's own account limits: the client gets its own at each response
        elif kind == "response.created":
            turn = await self._started(event)
            if not self.closing:
                await self._send_text(text)
                limits = rate_limits_event(turn.headers, event_id=self.ids.next()) if turn is not None else None
                if limits is not None:
                    await self._send_text(orjson.dumps(limits).decode())
            return
        elif isinstance(kind, str) and kind.endswith(".delta") and isinstance(event.get("response_id"), str):
            delta = event.get("delta")
            if isinstance(delta, str):
                self.produced[event["response_id"]] = self.produced.get(event["response_id"], 0) + len(delta)
        elif kind == "response.done":
            self._done(event)
        if not self.closing:
            await self._send_text(text)

    async def _started(self, event: dict[str, Any]) -> calls.RelayTurn | None:
        """Bind the response to its admitted turn, admitting it now if the upstream started it."""
        response = event.get("response")
        response_id = response.get("id") if isinstance(response, dict) else None
        if not isinstance(response_id, str):
            return None
        turn = self.pending.popleft() if self.pending else await self._admit(event, None)
        self.turns[response_id] = turn
        if turn is None:
            # Started by the upstream (server VAD) and refused here: stop it.
            await self.upstream.send_str(orjson.dumps({"type": "response.cancel", "response_id": response_id}).decode())
        return turn

    def _done(self, event: dict[str, Any]) -> None:
        response = event.get("response")
        if not isinstance(response, dict) or not isinstance(response.get("id"), str):
            return
        turn = self.turns.pop(response["id"], None)
        produced = self.produced.pop(response["id"], 0)
        if turn is None:
            return
        usage = response.get("usage")
        turn.finish(usage=usage, status=_STATUS.get(str(response.get("status")), Status.OK), produced_bytes=produced)
        if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
            self.context_tokens = usage["total_tokens"]

    def _settle_open(self, status: int) -> None:
        for response_id, turn in list(self.turns.items()):
            if turn is not None:
                turn.finish(usage=None, status=status, produced_bytes=self.produced.get(response_id, 0))
        self.turns.clear()
        for turn in self.pending:
            turn.finish(usage=None, status=status)
        self.pending.clear()

    # Closing -------------------------------------------------------------------------------------------------
    async def close(self) -> None:
        """The client left: cancel what is running upstream, wait briefly for its usage, then close."""
        self.closing = True
        open_turns = [response_id for response_id, turn in self.turns.items() if turn is not None]
        try:
            if (open_turns or self.pending) and not self.upstream.closed:
                for response_id in open_turns:
                    await self.upstream.send_str(orjson.dumps({"type": "response.cancel",
                                                               "response_id": response_id}).decode())
                deadline = asyncio.get_running_loop().time() + _DRAIN_SECONDS
                while (self.pending or any(self.turns.values())) and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.05)
        except Exception:  # noqa: BLE001 - a broken upstream changes nothing here: what is open is estimated
            logger.warning("Could not cancel a relayed session's responses upstream")
        finally:
            if self.pump is not None and self.pump is not asyncio.current_task():
                self.pump.cancel()
            self._settle_open(Status.CLIENT_DISCONNECTED)
            await self.upstream.close()
