"""/v1/chat/completions for sessions and agents: a request that names a `session_id`, sets
`max_iterations`, or calls an agent (`agent:<slug>`, or the agent its organization pins) is a turn.

A turn reads the session's messages, runs the agent loop (completions.agent.loop: each model step one
metered engine call, the agent's tools run between them) and keeps what was said. The answer is a plain chat
completion, or chunks, with the session's id beside it: a top-level `session_id` in the body and in every
chunk, and the `x-session-id` header. Tool progress, when asked for (`stream_options.include_tool_progress`
or `X-Hermes-Tool-Progress: 1`), comes as named `tool.progress` events between the chunks, which strict
OpenAI clients skip; without it the stream has no event that a plain one lacks.

A plain model call without any of these never comes here: it stays the lean path, stores nothing, and is
byte for byte OpenAI's.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from django.conf import settings
from django.http import HttpResponseBase, StreamingHttpResponse

from agents.exceptions import TooManyAgentRuns
from agents.models import new_session_id
from agents.runtime import AGENT_PREFIX, agent_for
from agents.sessions import session_check_room, session_get, session_messages, session_save_turn
from completions.agent.loop import Event, Turn
from completions.agent.tools import check_client_tools, server_tools
from completions.api import sse
from completions.api.content import content_step
from completions.api.http import ApiRequest, json_response
from completions.api.requests import parse_chat
from completions.engine.calls import Caller
from platform_site.kernel import ids
from platform_site.kernel.errors import ApiError, to_api_error
from platform_site.kernel.orm import orm

# Fields of a turn that no upstream knows: taken out before the body is checked as a chat request.
TURN_FIELDS = ("session_id", "max_iterations")
MAX_ITERATIONS = 50
PROGRESS_HEADER = "X-Hermes-Tool-Progress"
_SESSION_ID_LENGTH = 40


def is_turn(body: dict[str, Any], pinned_model: str) -> bool:
    """Whether a chat request is a turn (cheap: it runs for every chat request)."""
    if "session_id" in body or "max_iterations" in body or pinned_model.startswith(AGENT_PREFIX):
        return True
    model = body.get("model")
    return isinstance(model, str) and model.startswith(AGENT_PREFIX)


def _session_id(body: dict[str, Any]) -> str | None:
    value = body.pop("session_id", None)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError("'session_id' must be a string.", param="session_id", code="invalid_type")
    if not value or len(value) > _SESSION_ID_LENGTH:
        raise ApiError(f"No session found with id '{value[:64]}'.", status=404, param="session_id",
                       code="session_not_found")
    return value


def _max_iterations(body: dict[str, Any]) -> int | None:
    value = body.pop("max_iterations", None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError("'max_iterations' must be an integer.", param="max_iterations", code="invalid_type")
    if not 1 <= value <= MAX_ITERATIONS:
        raise ApiError(f"'max_iterations' must be from 1 to {MAX_ITERATIONS}; got {value}.",
                       param="max_iterations", code="invalid_value")
    return value


def _wants_progress(request: ApiRequest, body: dict[str, Any]) -> bool:
    """Tool progress was asked for; `include_tool_progress` is taken out of `stream_options`, which goes
    upstream."""
    wanted = request.headers.get(PROGRESS_HEADER, "").strip().lower() in ("1", "true")
    options = body.get("stream_options")
    if isinstance(options, dict) and "include_tool_progress" in options:
        flag = options["include_tool_progress"]
        if not isinstance(flag, bool):
            raise ApiError("'stream_options.include_tool_progress' must be a boolean.",
                           param="stream_options.include_tool_progress", code="invalid_type")
        wanted = wanted or flag
        body["stream_options"] = {name: value for name, value in options.items() if name != "include_tool_progress"}
    return wanted


class _RunSlots:
    """Agent turns of one organization running at once in this worker: KEYWAY_AGENT_RUNS_PER_ORG at most, so
    that one tenant's long tool runs cannot hold every connection and task of the worker."""

    def __init__(self) -> None:
        self.running: dict[int, int] = {}

    def take(self, organization_id: int) -> None:
        running = self.running.get(organization_id, 0)
        if running >= settings.KEYWAY_AGENT_RUNS_PER_ORG:
            raise TooManyAgentRuns(
                f"Too many agent turns of this organization are running at once (at most "
                f"{settings.KEYWAY_AGENT_RUNS_PER_ORG} per server process); retry shortly.",
                headers={"Retry-After": "1"},
            )
        self.running[organization_id] = running + 1

    def give_back(self, organization_id: int) -> None:
        left = self.running.get(organization_id, 1) - 1
        if left > 0:
            self.running[organization_id] = left
        else:
            self.running.pop(organization_id, None)


run_slots = _RunSlots()


