"""The OpenAI-compatible REST surface. Views parse, call and respond; errors are raised, never built here."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import numpy as np
from django.http import HttpResponseBase, StreamingHttpResponse

from apikeys.scopes import CHAT, EMBEDDINGS, MODELS_READ
from billing.ratelimits import check_rate_limits, estimate_tokens, record_tokens_later
from completions import sse
from completions.api import ApiRequest, api_endpoint, json_body, json_response
from completions.catalog import CatalogEntry, DeploymentEntry, catalog
from completions.content import (
    ContentReport,
    check_capabilities,
    convert_pdfs_to_text,
    inline_remote_images,
    inspect_content,
)
from completions.errors import ApiError, model_not_found, to_api_error
from completions.framing import ChunkFramer, normalize_completion
from completions.providers.base import ChatCall, EmbeddingsCall
from completions.routing import first_success, parse_preferences, plan
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


def _routing_headers(entry: CatalogEntry, deployment: DeploymentEntry) -> dict[str, str]:
    return {"x-keyway-model": entry.public_id, "x-keyway-provider": deployment.provider_name}


def _total_tokens(usage: Any) -> int:
    if not isinstance(usage, dict):
        return 0
    total = usage.get("total_tokens")
    if isinstance(total, int):
        return total
    return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)


# Fields that steer the gateway and mean nothing (or an error) to an upstream.
GATEWAY_FIELDS = frozenset({"provider", "models"})


def _upstream_body(body: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in body.items() if name not in GATEWAY_FIELDS}


async def _chat_models(request: ApiRequest, body: dict[str, Any], content: ContentReport) -> list[CatalogEntry]:
    """The model to use and, from the request's `models` list, the ones to fall back to, all checked."""
    fallbacks: list[str] = body.get("models") or []
    if request.api_key.pinned_model:
        # An organization that pins a model gets it whatever the request says (the response names it).
        names = [request.api_key.pinned_model]
    else:
        primary = body.get("model") or fallbacks[0]
        names = [primary, *(name for name in fallbacks if name != primary)]
    entries = []
    for name in dict.fromkeys(names):
        entry = await _resolve_model(request, name, capability="chat", purpose="chat completions")
        validate_max_tokens_fit(body, context_length=entry.context_length)
        check_capabilities(content, entry)
        if body.get("tools") and body.get("tool_choice") != "none" and "tools" not in entry.capabilities:
            raise ApiError(
                f"The model `{entry.public_id}` does not support tools.", param="tools", code="unsupported_parameter"
            )
        entries.append(entry)
    return entries


async def _prepare_content(
    body: dict[str, Any], content: ContentReport, entries: list[CatalogEntry]
) -> dict[str, str]:
    """Turn PDFs into text where a model cannot take files, and fetch remote images; returns the headers
    that tell the client what was done."""
    if not content.parts:
        return {}
    messages = body["messages"]
    if any(w.kind == "file" for w in content.parts) and any("files" not in e.capabilities for e in entries):
        await convert_pdfs_to_text(messages, content)
    await inline_remote_images(messages, content)
    if content.pdfs_converted:
        return {"x-keyway-file-conversion": f"pdf-to-text; files={content.pdfs_converted}"}
    return {}


@api_endpoint(methods=("POST",), scope=CHAT)
async def chat_completions(request: ApiRequest) -> HttpResponseBase:
    body = json_body(request)
    validate_chat(body, model_required=not request.api_key.pinned_model and not body.get("models"))
    preferences = parse_preferences(body)
    content = inspect_content(body["messages"])
    entries = await _chat_models(request, body, content)
    limits = await check_rate_limits(request.api_key, estimate_tokens(body["messages"]))
    if limits is not None:
        request.rate_headers = limits.headers()
    extra_headers = await _prepare_content(body, content, entries)
    normalize_response_format(body)
    upstream_body = _upstream_body(body)
    attempts = [(entry, deployment) for entry in entries for deployment in plan(entry, preferences)]
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    if body.get("stream"):
        return await _chat_stream(request, attempts, upstream_body, completion_id, extra_headers)

    async def complete(entry: CatalogEntry, deployment: DeploymentEntry) -> dict[str, Any]:
        call = ChatCall(deployment.upstream_model, upstream_body, request.request_id, deployment.timeout)
        return await deployment.provider.chat(call)

    result, entry, deployment = await first_success(attempts, complete)
    record_tokens_later(request.api_key, _total_tokens(result.get("usage")))
    result["id"] = completion_id
    result["object"] = "chat.completion"
    result["model"] = entry.public_id
    result.setdefault("created", int(time.time()))
    normalize_completion(result)
    return json_response(result, headers={**_routing_headers(entry, deployment), **extra_headers})


