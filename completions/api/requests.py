"""Parsing of the REST API's request bodies into the engine's typed requests (completions.engine.requests).

Each body is checked once, here, with OpenAI's error shape and `param` naming the offending field; nothing
downstream looks at the raw dict again. Only known fields go upstream: each endpoint has an allow-list, and
any other field is kept aside for the deployments whose operator allowed it (or refused with 400
`unknown_parameter` by the engine, which knows the deployments).

Hand-written rather than DRF serializers or pydantic, measured on a typical chat body (bench/parse_bench.py,
this machine): this parser 28–42 µs of CPU per body, a DRF serializer holding a subset of the same rules
0.9–1.1 ms (most of the 1.5 ms budget of a whole proxied request), a pydantic model of that subset 14–17 µs.
Pydantic would save about 1% of the budget, but its errors name fields and constraints in its own words:
OpenAI's exact messages, params and codes would have to be rebuilt from them, for every rule, anyway.
"""

from __future__ import annotations

import re
from typing import Any

from completions.api.content import CAPABILITY_OF_PART, ContentReport, inspect_content
from completions.engine.requests import ChatRequest, EmbeddingsRequest, InputNeed, Preferences
from platform_site.kernel.errors import ApiError

# The chat fields Keyway implements on every provider (the embedded model included), and its own routing
# fields. Anything else (top_k, min_p, service_tier, logit_bias, …) an operator may allow per deployment.
CHAT_FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "temperature", "top_p", "n", "stop", "max_tokens",
    "max_completion_tokens", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "seed",
    "tools", "tool_choice", "parallel_tool_calls", "response_format", "metadata", "user",
})
EMBEDDINGS_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
# Fields that steer the gateway and mean nothing (or an error) to an upstream.
GATEWAY_FIELDS = frozenset({"provider", "models"})

ROLES = frozenset({"developer", "system", "user", "assistant", "tool", "function"})


def _invalid(message: str, param: str) -> ApiError:
    return ApiError(message, param=param, code="invalid_value")


def check_number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(f"'{name}' must be a number.", param=name, code="invalid_type")
    if not low <= value <= high:
        raise _invalid(f"'{name}' must be between {low:g} and {high:g}; got {value}.", name)


