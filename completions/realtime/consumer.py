"""The realtime WebSocket: one Channels consumer per connection, holding one session.

Opening: the key (Authorization header, or the browser's `openai-insecure-api-key.<key>` subprotocol) with
the `realtime` scope, a model the key may use, and a free place among the key's open sessions. The socket is
accepted first either way, so a refused client reads why in an `error` event (a browser cannot read a
refused handshake's status) before the socket closes.

Open: every client event is checked, and a bad one gets an `error` event that echoes its `event_id`; the
socket stays open. Responses run as tasks beside the receive loop, so `response.cancel` reaches them. A
watchdog ends the session when it sits idle, when it reaches its lifetime, or when its key stops being
valid; revoking the key ends it at once (apikeys.sessions).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from apikeys.auth import AuthenticatedKey, authenticate_from, authenticate_key
from apikeys.exceptions import InvalidApiKey
from apikeys.scopes import REALTIME
from apikeys.sessions import key_group
from billing.metering import Endpoint
from billing.sessions import session_close, session_open
from completions.engine import calls
from completions.engine.catalog import CatalogEntry
from completions.realtime import session as rt
from completions.realtime.protocol import (
    CLOSE_NORMAL,
    ClientGone,
    Dialect,
    EventIds,
    Handshake,
    RealtimeError,
    close_code,
    error_event,
    invalid,
    read_handshake,
)
from completions.realtime.relay import Relay
from completions.realtime.responses import RealtimeResponse, parse_response
from platform_site.kernel import jsonbody
from platform_site.kernel.errors import ApiError, server_error
from platform_site.middleware import new_request_id

logger = logging.getLogger(__name__)

# Responses one session may run at once: one in its conversation, the rest out of band (conversation: none).
MAX_ACTIVE_RESPONSES = 4


class RealtimeConsumer(AsyncWebsocketConsumer):
    key: AuthenticatedKey | None = None
    session_id = ""
    # Set when the session's model is relayed to an upstream realtime provider (relay.py).
    relay: Relay | None = None

    # Opening --------------------------------------------------------------------------------------------------
    async def connect(self) -> None:
        handshake = read_handshake(self.scope)
        self.dialect = Dialect(beta=handshake.beta)
        self.ids = EventIds()
        self.responses: dict[str, RealtimeResponse] = {}
        self.closed = False
        self.watchdog: asyncio.Task[None] | None = None
        await self.accept(subprotocol=handshake.subprotocol)
        try:
            self.key, self.entry = await self._admit(handshake)
            self._raw_key = handshake.raw_key or ""
            self.session_id = rt.new_id("sess")
            await session_open(key=self.key, session_id=self.session_id)
            if "realtime" in self.entry.capabilities:
                upstream, deployment = await calls.realtime_upstream(self.entry, beta=self.dialect.beta)
                self.relay = Relay(
                    upstream=upstream, deployment=deployment, entry=self.entry,
                    caller=calls.Caller(key=self.key, request_id="", session_id=self.session_id,
                                        endpoint=Endpoint.REALTIME),
                    ids=self.ids, send_text=self._send_text, on_upstream_closed=self._end, touch=self._touch,
                )
            group = key_group(self.key.public_id)
            await self.channel_layer.group_add(group, self.channel_name)
            self.groups.append(group)  # left again by Channels when the socket closes
        except ApiError as error:
            self.key = None
            await self._end(error)
            return
        except Exception:
            self.key = None
            logger.exception("Could not open a realtime session")
            await self._end(server_error(request_id=new_request_id()))
            return
        try:
            self._opened()
            if self.relay is not None:
                self.relay.start()  # the upstream sends its own session.created
            else:
                await self._emit({"type": "session.created", "session": self.config.render(self.dialect)})
        except ClientGone:
            # The client hung up while the session opened: its place is given back now (the disconnect that
            # follows may never reach this consumer).
            await self._release()

    def _opened(self) -> None:
        now = time.monotonic()
        self.last_activity = now
        self.ends_at = now + settings.KEYWAY_REALTIME_MAX_LIFETIME
        self.config = rt.SessionConfig(
            id=self.session_id, model=self.entry.public_id,
            expires_at=int(time.time() + settings.KEYWAY_REALTIME_MAX_LIFETIME),
        )
        self.conversation = rt.Conversation(max_items=settings.KEYWAY_REALTIME_MAX_ITEMS,
                                            max_bytes=settings.KEYWAY_REALTIME_MAX_CONVERSATION_BYTES)
        self.watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _admit(self, handshake: Handshake) -> tuple[AuthenticatedKey, CatalogEntry]:
        if handshake.has_call_id:
            raise invalid("Attaching to a call (call_id) is not supported here; open a session with ?model=.",
                          "call_id", "unsupported_parameter")
        if handshake.raw_key is None:
            raise InvalidApiKey(
                "You didn't provide an API key. Send it in the Authorization header as 'Bearer YOUR_KEY', or "
                "from a browser as the subprotocol 'openai-insecure-api-key.YOUR_KEY'."
            )
        raw_key = handshake.raw_key
        client = self.scope.get("client") or ("",)
        key = await authenticate_from(str(client[0] or ""), lambda: raw_key)
        key.require_scope(REALTIME)
        model = key.pinned_model or handshake.model
        if not model:
            raise invalid("Name a model: /v1/realtime?model=MODEL.", "model", "missing_required_parameter")
        return key, await calls.realtime_model(key, model)

    # Closing --------------------------------------------------------------------------------------------------
    async def _frame(self, text: str) -> None:
        """Send one frame; ClientGone if the socket is gone (the server raises on a send to a closed socket:
        uvicorn's ClientDisconnected is an OSError, an ASGI send after the close a RuntimeError)."""
        try:
            await self.send(text_data=text)
        except (OSError, RuntimeError) as error:
            self.closed = True
            raise ClientGone from error

    async def _emit(self, event: dict[str, Any]) -> None:
        event["event_id"] = self.ids.next()
        await self._frame(orjson.dumps(event).decode())

    def _touch(self) -> None:
        self.last_activity = time.monotonic()

    async def _send_text(self, text: str) -> None:
        if not self.closed:
            await self._frame(text)

    async def _end(self, error: ApiError, code: int | None = None) -> None:
        """Say why, then close (once): with `code`, else 4000 + the error's status."""
        if self.closed:
            return
        try:
            await self._emit_error(error, None)
            self.closed = True
            await self.close(code=code if code is not None else close_code(error.status))
        except (ClientGone, OSError, RuntimeError):
            self.closed = True  # the client left first: nobody to tell
        finally:
            await self._release()

    async def disconnect(self, code: int) -> None:
        self.closed = True
        await self._release()

    async def _release(self) -> None:
        """Stop what runs (each response settles what it produced) and give the session's place back.
        Safe to call more than once."""
        if self.watchdog is not None and self.watchdog is not asyncio.current_task():
            self.watchdog.cancel()
        responses = [response.task for response in self.responses.values() if response.task is not None]
        self.responses.clear()
        for task in responses:
            task.cancel()
        if responses:
            await asyncio.gather(*responses, return_exceptions=True)
        relay, self.relay = self.relay, None
        if relay is not None:
            await relay.close()
        if self.session_id:
            await session_close(session_id=self.session_id)

    async def key_ended(self, message: dict[str, Any]) -> None:
        """The key was revoked (or its project archived): end the session now."""
        error = InvalidApiKey("The API key of this session was revoked; the session has ended.")
        await self._end(error)

    async def _watch(self) -> None:
        recheck = settings.KEYWAY_REALTIME_KEY_RECHECK
        idle = settings.KEYWAY_REALTIME_IDLE_TIMEOUT
        next_check = time.monotonic() + recheck
        while not self.closed:
            now = time.monotonic()
            if self.responses:
                self.last_activity = now  # a session that is answering is not idle
            if now >= self.ends_at:
                minutes = settings.KEYWAY_REALTIME_MAX_LIFETIME / 60
                await self._end(RealtimeError(f"Your session hit the maximum duration of {minutes:g} minutes.",
                                              code="session_expired"), CLOSE_NORMAL)
                return
            if now - self.last_activity >= idle:
                await self._end(RealtimeError(f"The session was idle for {idle:g} seconds and has been closed.",
                                              code="session_idle_timeout"), CLOSE_NORMAL)
                return
            if now >= next_check:
                next_check = now + recheck
                try:
                    await authenticate_key(self._raw_key)
                except InvalidApiKey:
                    await self._end(InvalidApiKey("The API key of this session is no longer valid; the session "
                                                  "has ended."))
                    return
                except Exception:
                    logger.exception("Could not re-check a realtime session's key; will retry")
            wake = min(self.ends_at, self.last_activity + idle, next_check)
            await asyncio.sleep(max(wake - time.monotonic(), 0.05))

    # Client events --------------------------------------------------------------------------------------------
    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.closed or self.key is None:
            return
        self.last_activity = time.monotonic()
        client_event_id: str | None = None
        try:
            event = self._parse(text_data, bytes_data)
            raw_id = event.get("event_id")
            if raw_id is not None:
                client_event_id = rt.as_string(raw_id, "event_id", limit=512)
            if "type" not in event:
                raise invalid("The event has no 'type'.", "type", "missing_required_parameter")
            if self.relay is not None:
                # The upstream checks the event itself (and echoes the event_id in its errors).
                rt.as_string(event["type"], "type", limit=128)
                await self.relay.from_client(text_data or "", event, client_event_id)
                return
            kind = rt.one_of(event.get("type"), "type", self._EVENT_TYPES)
            await self._HANDLERS[kind](self, event, client_event_id)
        except ClientGone:
            return  # the disconnect that follows releases the session
        except ApiError as error:
            with contextlib.suppress(ClientGone):
                await self._emit_error(error, client_event_id)
        except Exception:
            request_id = new_request_id()
            logger.exception("Realtime event failed (request %s)", request_id)
            with contextlib.suppress(ClientGone):
                await self._emit_error(server_error(request_id=request_id), client_event_id)

    async def _emit_error(self, error: ApiError, client_event_id: str | None) -> None:
        await self._frame(orjson.dumps(error_event(error, event_id=self.ids.next(),
                                                   client_event_id=client_event_id)).decode())

    @staticmethod
    def _parse(text_data: str | None, bytes_data: bytes | None) -> dict[str, Any]:
        if text_data is None:
            raise invalid("Binary frames are not supported: send each event as a JSON text frame.", None,
                          "invalid_event")
        limit = settings.KEYWAY_REALTIME_MAX_MESSAGE_BYTES
        if len(text_data) > limit or (len(text_data) * 4 > limit and len(text_data.encode()) > limit):
            raise invalid(f"The event is larger than {limit} bytes, the most one message may carry.", None,
                          "message_too_large")
        try:
            event = jsonbody.loads(text_data.encode())
        except orjson.JSONDecodeError:
            raise invalid("The event is not valid JSON.", None, "invalid_json") from None
        except jsonbody.TooDeep:
            raise invalid(f"The event is nested more than {jsonbody.MAX_DEPTH} levels deep.", None,
                          "invalid_json") from None
        if not isinstance(event, dict):
            raise invalid("The event must be a JSON object.", None, "invalid_event")
        return event

    async def _session_update(self, event: dict[str, Any], _: str | None) -> None:
        if "session" not in event:
            raise invalid("Missing required parameter: 'session'.", "session", "missing_required_parameter")
        self.config = self.config.updated(event["session"], beta=self.dialect.beta)
        await self._emit({"type": "session.updated", "session": self.config.render(self.dialect)})

    def _item_id(self, event: dict[str, Any]) -> str:
        if "item_id" not in event:
            raise invalid("Missing required parameter: 'item_id'.", "item_id", "missing_required_parameter")
        return str(self.conversation.get(event["item_id"])["id"])

    async def _item_create(self, event: dict[str, Any], _: str | None) -> None:
        if "item" not in event:
            raise invalid("Missing required parameter: 'item'.", "item", "missing_required_parameter")
        previous = event.get("previous_item_id")
        if previous is not None:
            rt.as_string(previous, "previous_item_id", limit=64)
        item = rt.parse_item(event["item"], "item", capabilities=self.entry.capabilities, model=self.config.model)
        after = self.conversation.add(item, previous_item_id=previous)
        shown = rt.render_item(item, self.dialect)
        if self.dialect.beta:
            await self._emit({"type": "conversation.item.created", "previous_item_id": after, "item": shown})
        else:
            await self._emit({"type": "conversation.item.added", "previous_item_id": after, "item": shown})
            await self._emit({"type": "conversation.item.done", "previous_item_id": after, "item": shown})

    async def _item_retrieve(self, event: dict[str, Any], _: str | None) -> None:
        item = self.conversation.get(self._item_id(event))
        await self._emit({"type": "conversation.item.retrieved", "item": rt.render_item(item, self.dialect)})

    async def _item_delete(self, event: dict[str, Any], _: str | None) -> None:
        item_id = self.conversation.delete(self._item_id(event))
        await self._emit({"type": "conversation.item.deleted", "item_id": item_id})

    async def _item_truncate(self, event: dict[str, Any], _: str | None) -> None:
        item = self.conversation.get(self._item_id(event))
        index, end_ms = event.get("content_index"), event.get("audio_end_ms")
        if item["type"] != "message" or item["role"] != "assistant":
            raise invalid("Only assistant messages can be truncated.", "item_id")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(item["content"]):
            raise invalid(f"Invalid 'content_index': the item has {len(item['content'])} content parts.",
                          "content_index")
        if isinstance(end_ms, bool) or not isinstance(end_ms, int) or end_ms < 0:
            raise invalid("Invalid 'audio_end_ms': expected a whole number of milliseconds, 0 or more.",
                          "audio_end_ms")
        part = item["content"][index]
        if part["type"] != "output_audio" or not part.get("audio"):
            raise invalid("Only audio can be truncated, and this content part holds none.", "content_index")
        try:
            audio = base64.b64decode(part["audio"], validate=True)
        except (binascii.Error, ValueError):
            raise invalid("The content part's audio is not valid base64.", "content_index") from None
        # PCM16 at 24 kHz, mono: 48 bytes a millisecond.
        if end_ms * 48 > len(audio):
            raise invalid(f"Invalid 'audio_end_ms': the audio lasts {len(audio) // 48} ms.", "audio_end_ms")
        before = rt.item_size(item)
        # The transcript no longer matches the audio, so it goes (as OpenAI does).
        item["content"][index] = {"type": "output_audio", "transcript": None,
                                  "audio": base64.b64encode(audio[: end_ms * 48]).decode()}
        self.conversation.resize(item, before)
        await self._emit({"type": "conversation.item.truncated", "item_id": item["id"], "content_index": index,
                          "audio_end_ms": end_ms})

    async def _audio(self, event: dict[str, Any], _: str | None) -> None:
        raise invalid(
            f"The model `{self.config.model}` takes and produces text only, so this session has no audio buffer. "
            "Send text with conversation.item.create; audio needs a realtime model served by an upstream "
            "realtime provider.", "type", "audio_not_supported",
        )

    async def _response_create(self, event: dict[str, Any], client_event_id: str | None) -> None:
        params = parse_response(event.get("response"), config=self.config, conversation=self.conversation,
                                beta=self.dialect.beta, capabilities=self.entry.capabilities)
        if params.in_conversation and any(r.params.in_conversation for r in self.responses.values()):
            raise invalid("Conversation already has an active response in progress; wait for its response.done, "
                          "or cancel it.", None, "conversation_already_has_active_response")
        if len(self.responses) >= MAX_ACTIVE_RESPONSES:
            raise invalid(f"This session already runs {MAX_ACTIVE_RESPONSES} responses, the most it may at once.",
                          None, "too_many_active_responses")
        if params.in_conversation:
            self.conversation.room_for(0, None)
        assert self.key is not None
        response = RealtimeResponse(
            params=params, config=self.config, conversation=self.conversation, dialect=self.dialect, ids=self.ids,
            send=self._send_event, caller_key=self.key, session_id=self.session_id, client_event_id=client_event_id,
        )
        self.responses[response.id] = response
        response.task = asyncio.get_running_loop().create_task(self._run(response))

    async def _run(self, response: RealtimeResponse) -> None:
        try:
            await response.run()
        except asyncio.CancelledError:
            raise
        except ClientGone:
            pass  # settled as the client's disconnection; nobody to tell
        except Exception:
            request_id = new_request_id()
            logger.exception("Realtime response failed (request %s)", request_id)
            if not self.closed:
                await self._emit_error(server_error(request_id=request_id), response.client_event_id)
        finally:
            self.responses.pop(response.id, None)
            self.last_activity = time.monotonic()

    async def _send_event(self, event: dict[str, Any]) -> None:
        if self.closed:
            raise ClientGone  # a response still running stops here, and settles what it produced
        await self._frame(orjson.dumps(event).decode())

    async def _response_cancel(self, event: dict[str, Any], _: str | None) -> None:
        response_id = event.get("response_id")
        if response_id is not None:
            rt.as_string(response_id, "response_id", limit=64)
            response = self.responses.get(response_id)
        else:
            response = next((r for r in self.responses.values() if r.params.in_conversation), None)
        if response is None:
            raise invalid("Cancellation failed: no active response found.", "response_id" if response_id else None,
                          "response_cancel_not_active")
        response.cancel()

    _HANDLERS: dict[str, Callable[[RealtimeConsumer, dict[str, Any], str | None], Awaitable[None]]] = {
        "session.update": _session_update,
        "conversation.item.create": _item_create,
        "conversation.item.retrieve": _item_retrieve,
        "conversation.item.delete": _item_delete,
        "conversation.item.truncate": _item_truncate,
        "response.create": _response_create,
        "response.cancel": _response_cancel,
        "input_audio_buffer.append": _audio,
        "input_audio_buffer.commit": _audio,
        "input_audio_buffer.clear": _audio,
        "output_audio_buffer.clear": _audio,
    }
    _EVENT_TYPES = tuple(_HANDLERS)
