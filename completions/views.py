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
from billing.metering import Endpoint, Meter, Status, admit
from billing.ratelimits import estimate_tokens
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
from completions.tokenizers import preload_token_counter
from completions.usage import Produced, max_output_tokens, settle_chat, settle_embeddings
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
    prompt_tokens = estimate_tokens(body["messages"])
    meter = await admit(
        key=request.api_key,
        request_id=request.request_id,
        endpoint=Endpoint.CHAT,
        models=[entry.public_id for entry in entries],
        prompt_tokens=prompt_tokens,
        max_output_tokens=max(
            max_output_tokens(body, context_length=entry.context_length, prompt_tokens=prompt_tokens)
            for entry in entries
        ),
    )
    request.rate_headers = meter.rate_headers
    try:
        extra_headers = await _prepare_content(body, content, entries)
        normalize_response_format(body)
    except BaseException:
        settle_chat(meter, entry=entries[0], deployment=None, status=Status.ERROR, messages=body["messages"])
        raise
    upstream_body = _upstream_body(body)
    attempts = [(entry, deployment) for entry in entries for deployment in plan(entry, preferences)]
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    if body.get("stream"):
        return await _chat_stream(request, meter, attempts, upstream_body, completion_id, extra_headers)

    tried: list[tuple[CatalogEntry, DeploymentEntry]] = []

    async def complete(entry: CatalogEntry, deployment: DeploymentEntry) -> dict[str, Any]:
        tried.append((entry, deployment))
        await preload_token_counter(entry, deployment)
        call = ChatCall(deployment.upstream_model, upstream_body, request.request_id, deployment.timeout)
        return await deployment.provider.chat(call)

    try:
        result, entry, deployment = await first_success(attempts, complete)
    except asyncio.CancelledError:
        # The client left while the model was answering: the prompt was processed, nothing was delivered.
        last = tried[-1] if tried else (None, None)
        settle_chat(meter, entry=last[0], deployment=last[1], status=Status.CLIENT_DISCONNECTED,
                    messages=body["messages"])
        raise
    except BaseException:
        settle_chat(meter, entry=entries[0], deployment=None, status=Status.ERROR, messages=body["messages"])
        raise
    produced = Produced()
    if not isinstance(result.get("usage"), dict):
        produced.add_choices(result["choices"])
    settle_chat(meter, entry=entry, deployment=deployment, status=Status.OK, messages=body["messages"],
                usage=result.get("usage"), produced=produced.text())
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
    meter = await admit(
        key=request.api_key,
        request_id=request.request_id,
        endpoint=Endpoint.EMBEDDINGS,
        models=[entry.public_id],
        prompt_tokens=estimate_tokens(inputs),
        max_output_tokens=0,
    )
    request.rate_headers = meter.rate_headers
    upstream_body = {**_upstream_body(body), "input": inputs}

    async def embed(entry: CatalogEntry, deployment: DeploymentEntry) -> dict[str, Any]:
        call = EmbeddingsCall(
            deployment.upstream_model, upstream_body, request.request_id, entry.context_length, deployment.timeout
        )
        return await deployment.provider.embeddings(call)

    try:
        result, entry, deployment = await first_success([(entry, d) for d in plan(entry, preferences)], embed)
    except BaseException as error:
        status = Status.CLIENT_DISCONNECTED if isinstance(error, asyncio.CancelledError) else Status.ERROR
        settle_embeddings(meter, entry=entry, deployment=None, inputs=inputs, status=status)
        raise
    settle_embeddings(meter, entry=entry, deployment=deployment, inputs=inputs, usage=result.get("usage"))
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
    meter: Meter,
    attempts: list[tuple[CatalogEntry, DeploymentEntry]],
    body: dict[str, Any],
    completion_id: str,
    extra_headers: dict[str, str],
) -> HttpResponseBase:
    messages = body["messages"]

    async def open_stream(entry: CatalogEntry, deployment: DeploymentEntry) -> Opened:
        await preload_token_counter(entry, deployment)
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

    try:
        (upstream, first), entry, deployment = await first_success(attempts, open_stream)
    except BaseException as error:
        status = Status.CLIENT_DISCONNECTED if isinstance(error, asyncio.CancelledError) else Status.ERROR
        settle_chat(meter, entry=attempts[0][0] if attempts else None, deployment=None, status=status,
                    messages=messages)
        raise
    meter.first_token()
    stream_options = body.get("stream_options") or {}
    include_usage = bool(stream_options.get("include_usage"))
    created = int(time.time())
    request_id = request.request_id
    produced = Produced()
    usage: dict[str, Any] | None = None

    def settle(status: int) -> None:
        settle_chat(meter, entry=entry, deployment=deployment, status=status, messages=messages, usage=usage,
                    produced=produced.text())

    async def events() -> AsyncIterator[bytes]:
        nonlocal usage
        runtime.counter_add("open_streams", 1)
        framer = ChunkFramer()
        status = Status.CLIENT_DISCONNECTED
        try:
            chunk = first
            while chunk is not None:
                chunk_usage = chunk.pop("usage", None)
                if chunk_usage:
                    usage = chunk_usage
                choices = chunk.get("choices") or []
                if choices:
                    framer.frame_choices(choices)
                    produced.add_choices(choices)
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
            # The upstream is done: settled before the last frames go out, so a client that saw [DONE] is
            # in the journal even if this process dies a moment later.
            status = Status.OK
            settle(status)
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
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # noqa: BLE001 - after the first byte an error can only be an SSE event
            # The upstream broke mid-stream: what it produced is charged, and the event says incomplete.
            status = Status.INCOMPLETE
            settle(status)
            yield sse.error_frame(to_api_error(exc, request_id=request_id).body())
            yield sse.DONE
        finally:
            runtime.counter_add("open_streams", -1)
            settle(status)
            await upstream.aclose()

    headers = {**sse.HEADERS, **_routing_headers(entry, deployment), **extra_headers}
    response = StreamingHttpResponse(events(), content_type=sse.CONTENT_TYPE, headers=headers)
    # A client that leaves before the first byte is sent never starts `events()`, whose `finally` then never
    # runs: the handler calls this when the response is done or abandoned, and it settles what is left.
    def on_close() -> None:
        if meter.settled:
            return  # the stream ran and settled itself
        settle(Status.CLIENT_DISCONNECTED)
        try:
            asyncio.get_running_loop().create_task(upstream.aclose())
        except RuntimeError:
            pass

    response.on_close = on_close  # type: ignore[attr-defined]
    return response