def _validate_chat(body: dict[str, Any], *, model_required: bool) -> None:
    fallbacks = body.get("models")
    if fallbacks is not None and (
        not isinstance(fallbacks, list)
        or not 1 <= len(fallbacks) <= 10
        or not all(isinstance(name, str) and name for name in fallbacks)
    ):
        raise ApiError("'models' must be an array of 1 to 10 model ids.", param="models", code="invalid_type")
    model = body.get("model")
    if model_required and (not isinstance(model, str) or not model):
        raise ApiError("you must provide a model parameter", param="model", code="missing_required_parameter")
    if model is not None and not isinstance(model, str):
        raise ApiError("'model' must be a string.", param="model", code="invalid_type")
    messages = body.get("messages")
    if messages is None:
        raise ApiError("Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list):
        raise ApiError("'messages' must be an array.", param="messages", code="invalid_type")
    if not messages:
        raise ApiError("'messages' must contain at least one message.", param="messages", code="empty_array")
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(f"'{param}' must be an object.", param=param, code="invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise _invalid(
                f"Invalid value for '{param}.role': {role!r}. Supported values are: "
                "'system', 'assistant', 'user', 'tool', 'function' and 'developer'.",
                f"{param}.role",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise ApiError(f"'{param}.content' must be a string or an array of parts.", param=f"{param}.content",
                           code="invalid_type")
        if role == "tool" and not message.get("tool_call_id"):
            raise ApiError(
                f"Missing required parameter: '{param}.tool_call_id'.",
                param=f"{param}.tool_call_id",
                code="missing_required_parameter",
            )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError("'stream' must be a boolean.", param="stream", code="invalid_type")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise ApiError("'stream_options' must be an object.", param="stream_options", code="invalid_type")
    check_number(body, "temperature", 0, 2)
    check_number(body, "top_p", 0, 1)
    check_number(body, "presence_penalty", -2, 2)
    check_number(body, "frequency_penalty", -2, 2)
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise _invalid(f"'{name}' must be a positive integer; got {value!r}.", name)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError("'seed' must be an integer.", param="seed", code="invalid_type")
    _validate_choices_and_logprobs(body)
    validate_metadata(body.get("metadata"))
    if stream_options is not None and not stream:
        raise _invalid("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    _validate_response_format(body.get("response_format"))
    _validate_tools(body)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, list):
            if len(stop) > 4:
                raise _invalid("'stop' may hold at most 4 sequences.", "stop")
            if not all(isinstance(item, str) for item in stop):
                raise ApiError("'stop' must be a string or an array of strings.", param="stop", code="invalid_type")
        elif not isinstance(stop, str):
            raise ApiError("'stop' must be a string or an array of strings.", param="stop", code="invalid_type")


def check_integer(body: dict[str, Any], name: str, low: int, high: int) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"'{name}' must be an integer.", param=name, code="invalid_type")
    if not low <= value <= high:
        raise _invalid(f"'{name}' must be between {low} and {high}; got {value}.", name)


def _validate_choices_and_logprobs(body: dict[str, Any]) -> None:
    check_integer(body, "n", 1, 128)
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ApiError("'logprobs' must be a boolean.", param="logprobs", code="invalid_type")
    check_integer(body, "top_logprobs", 0, 20)
    if body.get("top_logprobs") is not None and not logprobs:
        raise _invalid("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")


def validate_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise ApiError("'metadata' must be an object of strings.", param="metadata", code="invalid_type")
    if len(metadata) > 16:
        raise _invalid(f"'metadata' may hold at most 16 pairs; got {len(metadata)}.", "metadata")
    for key, value in metadata.items():
        if len(key) > 64:
            raise _invalid(f"'metadata' keys may be at most 64 characters; {key[:20]!r}… is {len(key)}.", "metadata")
        if not isinstance(value, str) or len(value) > 512:
            raise _invalid(f"'metadata.{key}' must be a string of at most 512 characters.", "metadata")


def _validate_response_format(response_format: Any) -> None:
    if response_format is None:
        return
    if not isinstance(response_format, dict):
        raise ApiError("'response_format' must be an object.", param="response_format", code="invalid_type")
    kind = response_format.get("type")
    if kind in ("text", "json_object"):
        return
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ApiError(
                "Missing required parameter: 'response_format.json_schema.name'.",
                param="response_format.json_schema.name",
                code="missing_required_parameter",
            )
        if spec.get("schema") is not None and not isinstance(spec["schema"], dict):
            raise ApiError("'response_format.json_schema.schema' must be an object.",
                           param="response_format.json_schema.schema", code="invalid_type")
        if spec.get("schema"):
            validate_schema(spec["schema"], "response_format.json_schema.schema")
        return
    if kind == "json":
        # Seed 002's legacy form: {"type": "json", "schema"?, "name"?, "description"?}.
        if response_format.get("schema") is not None and not isinstance(response_format["schema"], dict):
            raise ApiError("'response_format.schema' must be an object.", param="response_format.schema",
                           code="invalid_type")
        if response_format.get("schema"):
            validate_schema(response_format["schema"], "response_format.schema")
        return
    raise _invalid(
        f"Invalid value for 'response_format.type': {kind!r}. Supported: 'text', 'json_object', 'json_schema'.",
        "response_format.type",
    )


_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# Bounds of a JSON Schema a tenant sends (tool parameters, response_format): the embedded model compiles it
# into a grammar on the generation thread that every tenant shares, and a deep or wide schema, or a large
# repetition count (which the grammar spells out), made that take minutes. OpenAI's structured outputs allow
# 10 levels of object nesting and 5,000 properties; a level is two or three JSON containers deep.
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_NODES = 5_000
MAX_SCHEMA_REPETITION = 256
_REPETITION_KEYWORDS = frozenset(
    {"minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties", "minContains", "maxContains"}
)


def validate_schema(schema: dict[str, Any], param: str) -> None:
    """A schema's depth, size and repetition counts, without recursion (a deep one must not blow the stack)."""
    nodes = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if depth > MAX_SCHEMA_DEPTH:
            raise _invalid(f"'{param}' is nested more than {MAX_SCHEMA_DEPTH} levels deep.", param)
        if nodes > MAX_SCHEMA_NODES:
            raise _invalid(f"'{param}' has more than {MAX_SCHEMA_NODES} parts.", param)
        if isinstance(node, dict):
            for name, value in node.items():
                if name in _REPETITION_KEYWORDS and isinstance(value, int | float) and value > MAX_SCHEMA_REPETITION:
                    raise _invalid(f"'{param}' sets {name} to {value}; the most this server allows is "
                                   f"{MAX_SCHEMA_REPETITION}.", param)
                if isinstance(value, dict | list):
                    stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node if isinstance(value, dict | list))