async def chat_turn(request: ApiRequest, body: dict[str, Any]) -> HttpResponseBase:
    key = request.api_key
    session_id = _session_id(body)
    max_iterations = _max_iterations(body)
    progress = _wants_progress(request, body)
    pinned_agent = key.pinned_model if key.pinned_model.startswith(AGENT_PREFIX) else ""
    model = pinned_agent or body.get("model")
    agent = None
    step_key = key
    if isinstance(model, str) and model.startswith(AGENT_PREFIX):
        key.require_model(model)
        agent = await agent_for(key, model)
        body["model"] = agent.model
        body.pop("models", None)
        # The agent's model is its owner's choice: the key's own model list and the organization's pin
        # were checked against the agent itself.
        step_key = dataclasses.replace(key, pinned_model="", allowed_models=frozenset())
    elif max_iterations is not None:
        raise ApiError("'max_iterations' applies to agents (`agent:<slug>` models) only.", param="max_iterations",
                       code="unsupported_parameter")
    chat, report = parse_chat(body, model_pinned=bool(key.pinned_model) and agent is None)
    if chat.n != 1:
        raise ApiError("A session or agent turn makes one choice: 'n' must be 1.", param="n",
                       code="unsupported_parameter")
    if key.project_id is None:
        raise ApiError("Sessions belong to a project; use a project key.", status=403, param="session_id",
                       code="permission_denied")
    history: list[dict[str, Any]] = []
    adding = len(orjson.dumps(chat.messages))
    if session_id is not None:
        session = await orm(session_get, organization_id=key.organization_id, project_id=key.project_id,
                            session_id=session_id)
        session_check_room(session=session, adding=adding)
        history = await orm(session_messages, session=session)
        new = False
    else:
        session_id, new = new_session_id(), True
        if adding > settings.KEYWAY_SESSION_MAX_BYTES:
            raise ApiError(f"The messages are larger than a session holds ({settings.KEYWAY_SESSION_MAX_BYTES} "
                           "bytes).", param="messages", code="session_full")
    tools = await server_tools(agent) if agent is not None and agent.connectors else {}
    check_client_tools(chat.body, tools)
    turn = Turn(
        request=chat, caller=Caller(key=step_key, request_id=request.request_id, session_id=session_id),
        history=history, agent=agent, tools=tools,
        max_iterations=(max_iterations or agent.max_iterations) if agent is not None else 1,
        prepare=content_step(report),
    )
    saver = Saver(turn, session_id=session_id, new=new, key_id=key.id, organization_id=key.organization_id,
                   project_id=key.project_id, agent_slug=agent.slug if agent else "")
    run_slots.take(key.organization_id)
    handed_over = False  # to the stream, which gives the slot back when it closes
    try:
        if chat.stream:
            events = turn.events()
            first = await anext(events, None)
            public_model = agent.public_model if agent else turn.headers.get("x-keyway-model", "")
            body_iter = _TurnStream(turn, events, first, saver, completion_id=f"chatcmpl-{ids.token_hex(12)}",
                                    model=public_model, progress=progress, request_id=request.request_id)
            handed_over = True
            return StreamingHttpResponse(
                body_iter, content_type=sse.CONTENT_TYPE,
                headers={**sse.HEADERS, **turn.headers, "x-session-id": session_id},
            )
        async for _ in turn.events():
            pass
        await saver.save()
    finally:
        if not handed_over:
            turn.close()
            run_slots.give_back(key.organization_id)
    completion = {
        "id": f"chatcmpl-{ids.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": agent.public_model if agent else turn.headers.get("x-keyway-model", ""),
        "choices": [{"index": 0, "message": turn.message(), "logprobs": None, "finish_reason": turn.finish_reason}],
        "usage": turn.usage,
        "session_id": session_id,
    }
    return json_response(completion, headers={**turn.headers, "x-session-id": session_id})


class Saver:
    """Keeps a turn in its session once it completed: never a half-turn."""

    def __init__(self, turn: Turn, *, session_id: str, new: bool, key_id: int, organization_id: int,
                 project_id: int, agent_slug: str) -> None:
        self.turn = turn
        self.session_id = session_id
        self.new = new
        self.key_id = key_id
        self.organization_id = organization_id
        self.project_id = project_id
        self.agent_slug = agent_slug

    async def save(self) -> None:
        if self.turn.completed:
            await orm(session_save_turn, session_id=self.session_id, new=self.new,
                      organization_id=self.organization_id, project_id=self.project_id, api_key_id=self.key_id,
                      agent_slug=self.agent_slug, messages=self.turn.new_messages)


class _TurnStream:
    """The body of a streamed turn. Its `close()` (a response closer, as for a plain stream) settles the
    step being read and gives the organization's run slot back, however the stream ends."""

    def __init__(self, turn: Turn, events: AsyncIterator[Event], first: Event | None, saver: Saver, *,
                 completion_id: str, model: str, progress: bool, request_id: str) -> None:
        self.turn = turn
        self.events = events
        self.first = first
        self.saver = saver
        self.envelope = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": model, "session_id": saver.session_id}
        self.progress = progress
        self.request_id = request_id
        self.released = False

    def close(self) -> None:
        self.turn.close()
        if not self.released:
            self.released = True
            run_slots.give_back(self.saver.organization_id)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._frames()

    def _frame(self, event: Event) -> bytes | None:
        kind, payload = event
        if kind == "chunk":
            return sse.frame({**self.envelope, "choices": payload})
        if self.progress:
            return b"event: tool.progress\ndata: " + orjson.dumps(payload) + b"\n\n"
        return None

    async def _frames(self) -> AsyncIterator[bytes]:
        try:
            if self.first is not None:
                frame = self._frame(self.first)
                if frame is not None:
                    yield frame
                async for event in self.events:
                    frame = self._frame(event)
                    if frame is not None:
                        yield frame
            for choices in self.turn.closing_choices():
                yield sse.frame({**self.envelope, "choices": choices})
            await self.saver.save()
        except Exception as exc:  # noqa: BLE001 - after the first byte an error can only be an SSE event
            yield sse.error_frame(to_api_error(exc, request_id=self.request_id).body())
            yield sse.DONE
            return
        if self.turn.request.include_usage:
            yield sse.frame({**self.envelope, "choices": [], "usage": self.turn.usage})
        yield sse.DONE
