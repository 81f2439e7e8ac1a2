"""One realtime response: `response.create` checked, one metered engine call, its chunks as realtime events.

The response's text becomes a `message` item and each tool call a `function_call` item, announced as they
start (`response.output_item.added`, then `response.content_part.added` for text) so that every delta
refers to something the client already has. `response.done` is always sent, whatever the end: completed,
incomplete (the output limit), cancelled (`response.cancel`), or failed (the upstream broke mid-answer). A
response the engine refuses before it starts (a rate limit, a budget, a bad request) never began: the client
gets an `error` event echoing its `event_id`, and `rate_limits.updated` where the refusal carries limits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from billing.metering import Endpoint
from completions.api.requests import parse_chat
from completions.engine import calls
from completions.realtime import session as rt
from completions.realtime.protocol import (
    ClientGone,
    Dialect,
    EventIds,
    error_event,
    invalid,
    rate_limits_event,
    refusal_events,
)
from platform_site.kernel.errors import ApiError, to_api_error
from platform_site.middleware import new_request_id

Send = Callable[[dict[str, Any]], Awaitable[None]]

_RESPONSE_FIELDS_GA = {"conversation", "instructions", "tools", "tool_choice", "max_output_tokens",
                       "output_modalities", "metadata", "input", "audio", "prompt", "tracing"}
_RESPONSE_FIELDS_BETA = {"conversation", "instructions", "tools", "tool_choice", "max_response_output_tokens",
                         "max_output_tokens", "modalities", "metadata", "input", "voice", "output_audio_format",
                         "temperature"}


@dataclass(slots=True)
class ResponseParams:
    """The session's settings with one response's overrides. `context` is None when the response reads the
    conversation, else the items it reads instead (`response.input`)."""

    in_conversation: bool
    instructions: str
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    max_output_tokens: int | None
    temperature: float | None
    output_modalities: list[str]
    metadata: dict[str, str] | None
    context: list[dict[str, Any]] | None


def parse_response(
    raw: Any, *, config: rt.SessionConfig, conversation: rt.Conversation, beta: bool, capabilities: frozenset[str]
) -> ResponseParams:
    params = ResponseParams(
        in_conversation=True, instructions=config.instructions, tools=config.tools, tool_choice=config.tool_choice,
        max_output_tokens=config.max_output_tokens, temperature=config.temperature,
        output_modalities=config.output_modalities, metadata=None, context=None,
    )
    if raw is None:
        return params
    response = rt.as_object(raw, "response")
    rt.reject_unknown(response, _RESPONSE_FIELDS_BETA if beta else _RESPONSE_FIELDS_GA, "response")
    if "conversation" in response:
        params.in_conversation = rt.one_of(response["conversation"], "response.conversation",
                                            ("auto", "none")) == "auto"
    if "instructions" in response:
        params.instructions = rt.as_string(response["instructions"], "response.instructions")
    if "tools" in response:
        params.tools = rt.tools(response["tools"], "response.tools")
    if "tool_choice" in response:
        params.tool_choice = rt.tool_choice(response["tool_choice"], "response.tool_choice")
    for name in ("max_output_tokens", "max_response_output_tokens"):
        if name in response:
            params.max_output_tokens = rt.max_output_tokens(response[name], f"response.{name}")
    if "temperature" in response:
        params.temperature = rt.temperature(response["temperature"], "response.temperature")
    modalities = "modalities" if beta else "output_modalities"
    if modalities in response:
        chosen = rt.output_modalities(response[modalities], f"response.{modalities}", audio_ok=config.audio_ok or beta,
                                      model=config.model)
        if not config.audio_ok:
            if "text" not in chosen:
                rt.output_modalities(chosen, f"response.{modalities}", audio_ok=False, model=config.model)
            chosen = ["text"]
        params.output_modalities = chosen
    if "metadata" in response:
        params.metadata = rt.metadata(response["metadata"], "response.metadata")
    # audio, voice and output_audio_format shape audio output, which a text model does not make.
    if response.get("prompt") is not None:
        raise invalid("Stored prompts are not supported here; send 'instructions'.", "response.prompt",
                      "unsupported_parameter")
    if "input" in response:
        context = []
        for index, raw_item in enumerate(rt.as_list(response["input"], "response.input")):
            where = f"response.input[{index}]"
            if isinstance(raw_item, dict) and raw_item.get("type") == "item_reference":
                rt.reject_unknown(raw_item, {"type", "id"}, where)
                context.append(conversation.get(raw_item.get("id"), f"{where}.id"))
            else:
                context.append(rt.parse_item(raw_item, where, capabilities=capabilities, model=config.model))
        params.context = context
    if params.tool_choice != "auto" and params.tool_choice != "none" and not params.tools:
        raise invalid("'tool_choice' needs tools to choose from.", "response.tool_choice")
    return params


def realtime_usage(billed: dict[str, int] | None) -> dict[str, Any] | None:
    if billed is None:
        return None
    prompt, completion, cached = billed["prompt_tokens"], billed["completion_tokens"], billed["cached_tokens"]
    return {
        "total_tokens": prompt + completion,
        "input_tokens": prompt,
        "output_tokens": completion,
        "input_token_details": {
            "text_tokens": prompt, "audio_tokens": 0, "image_tokens": 0, "cached_tokens": cached,
            "cached_tokens_details": {"text_tokens": cached, "audio_tokens": 0, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": completion, "audio_tokens": 0},
    }


class _Output:
    """One item the response is producing: its stored form (shared with the conversation when the response
    writes to it), where it stands in the output, and the text or arguments gathered so far."""

    __slots__ = ("item", "index", "parts", "size", "finished")

    def __init__(self, item: dict[str, Any], index: int, size: int) -> None:
        self.item = item
        self.index = index
        self.parts: list[str] = []
        self.size = size
        self.finished = False


class RealtimeResponse:
    def __init__(
        self,
        *,
        params: ResponseParams,
        config: rt.SessionConfig,
        conversation: rt.Conversation,
        dialect: Dialect,
        ids: EventIds,
        send: Send,
        caller_key: Any,
        session_id: str,
        client_event_id: str | None,
    ) -> None:
        self.id = rt.new_id("resp")
        self.params = params
        self.config = config
        self.conversation = conversation
        self.dialect = dialect
        self.ids = ids
        self._send = send
        self.caller = calls.Caller(key=caller_key, request_id=new_request_id(), session_id=session_id,
                                   endpoint=Endpoint.REALTIME)
        self.client_event_id = client_event_id
        self.outputs: list[_Output] = []
        self.by_tool_index: dict[int, _Output] = {}
        self.text_output: _Output | None = None
        self.cancel_requested = False
        self.task: asyncio.Task[None] | None = None

    # Sending ---------------------------------------------------------------------------------------------
    async def send(self, event: dict[str, Any]) -> None:
        event["event_id"] = self.ids.next()
        await self._send(event)

    def cancel(self) -> None:
        """Stop the response as the client asked: what was produced is charged, and it ends `cancelled`."""
        self.cancel_requested = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _response_object(self, status: str, details: dict[str, Any] | None, usage: Any) -> dict[str, Any]:
        params, audio = self.params, self.config.audio["output"]
        max_tokens: int | str = params.max_output_tokens if params.max_output_tokens is not None else "inf"
        shown: dict[str, Any] = {
            "object": "realtime.response", "id": self.id, "status": status, "status_details": details,
            "output": [rt.render_item(output.item, self.dialect) for output in self.outputs],
            "conversation_id": self.conversation.id if params.in_conversation else None,
            "usage": usage, "metadata": params.metadata,
        }
        if self.dialect.beta:
            fmt = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
            shown.update(modalities=params.output_modalities, voice=audio["voice"],
                         output_audio_format=fmt[audio["format"]["type"]],
                         temperature=params.temperature if params.temperature is not None else 0.8,
                         max_output_tokens=max_tokens)
        else:
            shown.update(output_modalities=params.output_modalities, max_output_tokens=max_tokens,
                         audio={"output": {"format": audio["format"], "voice": audio["voice"]}})
        return shown

    # The chat request ------------------------------------------------------------------------------------
    def _chat_body(self) -> dict[str, Any]:
        params = self.params
        items = params.context if params.context is not None else self.conversation.in_order()
        messages = rt.chat_messages(params.instructions, items)
        if not messages:
            raise invalid("There is nothing to respond to: add an item with conversation.item.create, or give "
                          "the response 'instructions' or 'input'.", None, "empty_conversation")
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.tools and params.tool_choice != "none":
            body["tools"] = rt.chat_tools(params.tools)
            body["tool_choice"] = rt.chat_tool_choice(params.tool_choice)
        if params.max_output_tokens is not None:
            body["max_tokens"] = params.max_output_tokens
        if params.temperature is not None:
            body["temperature"] = params.temperature
        return body

    # Items -------------------------------------------------------------------------------------------------
    async def _start(self, item: dict[str, Any]) -> _Output:
        output = _Output(item, len(self.outputs), 0)
        self.outputs.append(output)
        await self.send({"type": "response.output_item.added", "response_id": self.id, "output_index": output.index,
                         "item": rt.render_item(item, self.dialect)})
        if self.params.in_conversation:
            previous = self.conversation.order[-1] if self.conversation.order else None
            self.conversation.add(item, previous_item_id=None, param=None, bounded=False)
            output.size = rt.item_size(item)
            added = "conversation.item.created" if self.dialect.beta else "conversation.item.added"
            await self.send({"type": added, "previous_item_id": previous, "item": rt.render_item(item, self.dialect)})
        return output

    async def _text(self, delta: str) -> None:
        output = self.text_output
        if output is None or output.finished:
            item = {"id": rt.new_id("item"), "object": "realtime.item", "type": "message", "status": "in_progress",
                    "role": "assistant", "content": []}
            output = self.text_output = await self._start(item)
            await self.send({"type": "response.content_part.added", "response_id": self.id, "item_id": item["id"],
                             "output_index": output.index, "content_index": 0, "part": {"type": "text", "text": ""}})
        output.parts.append(delta)
        await self.send({"type": self.dialect.text_delta, "response_id": self.id, "item_id": output.item["id"],
                         "output_index": output.index, "content_index": 0, "delta": delta})

    async def _tool_call(self, fragment: dict[str, Any]) -> None:
        index = fragment.get("index", 0)
        function = fragment.get("function") or {}
        output = self.by_tool_index.get(index)
        if output is None:
            if self.text_output is not None and not self.text_output.finished:
                await self._finish(self.text_output, "completed")
            item = {"id": rt.new_id("item"), "object": "realtime.item", "type": "function_call",
                    "status": "in_progress", "call_id": fragment.get("id") or rt.new_id("call"),
                    "name": function.get("name") or "", "arguments": ""}
            output = self.by_tool_index[index] = await self._start(item)
        arguments = function.get("arguments")
        if arguments:
            output.parts.append(arguments)
            await self.send({"type": "response.function_call_arguments.delta", "response_id": self.id,
                             "item_id": output.item["id"], "output_index": output.index,
                             "call_id": output.item["call_id"], "delta": arguments})

    async def _finish(self, output: _Output, status: str) -> None:
        if output.finished:
            return
        output.finished = True
        item, text = output.item, "".join(output.parts)
        item["status"] = status
        base = {"response_id": self.id, "item_id": item["id"], "output_index": output.index}
        if item["type"] == "message":
            item["content"] = [{"type": "output_text", "text": text}]
            await self.send({"type": self.dialect.text_done, **base, "content_index": 0, "text": text})
            await self.send({"type": "response.content_part.done", **base, "content_index": 0,
                             "part": {"type": "text", "text": text}})
        else:
            item["arguments"] = text
            await self.send({"type": "response.function_call_arguments.done", **base, "call_id": item["call_id"],
                             "name": item["name"], "arguments": text})
        if self.params.in_conversation and item["id"] in self.conversation.items:
            self.conversation.resize(item, output.size)
            output.size = rt.item_size(item)
        shown = rt.render_item(item, self.dialect)
        await self.send({"type": "response.output_item.done", "response_id": self.id, "output_index": output.index,
                         "item": shown})
        if self.params.in_conversation and not self.dialect.beta:
            await self.send({"type": "conversation.item.done", "previous_item_id": self._previous(item["id"]),
                             "item": shown})

    def _previous(self, item_id: str) -> str | None:
        order = self.conversation.order
        if item_id not in order:
            return None  # deleted meanwhile
        index = order.index(item_id)
        return order[index - 1] if index > 0 else None

    # The run -----------------------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            chat, _ = parse_chat(self._chat_body(), model_pinned=False)
            stream = await calls.chat_stream(chat, caller=self.caller)
        except asyncio.CancelledError:
            if not self.cancel_requested:
                raise
            _uncancel()
            await self.send({"type": "response.created", "response": self._response_object("in_progress", None, None)})
            await self._end("cancelled", {"type": "cancelled", "reason": "client_cancelled"}, None)
            return
        except ClientGone:
            raise
        except Exception as exc:  # noqa: BLE001 - every refusal is the client's to read, as an error event
            await self._refused(to_api_error(exc, request_id=self.caller.request_id))
            return
        await self._stream(stream)

    async def _refused(self, error: ApiError) -> None:
        for refusal in refusal_events(error, ids=self.ids, client_event_id=self.client_event_id):
            await self._send(refusal)

    async def _stream(self, stream: calls.ChatStream) -> None:
        status, finish = "completed", None
        details: dict[str, Any] | None = None
        try:
            await self.send({"type": "response.created", "response": self._response_object("in_progress", None, None)})
            limits = rate_limits_event(stream.headers, event_id=self.ids.next())
            if limits is not None:
                await self._send(limits)
            async for choices in stream:
                for choice in choices:
                    delta = choice.get("delta") or {}
                    text = delta.get("content") or delta.get("refusal")
                    if text:
                        await self._text(text)
                    for fragment in delta.get("tool_calls") or ():
                        await self._tool_call(fragment)
                    finish = choice.get("finish_reason") or finish
        except asyncio.CancelledError:
            stream.close()
            if not self.cancel_requested:
                raise
            _uncancel()
            status, details = "cancelled", {"type": "cancelled", "reason": "client_cancelled"}
        except ClientGone:
            raise  # the client hung up mid-answer: closed below, settled as its disconnection, charged what it made
        except Exception as exc:  # noqa: BLE001 - the stream settled itself as incomplete; the client learns why
            error = to_api_error(exc, request_id=self.caller.request_id)
            status = "failed"
            details = {"type": "failed", "error": {"type": error.error_type, "code": error.code,
                                                   "message": error.message}}
            await self._send(error_event(error, event_id=self.ids.next(), client_event_id=self.client_event_id))
        finally:
            stream.close()
        if status == "completed" and finish == "length":
            status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        await self._end(status, details, realtime_usage(stream.billed_usage))

    async def _end(self, status: str, details: dict[str, Any] | None, usage: Any) -> None:
        item_status = "completed" if status == "completed" else "incomplete"
        for output in self.outputs:
            await self._finish(output, item_status)
        await self.send({"type": "response.done", "response": self._response_object(status, details, usage)})


def _uncancel() -> None:
    """This task was cancelled by `cancel()`, on purpose, and goes on to say so: forget the cancellation."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
