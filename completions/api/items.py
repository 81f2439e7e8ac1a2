"""Items of the Responses and Conversations APIs: checked on the way in, stored in one canonical form, and
turned into the chat messages the engine's one call takes.

Stored forms (what GET input_items and conversation items return, with ids):
- message: {"type": "message", "id", "status", "role", "content": [parts]}; a user, system or developer
  message holds input_text / input_image / input_file parts, an assistant's output_text or refusal parts;
- function_call: {"type": "function_call", "id", "call_id", "name", "arguments", "status"};
- function_call_output: {"type": "function_call_output", "id", "call_id", "output", "status"}, the output a
  string or an array of input parts.

Errors name the field as the client wrote it (`input[2].content[0].image_url`). Where a check runs later on
the chat form (content parts, in parse_chat or while fetching an image), `ParamMap` turns the chat path it
names (`messages[3].content[0].image_url.url`) back into that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from platform_site.kernel import ids
from platform_site.kernel.errors import ApiError

_ITEM_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ITEM_TYPES = ("message", "function_call", "function_call_output", "item_reference")
MESSAGE_ROLES = ("user", "assistant", "system", "developer")
_INPUT_PARTS = ("input_text", "input_image", "input_file")
_ASSISTANT_PARTS = ("output_text", "refusal", "input_text")
_DETAILS = ("auto", "low", "high")
_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{ids.token_hex(20)}"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), "a value")


def invalid_type(param: str, expected: str, value: Any) -> ApiError:
    return ApiError(f"Invalid type for '{param}': expected {expected}, but got {_kind(value)}.", param=param,
                    code="invalid_type")


def invalid_value(param: str, value: Any, supported: tuple[str, ...]) -> ApiError:
    shown = ", ".join(f"'{choice}'" for choice in supported)
    return ApiError(f"Invalid value: {str(value)[:100]!r}. Supported values are: {shown}.", param=param,
                    code="invalid_value")


def _string(value: Any, param: str, *, limit: int | None = None) -> str:
    if not isinstance(value, str):
        raise invalid_type(param, "a string", value)
    if limit is not None and len(value) > limit:
        raise ApiError(f"Invalid '{param}': string too long. Expected a string with maximum length {limit}, but "
                       f"got a string with length {len(value)} instead.", param=param,
                       code="string_above_max_length")
    return value


def reject_unknown(item: dict[str, Any], known: frozenset[str], param: str) -> None:
    for name in item:
        if name not in known:
            raise ApiError(f"Unknown parameter: '{param}.{name}'.", param=f"{param}.{name}", code="unknown_parameter")


def _item_id(item: dict[str, Any], kind: str, param: str) -> str:
    given = item.get("id")
    if given is None:
        return new_id(_ID_PREFIX[kind])
    if not isinstance(given, str) or not _ITEM_ID.match(given):
        raise ApiError(f"Invalid '{param}.id': use 1 to 64 letters, digits, underscores or dashes.",
                       param=f"{param}.id", code="invalid_value")
    return given


_PART_FIELDS = {
    "input_text": frozenset({"type", "text", "prompt_cache_breakpoint"}),
    "input_image": frozenset({"type", "image_url", "file_id", "detail", "prompt_cache_breakpoint"}),
    "input_file": frozenset({"type", "file_data", "filename", "file_id", "file_url", "detail",
                             "prompt_cache_breakpoint"}),
    "output_text": frozenset({"type", "text", "annotations", "logprobs"}),
    "refusal": frozenset({"type", "refusal"}),
}


def _unsupported(message: str, param: str) -> ApiError:
    return ApiError(message, param=param, code="unsupported_parameter")


def _part(raw: Any, param: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise invalid_type(param, "an object", raw)
    kind = raw.get("type")
    if kind not in allowed:
        raise invalid_value(f"{param}.type", kind, allowed)
    reject_unknown(raw, _PART_FIELDS[kind], param)
    if kind == "input_text":
        return {"type": "input_text", "text": _string(raw.get("text"), f"{param}.text")}
    if kind == "output_text":
        return {"type": "output_text", "text": _string(raw.get("text"), f"{param}.text"), "annotations": [],
                "logprobs": []}
    if kind == "refusal":
        return {"type": "refusal", "refusal": _string(raw.get("refusal"), f"{param}.refusal")}
    if raw.get("file_id") is not None:
        raise _unsupported("File ids are not supported here (there is no Files API): send the content inline.",
                           f"{param}.file_id")
    if kind == "input_image":
        detail = raw.get("detail", "auto") or "auto"
        if detail not in _DETAILS:
            raise invalid_value(f"{param}.detail", detail, _DETAILS)
        url = raw.get("image_url")
        if url is None:
            raise ApiError(f"Missing required parameter: '{param}.image_url'.", param=f"{param}.image_url",
                           code="missing_required_parameter")
        return {"type": "input_image", "image_url": _string(url, f"{param}.image_url"), "detail": detail}
    if raw.get("file_url") is not None:
        raise _unsupported("'file_url' is not supported here: send the file inline as 'file_data'.",
                           f"{param}.file_url")
    data = raw.get("file_data")
    if data is None:
        raise ApiError(f"Missing required parameter: '{param}.file_data'.", param=f"{param}.file_data",
                       code="missing_required_parameter")
    part = {"type": "input_file", "file_data": _string(data, f"{param}.file_data")}
    if raw.get("filename") is not None:
        part["filename"] = _string(raw["filename"], f"{param}.filename", limit=256)
    return part


def _message(raw: dict[str, Any], param: str) -> dict[str, Any]:
    reject_unknown(raw, frozenset({"type", "id", "role", "content", "status", "phase"}), param)
    role = raw.get("role")
    if role not in MESSAGE_ROLES:
        raise invalid_value(f"{param}.role", role, MESSAGE_ROLES)
    content = raw.get("content")
    if isinstance(content, str):
        parts = [{"type": "output_text", "text": content, "annotations": [], "logprobs": []} if role == "assistant"
                 else {"type": "input_text", "text": content}]
    elif isinstance(content, list):
        allowed = _ASSISTANT_PARTS if role == "assistant" else _INPUT_PARTS
        parts = [_part(part, f"{param}.content[{index}]", allowed) for index, part in enumerate(content)]
        if role == "assistant":
            # An assistant's text is output text, however the client labelled it.
            parts = [{"type": "output_text", "text": p["text"], "annotations": [], "logprobs": []}
                     if p["type"] == "input_text" else p for p in parts]
    else:
        raise invalid_type(f"{param}.content", "a string or an array of content parts", content)
    return {"type": "message", "id": _item_id(raw, "message", param), "status": "completed", "role": role,
            "content": parts}


def parse_item(raw: Any, param: str, *, references: bool = True) -> dict[str, Any]:
    """One input item in its stored form; an `item_reference` stays one, for the caller to resolve."""
    if not isinstance(raw, dict):
        raise invalid_type(param, "an object", raw)
    kind = raw.get("type", "message" if "role" in raw else None)
    if kind == "item_reference" and references:
        reject_unknown(raw, frozenset({"type", "id"}), param)
        return {"type": "item_reference", "id": _string(raw.get("id"), f"{param}.id", limit=64)}
    if kind not in ITEM_TYPES or kind == "item_reference":
        supported = ITEM_TYPES if references else ITEM_TYPES[:3]
        if isinstance(kind, str) and kind:
            raise ApiError(f"Items of type '{kind[:64]}' are not supported here. Supported: "
                           f"{', '.join(supported)}.", param=f"{param}.type", code="unsupported_item_type")
        raise invalid_value(f"{param}.type", kind, supported)
    if kind == "message":
        return _message(raw, param)
    if kind == "function_call":
        reject_unknown(raw, frozenset({"type", "id", "call_id", "name", "arguments", "status", "namespace"}), param)
        return {"type": "function_call", "id": _item_id(raw, kind, param),
                "call_id": _string(raw.get("call_id"), f"{param}.call_id", limit=64),
                "name": _string(raw.get("name"), f"{param}.name", limit=128),
                "arguments": _string(raw.get("arguments"), f"{param}.arguments"), "status": "completed"}
    reject_unknown(raw, frozenset({"type", "id", "call_id", "output", "status", "name", "namespace"}), param)
    output = raw.get("output")
    if isinstance(output, list):
        output = [_part(part, f"{param}.output[{index}]", _INPUT_PARTS) for index, part in enumerate(output)]
    elif not isinstance(output, str):
        raise invalid_type(f"{param}.output", "a string or an array of content parts", output)
    return {"type": "function_call_output", "id": _item_id(raw, kind, param),
            "call_id": _string(raw.get("call_id"), f"{param}.call_id", limit=64), "output": output,
            "status": "completed"}


def parse_input(value: Any, param: str = "input") -> list[dict[str, Any]]:
    """A Responses `input`: a string (one user message) or an array of items."""
    if isinstance(value, str):
        return [{"type": "message", "id": new_id("msg"), "status": "completed", "role": "user",
                 "content": [{"type": "input_text", "text": value}]}]
    if not isinstance(value, list):
        raise invalid_type(param, "a string or an array of input items", value)
    return [parse_item(raw, f"{param}[{index}]") for index, raw in enumerate(value)]


# Chat form ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ParamMap:
    """Where each chat message came from: the client's path of the item (None for an earlier item that came
    from a previous response or the conversation, named by `context_param`), and for each chat content part
    the index of the part it was made from."""

    origins: list[tuple[str | None, list[int]]] = field(default_factory=list)
    context_param: str | None = None

    _CHAT_PATH = re.compile(r"^messages\[(\d+)\](?:\.content\[(\d+)\])?(.*)$")
    _SUFFIXES = ((".image_url.url", ".image_url"), (".image_url.detail", ".detail"), (".file.file_data", ".file_data"))

    def client_param(self, param: str | None) -> str | None:
        if param is None:
            return None
        match = self._CHAT_PATH.match(param)
        if match is None:
            return _FIELD_PARAMS.get(param) or _translate_field(param)
        index, part, rest = int(match[1]), match[2], match[3]
        if index >= len(self.origins):
            return "input"
        prefix, parts = self.origins[index]
        if prefix is None:
            return self.context_param
        for chat_suffix, client_suffix in self._SUFFIXES:
            if rest.startswith(chat_suffix):
                rest = client_suffix + rest[len(chat_suffix):]
        if part is None or prefix == "instructions":
            return prefix if prefix == "instructions" else prefix + rest
        position = int(part)
        original = parts[position] if position < len(parts) else position
        return f"{prefix}[{original}]{rest}" if prefix.endswith(".output") else f"{prefix}.content[{original}]{rest}"

    def translate(self, error: ApiError) -> ApiError:
        error.param = self.client_param(error.param)
        return error


_FIELD_PARAMS = {
    "messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format", "response_format.type": "text.format.type",
    "response_format.json_schema.name": "text.format.name", "response_format.json_schema.schema": "text.format.schema",
    "reasoning_effort": "reasoning.effort", "logprobs": "top_logprobs",
}
_TOOL_PATH = re.compile(r"^tools\[(\d+)\]\.function\.(.*)$")


def _translate_field(param: str) -> str:
    match = _TOOL_PATH.match(param)
    if match is not None:
        return f"tools[{match[1]}].{match[2]}"
    if param.startswith("response_format.json_schema."):
        return "text.format." + param.removeprefix("response_format.json_schema.")
    return param


def _chat_part(part: dict[str, Any]) -> dict[str, Any]:
    kind = part["type"]
    if kind == "input_text":
        return {"type": "text", "text": part["text"]}
    if kind == "input_image":
        return {"type": "image_url", "image_url": {"url": part["image_url"], "detail": part["detail"]}}
    file = {"file_data": part["file_data"]}
    if part.get("filename"):
        file["filename"] = part["filename"]
    return {"type": "file", "file": file}


def chat_messages(
    instructions: str | None, items: list[dict[str, Any]], origins: list[str | None]
) -> tuple[list[dict[str, Any]], ParamMap]:
    """Items as chat messages: instructions first (as a system message), an assistant's function calls as its
    tool calls (consecutive ones in one message), their outputs as tool messages (images or files an output
    holds follow it in a user message). `origins[i]` is the client's path of items[i], or None."""
    messages: list[dict[str, Any]] = []
    params = ParamMap()
    if instructions:
        messages.append({"role": "system", "content": instructions})
        params.origins.append(("instructions", []))
    for item, origin in zip(items, origins, strict=True):
        kind = item["type"]
        if kind == "message":
            role = item["role"]
            if role == "assistant":
                text = "".join(p["text"] for p in item["content"] if p["type"] == "output_text")
                refusal = "".join(p["refusal"] for p in item["content"] if p["type"] == "refusal")
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if refusal:
                    message["refusal"] = refusal
                messages.append(message)
                params.origins.append((origin, []))
            else:
                messages.append({"role": role, "content": [_chat_part(p) for p in item["content"]]})
                params.origins.append((origin, list(range(len(item["content"])))))
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and ("tool_calls" in last or not last["content"]):
                last.setdefault("tool_calls", []).append(call)
                if not last["content"]:
                    last["content"] = None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                params.origins.append((origin, []))
        else:
            output = item["output"]
            if isinstance(output, str):
                messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
                params.origins.append((origin, []))
                continue
            text = "".join(p["text"] for p in output if p["type"] == "input_text")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
            params.origins.append((origin, []))
            media = [(index, p) for index, p in enumerate(output) if p["type"] != "input_text"]
            if media:
                messages.append({"role": "user", "content": [_chat_part(p) for _, p in media]})
                params.origins.append((f"{origin}.output" if origin else None, [index for index, _ in media]))
    return messages, params


def item_text_size(item: dict[str, Any]) -> int:
    """Bytes of text an item puts before the model (what `truncation: auto` weighs)."""
    if item["type"] == "message":
        return sum(len(p.get("text") or p.get("refusal") or "") + (1024 if p["type"] != "input_text" else 0)
                   for p in item["content"])
    if item["type"] == "function_call":
        return len(item["name"]) + len(item["arguments"])
    output = item["output"]
    return len(output) if isinstance(output, str) else sum(len(p.get("text", "")) + 1024 for p in output)
