"""`POST /v1/responses` bodies: checked once, with errors naming the field as the client wrote it.

What the Responses API adds over chat (items, flat tools, `text.format`, chaining, storage) is checked here;
what it shares with chat (content parts, schemas, sampling ranges, the gateway's `models` and `provider`)
is checked by parse_chat on the chat body built from it, whose errors `ParamMap` renames. A field this
module does not know goes on to the chat body, where the engine treats it as on chat: refused with 400
`unknown_parameter` unless a deployment's operator allowed it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from completions.api.items import invalid_type, invalid_value, parse_input, reject_unknown
from completions.api.requests import CHAT_FIELDS, check_integer, check_number, validate_metadata, validate_schema
from platform_site.kernel.errors import ApiError

# Fields of CreateResponse that are accepted and shown back, and change nothing Keyway does.
_PASSIVE = frozenset({"service_tier", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
                      "safety_identifier", "moderation", "stream_options"})
_KNOWN = frozenset({
    "model", "input", "instructions", "previous_response_id", "conversation", "store", "background", "stream",
    "tools", "tool_choice", "parallel_tool_calls", "text", "max_output_tokens", "max_tool_calls", "temperature",
    "top_p", "top_logprobs", "metadata", "truncation", "include", "reasoning", "user", "prompt",
    "context_management", *_PASSIVE,
})
# Gateway fields (the model fallbacks and provider preferences of chat) go to the chat body as they are.
_GATEWAY = frozenset({"models", "provider"})
INCLUDE_VALUES = (
    "file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
    "message.input_image.image_url", "computer_call_output.output.image_url", "code_interpreter_call.outputs",
    "reasoning.encrypted_content", "message.output_text.logprobs",
)
MAX_TOOLS = 128
_TOOL_FIELDS = frozenset({"type", "name", "description", "parameters", "strict"})
_TEXT_FIELDS = frozenset({"format", "verbosity"})
_FORMAT_FIELDS = frozenset({"type", "name", "schema", "strict", "description"})
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(slots=True)
class CreateRequest:
    """A checked `POST /v1/responses`: what the chat call needs, and what the Response object shows back."""

    model: str | None
    input: list[dict[str, Any]] | None
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation_id: str | None = None
    store: bool = True
    background: bool = False
    stream: bool = False
    # As the client sent them (flat function tools), for the Response object.
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] = field(default_factory=lambda: {"format": {"type": "text"}, "verbosity": "medium"})
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    logprobs: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    truncation: str = "disabled"
    reasoning_effort: str | None = None
    user: str | None = None
    passive: dict[str, Any] = field(default_factory=dict)
    # For the chat body: the gateway's fields and the unknown ones.
    passthrough: dict[str, Any] = field(default_factory=dict)

    @property
    def streamed(self) -> bool:
        """Whether the chat call streams: for a streamed or a background response (whose progress is read
        while it runs); a plain one is answered whole, which costs less."""
        return self.stream or self.background

    def chat_body(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The one chat call this response makes."""
        body: dict[str, Any] = {"messages": messages, **self.passthrough}
        if self.streamed:
            body.update(stream=True, stream_options={"include_usage": True})
        if self.model is not None:
            body["model"] = self.model
        tools, choice = _chat_tools(self.tools, self.tool_choice)
        if tools and choice != "none":
            body["tools"] = tools
            body["tool_choice"] = choice
            if not self.parallel_tool_calls or self.max_tool_calls == 1:
                body["parallel_tool_calls"] = False
        text_format = self.text["format"]
        if text_format["type"] == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif text_format["type"] == "json_schema":
            spec = {name: text_format[name] for name in ("name", "schema", "strict", "description")
                    if text_format.get(name) is not None}
            body["response_format"] = {"type": "json_schema", "json_schema": spec}
        for name, value in (("max_tokens", self.max_output_tokens), ("temperature", self.temperature),
                            ("top_p", self.top_p), ("user", self.user)):
            if value is not None:
                body[name] = value
        if self.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs or 0
        if self.reasoning_effort is not None:
            body["reasoning_effort"] = self.reasoning_effort
        return body