def _validate_tools(body: dict[str, Any]) -> None:
    tools = body.get("tools")
    names: set[str] = set()
    if tools is not None:
        if not isinstance(tools, list):
            raise ApiError("'tools' must be an array.", param="tools", code="invalid_type")
        for index, tool in enumerate(tools):
            param = f"tools[{index}]"
            is_function = isinstance(tool, dict) and tool.get("type") == "function"
            if not is_function or not isinstance(tool.get("function"), dict):
                raise _invalid(f"'{param}' must be {{'type': 'function', 'function': {{...}}}}.", param)
            name = tool["function"].get("name")
            if not isinstance(name, str) or not _TOOL_NAME.match(name):
                raise _invalid(
                    f"'{param}.function.name' must be 1-64 characters of a-z, A-Z, 0-9, underscores and dashes.",
                    f"{param}.function.name",
                )
            parameters = tool["function"].get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise ApiError(f"'{param}.function.parameters' must be a JSON Schema object.",
                               param=f"{param}.function.parameters", code="invalid_type")
            if parameters:
                validate_schema(parameters, f"{param}.function.parameters")
            names.add(name)
    choice = body.get("tool_choice")
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _invalid(f"Invalid value for 'tool_choice': {choice!r}.", "tool_choice")
        if choice == "required" and not names:
            raise _invalid("'tool_choice' is 'required' but no 'tools' were given.", "tool_choice")
        return
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(choice.get("function"), dict):
        raise _invalid("'tool_choice' must be 'none', 'auto', 'required' or a named function.", "tool_choice")
    if choice["function"].get("name") not in names:
        raise _invalid(
            f"'tool_choice' names the function {choice['function'].get('name')!r}, which is not among 'tools'.",
            "tool_choice",
        )


def _normalize_response_format(body: dict[str, Any]) -> None:
    """Rewrite seed 002's legacy {"type": "json", "schema": …} into the standard forms providers understand."""
    response_format = body.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") != "json":
        return
    schema = response_format.get("schema")
    if schema is None:
        body["response_format"] = {"type": "json_object"}
        return
    spec: dict[str, Any] = {"name": response_format.get("name") or "response", "schema": schema, "strict": True}
    if response_format.get("description"):
        spec["description"] = response_format["description"]
    body["response_format"] = {"type": "json_schema", "json_schema": spec}


