"""Making any backend's chat output look exactly like OpenAI's, whatever the backend sent.

Upstreams differ: some repeat the role, a tool call's id, type or name on every delta (the SDK's stream
helpers concatenate strings, so clients would see "assistantassistant"), some leave out the tool-call index,
send arguments as an object, or finish a tool call with "stop". The normalizer keeps per-stream state and
rewrites each chunk's choices to the wire format in openai-wire.md. The engine applies it to every answer,
so every surface (REST, Realtime, Responses, agents) starts from the same canonical chunks.
"""

from __future__ import annotations

from typing import Any

import orjson

from platform_site.kernel import ids


def _call_id() -> str:
    return f"call_{ids.token_hex(12)}"


def _arguments_text(arguments: Any) -> str:
    if arguments is None:
        return ""
    if isinstance(arguments, str):
        return arguments
    return orjson.dumps(arguments).decode()


class ChunkNormalizer:
    def __init__(self) -> None:
        self._roles_sent: set[int] = set()
        # (choice index, tool-call index) -> the function name sent so far.
        self._names: dict[tuple[int, int], str] = {}
        self._next_tool_index: dict[int, int] = {}
        self._ids: dict[tuple[int, str], int] = {}

    def frame_choices(self, choices: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for choice in choices:
            index = choice.setdefault("index", 0)
            delta = choice.get("delta") or {}
            choice["delta"] = delta
            choice.setdefault("logprobs", None)
            choice.setdefault("finish_reason", None)
            if delta.get("tool_calls"):
                delta["tool_calls"] = [self._frame_tool_call(index, call) for call in delta["tool_calls"]]
            if index in self._roles_sent:
                delta.pop("role", None)
            else:
                self._roles_sent.add(index)
                delta["role"] = "assistant"
                if delta.get("tool_calls"):
                    delta.setdefault("content", None)
                else:
                    delta.setdefault("content", "")
            if choice["finish_reason"] == "stop" and self._next_tool_index.get(index):
                choice["finish_reason"] = "tool_calls"
        return choices

    def _frame_tool_call(self, choice_index: int, call: dict[str, Any]) -> dict[str, Any]:
        position = call.get("index")
        if not isinstance(position, int):
            # No index: a known id continues its call, a new id starts the next one, and a delta with
            # neither continues the latest call.
            following = self._next_tool_index.get(choice_index, 0)
            call_id = call.get("id")
            if call_id:
                position = self._ids.setdefault((choice_index, call_id), following)
            else:
                position = max(following - 1, 0)
        key = (choice_index, position)
        function = dict(call.get("function") or {})
        if "arguments" in function:
            function["arguments"] = _arguments_text(function["arguments"])
        if key not in self._names:
            self._next_tool_index[choice_index] = max(self._next_tool_index.get(choice_index, 0), position + 1)
            self._names[key] = function.get("name") or ""
            function.setdefault("name", "")
            function.setdefault("arguments", "")
            return {"index": position, "id": call.get("id") or _call_id(), "type": "function", "function": function}
        # Later deltas carry argument fragments only; a name is kept only if it continues a split name.
        name = function.pop("name", None)
        if name and name != self._names[key]:
            self._names[key] += name
            function["name"] = name
        return {"index": position, "function": function}


def normalize_completion(result: dict[str, Any]) -> None:
    """The non-streamed counterpart: string arguments, ids, and `tool_calls` as the finish reason."""
    for choice in result["choices"]:
        choice.setdefault("logprobs", None)
        message = choice.get("message")
        if not isinstance(message, dict):
            continue
        message.setdefault("refusal", None)
        calls = message.get("tool_calls")
        if calls:
            for call in calls:
                call.setdefault("id", _call_id())
                call["type"] = "function"
                function = call.setdefault("function", {})
                function["arguments"] = _arguments_text(function.get("arguments"))
            if choice.get("finish_reason") == "stop":
                choice["finish_reason"] = "tool_calls"