def _chat_tools(tools: list[dict[str, Any]], choice: str | dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    if isinstance(choice, dict) and choice["type"] == "allowed_tools":
        allowed = {tool["name"] for tool in choice["tools"]}
        tools = [tool for tool in tools if tool["name"] in allowed]
        choice = choice["mode"]
    chat_tools = [
        {"type": "function", "function": {name: tool[name] for name in ("name", "description", "parameters", "strict")
                                          if tool.get(name) is not None}}
        for tool in tools
    ]
    if isinstance(choice, dict):
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return chat_tools, choice


def _optional_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid_type(name, "a boolean", value)
    return value


def _optional_string(body: dict[str, Any], name: str, *, limit: int | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid_type(name, "a string", value)
    if limit is not None and len(value) > limit:
        raise ApiError(f"Invalid '{name}': string too long. Expected a string with maximum length {limit}, but got "
                       f"a string with length {len(value)} instead.", param=name, code="string_above_max_length")
    return value


def _id(value: str | None, param: str) -> str | None:
    if value is not None and not _ID.match(value):
        raise ApiError(f"Invalid '{param}': '{value[:64]}' is not an id.", param=param, code="invalid_value")
    return value


def _tools(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise invalid_type("tools", "an array", raw)
    if len(raw) > MAX_TOOLS:
        raise ApiError(f"'tools' may hold at most {MAX_TOOLS} tools; got {len(raw)}.", param="tools",
                       code="array_above_max_length")
    tools = []
    names: set[str] = set()
    for index, tool in enumerate(raw):
        param = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise invalid_type(param, "an object", tool)
        kind = tool.get("type")
        if kind != "function":
            shown = kind[:64] if isinstance(kind, str) else kind
            raise ApiError(f"Tools of type {shown!r} are not supported here; only 'function' tools are.",
                           param=f"{param}.type", code="unsupported_tool")
        reject_unknown(tool, _TOOL_FIELDS, param)
        name = tool.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ApiError(f"Invalid '{param}.name': use 1 to 64 letters, digits, underscores or dashes.",
                           param=f"{param}.name", code="invalid_value")
        if name in names:
            raise ApiError(f"Duplicate tool name '{name}' in 'tools'.", param=f"{param}.name", code="invalid_value")
        names.add(name)
        parameters = tool.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise invalid_type(f"{param}.parameters", "a JSON Schema object", parameters)
            validate_schema(parameters, f"{param}.parameters")
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid_type(f"{param}.description", "a string", description)
        strict = tool.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise invalid_type(f"{param}.strict", "a boolean", strict)
        tools.append({"type": "function", "name": name, "description": description, "parameters": parameters,
                      "strict": True if strict is None else strict})
    return tools


def _tool_choice(raw: Any, tools: list[dict[str, Any]]) -> str | dict[str, Any]:
    names = {tool["name"] for tool in tools}
    if raw is None:
        return "auto"
    if isinstance(raw, str):
        if raw not in ("none", "auto", "required"):
            raise invalid_value("tool_choice", raw, ("none", "auto", "required"))
        if raw == "required" and not tools:
            raise ApiError("'tool_choice' is 'required' but no 'tools' were given.", param="tool_choice",
                           code="invalid_value")
        return raw
    if not isinstance(raw, dict):
        raise invalid_type("tool_choice", "a string or an object", raw)
    kind = raw.get("type")
    if kind == "function":
        name = raw.get("name")
        if name not in names:
            raise ApiError(f"'tool_choice' names the function {str(name)[:64]!r}, which is not among 'tools'.",
                           param="tool_choice.name", code="invalid_value")
        return {"type": "function", "name": name}
    if kind == "allowed_tools":
        mode = raw.get("mode")
        if mode not in ("auto", "required"):
            raise invalid_value("tool_choice.mode", mode, ("auto", "required"))
        listed = raw.get("tools")
        if not isinstance(listed, list) or not listed:
            raise invalid_type("tool_choice.tools", "a non-empty array of tools", listed)
        chosen = []
        for index, entry in enumerate(listed):
            if not isinstance(entry, dict) or entry.get("type") != "function" or entry.get("name") not in names:
                raise ApiError(f"'tool_choice.tools[{index}]' must name a function among 'tools'.",
                               param=f"tool_choice.tools[{index}]", code="invalid_value")
            chosen.append({"type": "function", "name": entry["name"]})
        return {"type": "allowed_tools", "mode": mode, "tools": chosen}
    raise ApiError(f"'tool_choice' of type {str(kind)[:64]!r} is not supported here; use 'none', 'auto', "
                   "'required', a function or 'allowed_tools'.", param="tool_choice.type", code="unsupported_tool")


def _text(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {"format": {"type": "text"}, "verbosity": "medium"}
    if not isinstance(raw, dict):
        raise invalid_type("text", "an object", raw)
    reject_unknown(raw, _TEXT_FIELDS, "text")
    verbosity = raw.get("verbosity") or "medium"
    if verbosity not in ("low", "medium", "high"):
        raise invalid_value("text.verbosity", verbosity, ("low", "medium", "high"))
    fmt = raw.get("format")
    if fmt is None:
        return {"format": {"type": "text"}, "verbosity": verbosity}
    if not isinstance(fmt, dict):
        raise invalid_type("text.format", "an object", fmt)
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"format": {"type": kind}, "verbosity": verbosity}
    if kind != "json_schema":
        raise invalid_value("text.format.type", kind, ("text", "json_object", "json_schema"))
    reject_unknown(fmt, _FORMAT_FIELDS, "text.format")
    name = fmt.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ApiError("Invalid 'text.format.name': use 1 to 64 letters, digits, underscores or dashes.",
                       param="text.format.name", code="invalid_value" if name is not None else
                       "missing_required_parameter")
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise ApiError("Missing required parameter: 'text.format.schema' (a JSON Schema object).",
                       param="text.format.schema", code="missing_required_parameter" if schema is None else
                       "invalid_type")
    validate_schema(schema, "text.format.schema")
    strict = fmt.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid_type("text.format.strict", "a boolean", strict)
    description = fmt.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid_type("text.format.description", "a string", description)
    shown: dict[str, Any] = {"type": "json_schema", "name": name, "schema": schema, "strict": bool(strict)}
    if description is not None:
        shown["description"] = description
    return {"format": shown, "verbosity": verbosity}


def _conversation(raw: Any) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, dict):
        if not isinstance(raw.get("id"), str):
            raise invalid_type("conversation.id", "a string", raw.get("id"))
        return _id(raw["id"], "conversation.id")
    if not isinstance(raw, str):
        raise invalid_type("conversation", "a string or an object with an 'id'", raw)
    return _id(raw, "conversation")


def _include(raw: Any) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise invalid_type("include", "an array", raw)
    for index, value in enumerate(raw):
        if value not in INCLUDE_VALUES:
            raise invalid_value(f"include[{index}]", value, INCLUDE_VALUES)
    return list(raw)


def _reasoning(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise invalid_type("reasoning", "an object", raw)
    effort = raw.get("effort")
    if effort is not None and effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
        raise invalid_value("reasoning.effort", effort, ("none", "minimal", "low", "medium", "high", "xhigh"))
    return effort if isinstance(effort, str) else None


def parse_create(body: dict[str, Any]) -> CreateRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid_type("model", "a string", model)
    raw_input = body.get("input")
    tools = _tools(body.get("tools"))
    request = CreateRequest(
        model=model or None,
        input=parse_input(raw_input) if raw_input is not None else None,
        instructions=_optional_string(body, "instructions"),
        previous_response_id=_id(_optional_string(body, "previous_response_id", limit=64), "previous_response_id"),
        conversation_id=_conversation(body.get("conversation")),
        store=_optional_bool(body, "store", True),
        background=_optional_bool(body, "background", False),
        stream=_optional_bool(body, "stream", False),
        tools=tools,
        tool_choice=_tool_choice(body.get("tool_choice"), tools),
        parallel_tool_calls=_optional_bool(body, "parallel_tool_calls", True),
        text=_text(body.get("text")),
        reasoning_effort=_reasoning(body.get("reasoning")),
        user=_optional_string(body, "user", limit=256),
    )
    if request.previous_response_id and request.conversation_id:
        raise ApiError("Mutually exclusive parameters: provide 'previous_response_id' or 'conversation', not both.",
                       param="conversation", code="mutually_exclusive_parameters")
    if request.background and not request.store:
        raise ApiError("A background response must be stored: 'background' needs 'store' to be true.",
                       param="background", code="invalid_value")
    max_output = body.get("max_output_tokens")
    if max_output is not None:
        if isinstance(max_output, bool) or not isinstance(max_output, int):
            raise invalid_type("max_output_tokens", "an integer", max_output)
        if max_output < 16:
            raise ApiError(f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 16, but "
                           f"got {max_output} instead.", param="max_output_tokens", code="integer_below_min_value")
        request.max_output_tokens = max_output
    check_integer(body, "max_tool_calls", 1, 1024)
    request.max_tool_calls = body.get("max_tool_calls")
    check_number(body, "temperature", 0, 2)
    check_number(body, "top_p", 0, 1)
    check_integer(body, "top_logprobs", 0, 20)
    request.temperature, request.top_p = body.get("temperature"), body.get("top_p")
    request.top_logprobs = body.get("top_logprobs")
    request.logprobs = "message.output_text.logprobs" in _include(body.get("include"))
    validate_metadata(body.get("metadata"))
    request.metadata = body.get("metadata") or {}
    truncation = body.get("truncation") or "disabled"
    if truncation not in ("auto", "disabled"):
        raise invalid_value("truncation", truncation, ("auto", "disabled"))
    request.truncation = truncation
    if body.get("prompt") is not None:
        raise ApiError("Stored prompts are not supported here; send 'instructions' and 'input'.", param="prompt",
                       code="unsupported_parameter")
    if body.get("context_management") is not None:
        raise ApiError("'context_management' is not supported here; use 'truncation'.", param="context_management",
                       code="unsupported_parameter")
    if body.get("stream_options") is not None and not request.stream:
        raise ApiError("'stream_options' is only allowed when 'stream' is true.", param="stream_options",
                       code="invalid_value")
    request.passive = {name: body[name] for name in _PASSIVE if body.get(name) is not None}
    safety = request.passive.get("safety_identifier")
    if safety is not None and (not isinstance(safety, str) or len(safety) > 64):
        raise ApiError("'safety_identifier' must be a string of at most 64 characters.", param="safety_identifier",
                       code="invalid_value")
    _optional_string(body, "prompt_cache_key", limit=1024)
    for name, choices in (("service_tier", ("auto", "default", "flex", "scale", "priority")),
                          ("prompt_cache_retention", ("in_memory", "24h"))):
        if body.get(name) is not None and body[name] not in choices:
            raise invalid_value(name, body[name], choices)
    request.passthrough = {name: value for name, value in body.items() if name not in _KNOWN}
    # A chat field is not a Responses field: it must not reach the chat body under its chat meaning.
    for name in request.passthrough:
        if name in CHAT_FIELDS:
            raise ApiError(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")
    return request
