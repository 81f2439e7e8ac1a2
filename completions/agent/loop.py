"""One turn of a session or an agent: model steps, each a metered engine call, with the agent's tools run
between them, until an answer, a call for one of the client's own tools, or `max_iterations` steps.

    turn = Turn(...)
    async for kind, payload in turn.events():   # ("chunk", choices) | ("progress", event)
        ...
    turn.finish_reason, turn.usage, turn.new_messages, turn.content

Every step streams from the engine, whatever the client asked for: what the model says reaches a streaming
client as it is produced, and a JSON client gets the same text whole. When the turn has server-side tools,
the model's tool calls are held back (they are the platform's to run, not the client's); calls of the
client's own tools come back to it at the end, as `tool_calls`. Without server-side tools the chunks pass
through untouched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from django.utils import timezone

from agents.connectors import ToolOutcome
from agents.runtime import AgentSpec, ToolRunRecord, tool_runs_record
from completions.agent.tools import ServerTool, run_tool
from completions.engine import calls
from completions.engine.requests import ChatRequest
from platform_site.kernel.orm import orm

Event = tuple[str, Any]


@dataclass(slots=True)
class _Step:
    """What one model step produced."""

    content: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None

    def add_tool_call_delta(self, delta: dict[str, Any]) -> None:
        index = delta.get("index", len(self.tool_calls))
        call = self.tool_calls.setdefault(index, {"id": "", "type": "function",
                                                  "function": {"name": "", "arguments": ""}})
        if delta.get("id"):
            call["id"] = delta["id"]
        function = delta.get("function") or {}
        if function.get("name"):
            call["function"]["name"] += function["name"]
        if function.get("arguments"):
            call["function"]["arguments"] += function["arguments"]

    def message(self, calls_made: list[dict[str, Any]]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None}
        if calls_made:
            message["tool_calls"] = calls_made
        return message


@dataclass(slots=True)
class Turn:
    """A turn, ready to run. `request` is the client's, already checked, with the model to call in
    `models`; `history` the session's messages so far; `tools` the agent's own (empty for a plain model)."""

    request: ChatRequest
    caller: calls.Caller
    history: list[dict[str, Any]]
    agent: AgentSpec | None = None
    tools: dict[str, ServerTool] = field(default_factory=dict)
    max_iterations: int = 1
    # Runs before the first step's upstream call (fetching remote images, turning PDFs into text).
    prepare: calls.Prepare | None = None
    # Filled in as the turn runs.
    iterations: int = 0
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0,
                                                             "total_tokens": 0})
    headers: dict[str, str] = field(default_factory=dict)
    content: list[str] = field(default_factory=list)
    client_tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"
    new_messages: list[dict[str, Any]] = field(default_factory=list)
    completed: bool = False
    # The step's stream being read: closed (and so settled) if the turn is abandoned.
    _stream: calls.ChatStream | None = None

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.agent is not None and self.agent.instructions:
            messages.append({"role": "system", "content": self.agent.instructions})
        # new_messages starts with the request's own: the turn's messages so far.
        return [*messages, *self.history, *self.new_messages]

    def _step_request(self) -> ChatRequest:
        body = {**self.request.body, "messages": self._messages()}
        if self.tools:
            body["tools"] = [tool.definition for tool in self.tools.values()] + list(body.get("tools") or ())
        return dataclasses.replace(self.request, body=body, stream=True,
                                   uses_tools=self.request.uses_tools or bool(self.tools))

    async def events(self) -> AsyncIterator[Event]:
        """Run the turn. Raises what the engine raises (before the first event: nothing was produced)."""
        hold_tools = bool(self.tools)
        self.new_messages = [*self.request.messages]
        for iteration in range(1, self.max_iterations + 1):
            self.iterations = iteration
            step = _Step()
            stream = await calls.chat_stream(self._step_request(), caller=self.caller,
                                             prepare=self.prepare if iteration == 1 else None)
            self._stream = stream
            if iteration == 1:
                self.headers = dict(stream.headers)
            async with stream:
                async for choices in stream:
                    forward = self._read(choices, step, hold_tools=hold_tools, first_step=iteration == 1)
                    if forward:
                        yield "chunk", forward
            self._stream = None
            billed = stream.billed_usage or {}
            for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
                self.usage[name] += int(billed.get(name) or 0)
            made = [step.tool_calls[index] for index in sorted(step.tool_calls)]
            self.content.extend(step.content)
            self.new_messages.append(step.message(made))
            server = [call for call in made if call["function"]["name"] in self.tools]
            client = [call for call in made if call["function"]["name"] not in self.tools]
            if not server:
                self.client_tool_calls = client
                self.finish_reason = "tool_calls" if client else (step.finish_reason or "stop")
                break
            if iteration == self.max_iterations:
                # The model still wants its tools at the last step allowed: the turn ends where it stands. The
                # calls are not run (no step would read their results) nor kept: a session's next turn must
                # not start on calls that were never answered.
                self.new_messages[-1] = step.message([])
                self.finish_reason = "length"
                break
            async for event in self._run_tools(server, iteration=iteration, call_id=stream.call_id):
                yield event
            if client:
                self.client_tool_calls = client
                self.finish_reason = "tool_calls"
                break
        self.completed = True

    def _read(self, choices: list[dict[str, Any]], step: _Step, *, hold_tools: bool,
              first_step: bool) -> list[dict[str, Any]]:
        """Note what a chunk says, and return what of it goes to the client."""
        forward = []
        for choice in choices:
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                step.content.append(content)
            for call in delta.get("tool_calls") or ():
                step.add_tool_call_delta(call)
            if choice.get("finish_reason"):
                step.finish_reason = choice["finish_reason"]
            if not hold_tools:
                forward.append(choice)
                continue
            # The turn's own chunks: text as it comes; the role once; tool calls and the finish at the end.
            kept = {name: value for name, value in delta.items()
                    if (name == "role" and first_step) or (name not in ("tool_calls", "role") and value != "")}
            if kept:
                forward.append({"index": choice.get("index", 0), "delta": kept, "finish_reason": None})
        return forward

    def closing_choices(self) -> list[list[dict[str, Any]]]:
        """The last chunks of a turn whose tool calls were held back: the client's own calls, if any, then
        the finish."""
        if not self.tools:
            return []
        frames = []
        if self.client_tool_calls:
            calls_out = [{"index": position, **call} for position, call in enumerate(self.client_tool_calls)]
            frames.append([{"index": 0, "delta": {"tool_calls": calls_out}, "finish_reason": None}])
        frames.append([{"index": 0, "delta": {}, "finish_reason": self.finish_reason}])
        return frames

    async def _run_tools(self, made: list[dict[str, Any]], *, iteration: int, call_id: str) -> AsyncIterator[Event]:
        """Run the step's calls of the agent's tools side by side, passing their progress on as it happens,
        then audit them and give the model their results."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        caller = self.caller
        context = {"request_id": caller.request_id, "session_id": caller.session_id,
                   "agent": self.agent.slug if self.agent else ""}
        started = timezone.now()

        async def one(call: dict[str, Any]) -> ToolOutcome:
            return await run_tool(self.tools[call["function"]["name"]], arguments=call["function"]["arguments"],
                                  iteration=iteration, context=context, progress=queue.put_nowait)

        async def every() -> list[ToolOutcome]:
            try:
                return await asyncio.gather(*(one(call) for call in made))
            finally:
                queue.put_nowait(None)  # the end of the progress events

        runner = asyncio.ensure_future(every())
        try:
            while (event := await queue.get()) is not None:
                yield "progress", event
            outcomes = await runner
        finally:
            if not runner.done():
                # The turn was abandoned (the client left): its tool runs stop with it.
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)
        await orm(tool_runs_record, [
            self._record(call, outcome, iteration=iteration, call_id=call_id, started=started)
            for call, outcome in zip(made, outcomes, strict=True)
        ])
        for call, outcome in zip(made, outcomes, strict=True):
            self.new_messages.append({"role": "tool", "tool_call_id": call["id"], "content": outcome.content})

    def _record(self, call: dict[str, Any], outcome: ToolOutcome, *, iteration: int, call_id: str,
                started: dt.datetime) -> ToolRunRecord:
        tool = self.tools[call["function"]["name"]]
        key = self.caller.key
        return ToolRunRecord(
            organization_id=key.organization_id, project_id=key.project_id, api_key_id=key.id,
            agent_slug=self.agent.slug if self.agent else "", connector_id=tool.connector.id,
            tool_name=tool.function_name, session_id=self.caller.session_id, request_id=self.caller.request_id,
            call_id=call_id, iteration=iteration, outcome=outcome.outcome, error=outcome.error,
            duration_ms=outcome.duration_ms, started_at=started,
        )

    def message(self) -> dict[str, Any]:
        """The answer as a chat.completion's message."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None}
        if self.client_tool_calls:
            message["tool_calls"] = self.client_tool_calls
        return message
