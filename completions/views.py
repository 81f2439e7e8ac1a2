"""The OpenAI-compatible REST surface. Views parse, call and respond; errors are raised, never built here."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from django.http import HttpResponseBase, StreamingHttpResponse

from apikeys.scopes import CHAT, EMBEDDINGS, MODELS_READ
from completions import sse
from completions.api import ApiRequest, api_endpoint, json_body, json_response
from completions.catalog import CatalogEntry, catalog
from completions.errors import ApiError, model_not_found, to_api_error
from completions.providers.base import ChatCall, EmbeddingsCall
from completions.validation import (
    normalize_response_format,
    validate_chat,
    validate_embeddings,
    validate_max_tokens_fit,
)
from platform_site import runtime

ALL_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


@api_endpoint(methods=("GET",), scope=MODELS_READ)
async def models_list(request: ApiRequest) -> HttpResponseBase:
    entries = (await catalog()).entries.values()
    data = [entry.as_openai() for entry in entries if request.api_key.may_use_model(entry.public_id)]
    return json_response({"object": "list", "data": data})


@api_endpoint(methods=("GET",), scope=MODELS_READ)
async def model_retrieve(request: ApiRequest, model_id: str) -> HttpResponseBase:
    entry = (await catalog()).entries.get(model_id)
    if entry is None or not request.api_key.may_use_model(model_id):
        raise model_not_found(model_id)
    return json_response(entry.as_openai())


@api_endpoint(methods=ALL_METHODS, scope=None)
async def unknown_route(request: ApiRequest, rest: str = "") -> HttpResponseBase:
    raise ApiError(f"Invalid URL ({request.method} {request.path})", status=404, code="unknown_url")


async def _resolve_model(request: ApiRequest, public_id: str, *, capability: str, purpose: str) -> CatalogEntry:
    entry = (await catalog()).entries.get(public_id)
    if entry is None:
        raise model_not_found(public_id)
    request.api_key.require_model(public_id)
    if capability not in entry.capabilities:
        raise ApiError(
            f"The model `{public_id}` does not support {purpose}.", param="model", code="model_not_supported"
        )
    return entry


def _routing_headers(entry: CatalogEntry) -> dict[str, str]:
    return {"x-keyway-model": entry.public_id, "x-keyway-provider": entry.provider_config.name}


@api_endpoint(methods=("POST",), scope=CHAT)
async def chat_completions(request: ApiRequest) -> HttpResponseBase:
    body = json_body(request)
    validate_chat(body, model_required=not request.api_key.pinned_model)
    # An organization that pins a model gets it whatever the request says (the response names it).
    public_id = request.api_key.pinned_model or body["model"]
    entry = await _resolve_model(request, public_id, capability="chat", purpose="chat completions")
    validate_max_tokens_fit(body, context_length=entry.context_length)
    normalize_response_format(body)
    if body.get("tools") and body.get("tool_choice") != "none" and "tools" not in entry.capabilities:
        raise ApiError(
            f"The model `{entry.public_id}` does not support tools.", param="tools", code="unsupported_parameter"
        )
    call = ChatCall(upstream_model=entry.upstream_model, body=body, request_id=request.request_id)
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    if body.get("stream"):
        return await _chat_stream(request, entry, call, completion_id)
    result = await entry.provider.chat(call)
    result["id"] = completion_id
    result["object"] = "chat.completion"
    result["model"] = entry.public_id
    result.setdefault("created", int(time.time()))
    for choice in result["choices"]:
        choice.setdefault("logprobs", None)
        message = choice.get("message")
        if isinstance(message, dict):
            message.setdefault("refusal", None)
    return json_response(result, headers=_routing_headers(entry))


@api_endpoint(methods=("POST",), scope=EMBEDDINGS)
async def embeddings(request: ApiRequest) -> HttpResponseBase:
    body = json_body(request)
    inputs = validate_embeddings(body)
    entry = await _resolve_model(request, body["model"], capability="embeddings", purpose="embeddings")
    if body.get("dimensions") is not None and "dimensions" not in entry.capabilities:
        raise ApiError(
            f"The model `{entry.public_id}` does not support the 'dimensions' parameter.",
            param="dimensions",
            code="unsupported_parameter",
        )
    call = EmbeddingsCall(
        upstream_model=entry.upstream_model,
        body={**body, "input": inputs},
        request_id=request.request_id,
        context_length=entry.context_length,
    )
    result = await entry.provider.embeddings(call)
    result["model"] = entry.public_id
    if body.get("encoding_format") == "base64":
        for item in result["data"]:
            if isinstance(item["embedding"], np.ndarray):
                # Little-endian float32, which is what the SDKs decode (and request by default).
                item["embedding"] = base64.b64encode(item["embedding"].astype("<f4").tobytes()).decode()
    return json_response(result, headers=_routing_headers(entry))


async def _chat_stream(
    request: ApiRequest, entry: CatalogEntry, call: ChatCall, completion_id: str
) -> HttpResponseBase:
    upstream = entry.provider.chat_stream(call)
    # Wait for the first chunk before answering, so that an upstream that fails at once still gets the
    # client a proper HTTP status and a JSON error rather than a 200 with an error event.
    try:
        first: dict[str, Any] | None = await anext(upstream, None)
    except BaseException:
        await upstream.aclose()
        raise
    stream_options = call.body.get("stream_options") or {}
    include_usage = bool(stream_options.get("include_usage"))
    created = int(time.time())
    request_id = request.request_id

    async def events() -> AsyncIterator[bytes]:
        runtime.counter_add("open_streams", 1)
        roles_sent: set[int] = set()
        usage: dict[str, Any] | None = None
        try:
            chunk = first
            while chunk is not None:
                chunk_usage = chunk.pop("usage", None)
                if chunk_usage:
                    usage = chunk_usage
                choices = chunk.get("choices") or []
                if choices:
                    for choice in choices:
                        delta = choice.get("delta") or {}
                        choice["delta"] = delta
                        choice.setdefault("logprobs", None)
                        choice.setdefault("finish_reason", None)
                        # The SDK's stream helpers concatenate strings: the role is sent once per choice.
                        index = choice.get("index", 0)
                        if index in roles_sent:
                            delta.pop("role", None)
                        else:
                            roles_sent.add(index)
                            delta["role"] = "assistant"
                            if "tool_calls" not in delta:
                                delta.setdefault("content", "")
                    yield sse.frame(
                        {
                            "id": completion_id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": entry.public_id,
                            "choices": choices,
                        }
                    )
                chunk = await anext(upstream, None)
            if include_usage and usage is not None:
                yield sse.frame(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": entry.public_id,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield sse.DONE
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - after the first byte an error can only be an SSE event
            yield sse.error_frame(to_api_error(exc, request_id=request_id).body())
            yield sse.DONE
        finally:
            runtime.counter_add("open_streams", -1)
            await upstream.aclose()

    response = StreamingHttpResponse(events(), content_type=sse.CONTENT_TYPE, headers={**sse.HEADERS,
                                     **_routing_headers(entry)})
    return response