@api_endpoint(methods=("POST",), scope=EMBEDDINGS)
async def embeddings(request: ApiRequest) -> HttpResponseBase:
    body = json_body(request)
    inputs = validate_embeddings(body)
    preferences = parse_preferences(body)
    entry = await _resolve_model(request, body["model"], capability="embeddings", purpose="embeddings")
    if body.get("dimensions") is not None and "dimensions" not in entry.capabilities:
        raise ApiError(
            f"The model `{entry.public_id}` does not support the 'dimensions' parameter.",
            param="dimensions",
            code="unsupported_parameter",
        )
    limits = await check_rate_limits(request.api_key, estimate_tokens(inputs))
    if limits is not None:
        request.rate_headers = limits.headers()
    upstream_body = {**_upstream_body(body), "input": inputs}

    async def embed(entry: CatalogEntry, deployment: DeploymentEntry) -> dict[str, Any]:
        call = EmbeddingsCall(
            deployment.upstream_model, upstream_body, request.request_id, entry.context_length, deployment.timeout
        )
        return await deployment.provider.embeddings(call)

    result, entry, deployment = await first_success([(entry, d) for d in plan(entry, preferences)], embed)
    record_tokens_later(request.api_key, _total_tokens(result.get("usage")))
    result["model"] = entry.public_id
    if body.get("encoding_format") == "base64":
        for item in result["data"]:
            if isinstance(item["embedding"], np.ndarray):
                # Little-endian float32, which is what the SDKs decode (and request by default).
                item["embedding"] = base64.b64encode(item["embedding"].astype("<f4").tobytes()).decode()
    return json_response(result, headers=_routing_headers(entry, deployment))


Opened = tuple[AsyncGenerator[dict[str, Any], None], dict[str, Any] | None]


async def _chat_stream(
    request: ApiRequest,
    attempts: list[tuple[CatalogEntry, DeploymentEntry]],
    body: dict[str, Any],
    completion_id: str,
    extra_headers: dict[str, str],
) -> HttpResponseBase:
    async def open_stream(entry: CatalogEntry, deployment: DeploymentEntry) -> Opened:
        call = ChatCall(deployment.upstream_model, body, request.request_id, deployment.timeout)
        stream = deployment.provider.chat_stream(call)
        # Wait for the first chunk before answering: an upstream that fails at once can still be replaced by
        # the next deployment, or get the client a proper HTTP status and a JSON error. Once a byte has gone
        # to the client there is no retry.
        try:
            return stream, await anext(stream, None)
        except BaseException:
            await stream.aclose()
            raise

    (upstream, first), entry, deployment = await first_success(attempts, open_stream)
    stream_options = body.get("stream_options") or {}
    include_usage = bool(stream_options.get("include_usage"))
    created = int(time.time())
    request_id = request.request_id
    api_key = request.api_key

    async def events() -> AsyncIterator[bytes]:
        runtime.counter_add("open_streams", 1)
        framer = ChunkFramer()
        usage: dict[str, Any] | None = None
        try:
            chunk = first
            while chunk is not None:
                chunk_usage = chunk.pop("usage", None)
                if chunk_usage:
                    usage = chunk_usage
                choices = chunk.get("choices") or []
                if choices:
                    framer.frame_choices(choices)
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
            record_tokens_later(api_key, _total_tokens(usage))
            await upstream.aclose()

    headers = {**sse.HEADERS, **_routing_headers(entry, deployment), **extra_headers}
    return StreamingHttpResponse(events(), content_type=sse.CONTENT_TYPE, headers=headers)
