"""Validation of request bodies, with OpenAI's error shape and `param` naming the offending field."""

from __future__ import annotations

from typing import Any

from completions.errors import ApiError

ROLES = frozenset({"developer", "system", "user", "assistant", "tool", "function"})


def _invalid(message: str, param: str) -> ApiError:
    return ApiError(message, param=param, code="invalid_value")


def _number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(f"'{name}' must be a number.", param=name, code="invalid_type")
    if not low <= value <= high:
        raise _invalid(f"'{name}' must be between {low:g} and {high:g}; got {value}.", name)


def validate_chat(body: dict[str, Any], *, model_required: bool) -> None:
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
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise _invalid(f"'{name}' must be a positive integer; got {value!r}.", name)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError("'seed' must be an integer.", param="seed", code="invalid_type")
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, list):
            if len(stop) > 4:
                raise _invalid("'stop' may hold at most 4 sequences.", "stop")
            if not all(isinstance(item, str) for item in stop):
                raise ApiError("'stop' must be a string or an array of strings.", param="stop", code="invalid_type")
        elif not isinstance(stop, str):
            raise ApiError("'stop' must be a string or an array of strings.", param="stop", code="invalid_type")


def validate_max_tokens_fit(body: dict[str, Any], *, context_length: int) -> None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is not None and value > context_length:
            raise ApiError(
                f"'{name}' is too large: {value}. This model's context length is {context_length} tokens.",
                param=name,
                code="context_length_exceeded",
            )


MAX_EMBEDDING_INPUTS = 2048


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def validate_embeddings(body: dict[str, Any]) -> list[str | list[int]]:
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