MAX_EMBEDDING_INPUTS = 2048


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _validate_embeddings(body: dict[str, Any]) -> list[str | list[int]]:
    """Check an embeddings request and return its inputs as a list of strings and token-id lists."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError("you must provide a model parameter", param="model", code="missing_required_parameter")
    raw = body.get("input")
    if raw is None:
        raise ApiError("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    inputs: list[str | list[int]]
    if isinstance(raw, str):
        inputs = [raw]
    elif _is_token_list(raw) and raw:
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(item, str) or _is_token_list(item) for item in raw):
        inputs = raw
    else:
        raise ApiError(
            "'input' must be a string, an array of strings, an array of token ids, or an array of token-id arrays.",
            param="input",
            code="invalid_type",
        )
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise _invalid(f"'input' may hold at most {MAX_EMBEDDING_INPUTS} items; got {len(inputs)}.", "input")
    for index, item in enumerate(inputs):
        if len(item) == 0:
            raise _invalid(f"'input[{index}]' is empty; every input must hold text or tokens.", "input")
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ("float", "base64"):
        raise _invalid(f"'encoding_format' must be 'float' or 'base64'; got {encoding!r}.", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise _invalid(f"'dimensions' must be a positive integer; got {dimensions!r}.", "dimensions")
    return inputs


def _names(value: Any, param: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ApiError(f"'{param}' must be an array of provider names.", param=param, code="invalid_type")
    return tuple(value)


def parse_preferences(body: dict[str, Any]) -> Preferences:
    raw = body.get("provider")
    if raw is None:
        return Preferences()
    if not isinstance(raw, dict):
        raise ApiError("'provider' must be an object.", param="provider", code="invalid_type")
    allow = raw.get("allow_fallbacks", True)
    if not isinstance(allow, bool):
        raise ApiError("'provider.allow_fallbacks' must be a boolean.", param="provider.allow_fallbacks",
                       code="invalid_type")
    return Preferences(
        order=_names(raw.get("order"), "provider.order"),
        allow_fallbacks=allow,
        only=frozenset(_names(raw.get("only"), "provider.only")),
        ignore=frozenset(_names(raw.get("ignore"), "provider.ignore")),
    )


def _split(body: dict[str, Any], known: frozenset[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the known fields that go upstream, the unknown ones set aside); the gateway's fields are in neither."""
    upstream: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in body.items():
        if name in known:
            upstream[name] = value
        elif name not in GATEWAY_FIELDS:
            extra[name] = value
    return upstream, extra


def parse_chat(body: dict[str, Any], *, model_pinned: bool) -> tuple[ChatRequest, ContentReport]:
    """A chat completions body as the engine's typed request, and where its non-text content parts are.
    `model_pinned`: the caller's organization pins a model, so the request need not name one."""
    _validate_chat(body, model_required=not model_pinned and not body.get("models"))
    preferences = parse_preferences(body)
    report = inspect_content(body["messages"])
    upstream, extra = _split(body, CHAT_FIELDS)
    _normalize_response_format(upstream)
    fallbacks: list[str] = body.get("models") or []
    primary = body.get("model") or (fallbacks[0] if fallbacks else "")
    models = tuple(dict.fromkeys(name for name in (primary, *fallbacks) if name))
    limit_param = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
    limit = body.get(limit_param)
    stream_options = body.get("stream_options") or {}
    request = ChatRequest(
        body=upstream,
        models=models,
        stream=bool(body.get("stream")),
        include_usage=bool(stream_options.get("include_usage")),
        max_tokens=limit,
        max_tokens_param=limit_param,
        n=body.get("n") or 1,
        uses_tools=bool(body.get("tools")) and body.get("tool_choice") != "none",
        needs=tuple(
            InputNeed(capability=CAPABILITY_OF_PART[part.kind], kind=part.kind, param=part.param)
            for part in report.parts
            # A PDF goes to any model: as a file where supported, as text otherwise.
            if CAPABILITY_OF_PART[part.kind] != "files"
        ),
        preferences=preferences,
        extra_fields=extra,
    )
    return request, report


def parse_embeddings(body: dict[str, Any]) -> EmbeddingsRequest:
    inputs = _validate_embeddings(body)
    preferences = parse_preferences(body)
    upstream, extra = _split(body, EMBEDDINGS_FIELDS)
    upstream["input"] = inputs
    return EmbeddingsRequest(
        body=upstream,
        model=body["model"],
        inputs=inputs,
        wants_dimensions=body.get("dimensions") is not None,
        preferences=preferences,
        extra_fields=extra,
    )
