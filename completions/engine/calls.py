"""One metered call of a model: the only way any surface reaches a provider.

    result = await calls.chat(request, caller=caller)          # CallResult
    stream = await calls.chat_stream(request, caller=caller)   # ChatStream: iterate it, close it
    result = await calls.embed(request, caller=caller)         # CallResult

Each call resolves its models (the catalog, the key's model rights, capabilities and limits), is admitted
(rate limits and a reservation of its worst-case cost), walks the routing plan to the first deployment that
answers, and is settled exactly once on every path: answered, failed, cancelled, client gone, upstream
broken mid-stream. A call has its own id; one HTTP request, WebSocket connection or agent run may make many
calls, and every usage event names its call, its request and its session.

What comes back is typed: the body, the usage, the model and deployment that answered, and the headers a
surface should send (rate limits, routing, content conversions). An error raised after admission carries the
rate-limit headers too. The engine never builds an HTTP response; surfaces never admit or settle.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from apikeys.auth import AuthenticatedKey
from billing.metering import Endpoint, Meter, Status, UsageSource, admit
from billing.ratelimits import estimate_tokens
from completions.engine.catalog import CatalogEntry, DeploymentEntry, catalog
from completions.engine.normalize import ChunkNormalizer, normalize_completion
from completions.engine.requests import ChatRequest, EmbeddingsRequest, Preferences
from completions.engine.routing import first_success, plan
from completions.engine.tokenizers import preload_token_counter
from completions.engine.usage import Produced, max_output_tokens, settle_chat, settle_embeddings
from completions.providers.base import ChatCall, EmbeddingsCall, UpstreamTimeout
from platform_site.kernel import ids, process
from platform_site.kernel.errors import ApiError

# Runs after admission and before the first upstream call, with the models that may answer: work a surface
# does only for a request that is let in (fetching remote images, turning PDFs into text). Returns headers
# for the response; an error it raises settles the call at zero.
Prepare = Callable[[list[CatalogEntry]], Awaitable[dict[str, str]]]
Attempt = tuple[CatalogEntry, DeploymentEntry]


def new_call_id() -> str:
    return f"call-{ids.token_hex(12)}"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes the call, and what it belongs to: the request and, where there is one, the session (a
    WebSocket connection, an agent run)."""

    key: AuthenticatedKey
    request_id: str
    session_id: str = ""
    # The surface the call is made for, as the ledger records it (a realtime response is a chat call).
    endpoint: int = Endpoint.CHAT


@dataclass(slots=True)
class CallResult:
    """What an answered call gives its surface. `body` is OpenAI's object for the endpoint with the public
    model name: a chat.completion (ids are the surface's to set), or an embeddings list whose vectors may be
    numpy arrays (the embedded model) or what the upstream sent."""

    call_id: str
    body: dict[str, Any]
    usage: dict[str, Any] | None
    model: str
    deployment: DeploymentEntry
    headers: dict[str, str]


def model_not_found(model: str) -> ApiError:
    return ApiError(
        f"The model `{model}` does not exist or you do not have access to it.",
        status=404,
        param="model",
        code="model_not_found",
    )


async def resolve_model(key: AuthenticatedKey, public_id: str, *, capability: str, purpose: str) -> CatalogEntry:
    """The catalog entry of a model the key may use for `purpose`, or the error that says why not."""
    entry = (await catalog()).entries.get(public_id)
    if entry is None:
        raise model_not_found(public_id)
    key.require_model(public_id)
    if capability not in entry.capabilities:
        raise ApiError(
            f"The model `{public_id}` does not support {purpose}.", param="model", code="model_not_supported"
        )
    return entry


async def realtime_model(key: AuthenticatedKey, public_id: str) -> CatalogEntry:
    """The model of a realtime session: one relayed to an upstream realtime provider (capability
    `realtime`), or any chat model, whose session Keyway runs itself in text."""
    entry = (await catalog()).entries.get(public_id)
    if entry is None:
        raise model_not_found(public_id)
    key.require_model(public_id)
    if "realtime" not in entry.capabilities and "chat" not in entry.capabilities:
        raise ApiError(f"The model `{public_id}` does not support realtime sessions.", param="model",
                       code="model_not_supported")
    return entry


async def _chat_models(request: ChatRequest, key: AuthenticatedKey) -> list[CatalogEntry]:
    """The model to use and the ones to fall back to, each checked against what the request needs."""
    # An organization that pins a model gets it whatever the request says (the response names it).
    names = (key.pinned_model,) if key.pinned_model else request.models
    entries = []
    for position, name in enumerate(names):
        try:
            entry = await resolve_model(key, name, capability="chat", purpose="chat completions")
        except ApiError as error:
            if position:  # a fallback of the `models` list, not the model asked for first
                error.param = "models"
            raise
        if request.max_tokens is not None and request.max_tokens > entry.context_length:
            raise ApiError(
                f"'{request.max_tokens_param}' is too large: {request.max_tokens}. This model's context length "
                f"is {entry.context_length} tokens.",
                param=request.max_tokens_param,
                code="context_length_exceeded",
            )
        for need in request.needs:
            if need.capability not in entry.capabilities:
                raise ApiError(
                    f"The model `{entry.public_id}` does not accept {need.kind} parts ({need.param}).",
                    param=need.param,
                    code="unsupported_content_part",
                )
        if request.uses_tools and "tools" not in entry.capabilities:
            raise ApiError(
                f"The model `{entry.public_id}` does not support tools.", param="tools", code="unsupported_parameter"
            )
        entries.append(entry)
    return entries


def _attempts(entries: list[CatalogEntry], preferences: Preferences, extra_fields: dict[str, Any]) -> list[Attempt]:
    """The routing plan, after checking that every unknown field is allowed by some deployment of it (before
    admission: a request refused for its fields is not metered)."""
    attempts = [(entry, deployment) for entry in entries for deployment in plan(entry, preferences)]
    for name in extra_fields:
        if not any(name in deployment.extra_fields for _, deployment in attempts):
            raise ApiError(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")
    return attempts


def _upstream_body(body: dict[str, Any], extra_fields: dict[str, Any], deployment: DeploymentEntry) -> dict[str, Any]:
    """The known fields, plus the unknown ones this deployment's operator allowed (only those)."""
    if not extra_fields or not deployment.extra_fields:
        return body
    allowed = {name: value for name, value in extra_fields.items() if name in deployment.extra_fields}
    return {**body, **allowed} if allowed else body


def _routing_headers(entry: CatalogEntry, deployment: DeploymentEntry) -> dict[str, str]:
    return {"x-keyway-model": entry.public_id, "x-keyway-provider": deployment.provider_name}


def _with_rate_headers(error: BaseException, meter: Meter) -> None:
    """An error after admission still tells the client where its limits stand."""
    if isinstance(error, ApiError):
        for name, value in meter.rate_headers.items():
            error.headers.setdefault(name, value)


# The most tokens one image part costs (OpenAI's high detail: 85 + 170 per 512-px tile, 8 tiles at most).
_IMAGE_TOKENS = 85 + 170 * 8


# Chat-template tokens a message adds at most (role markers, separators).
_TEMPLATE_TOKENS_PER_MESSAGE = 8


def prompt_tokens_bounds(request: ChatRequest) -> tuple[int, int]:
    """(estimate, worst case) of the prompt's tokens before any model counted them. Both count what the model
    reads besides the messages (the tools, the response_format schema) and the most an image by URL costs
    (inline images and PDFs are counted by their bytes, which their text never exceeds).

    The estimate (~4 bytes a token) is what rate limits count. The worst case is the bytes sent plus the
    template's tokens per message: a byte-level tokenizer never makes a token of less than a byte. Credit is
    held for the worst case, so a prepaid balance does not go below zero by what an estimate missed."""
    body = request.body
    read_too = [body[name] for name in ("tools", "functions", "response_format") if body.get(name)]
    images = sum(1 for need in request.needs if need.kind == "image_url") * _IMAGE_TOKENS
    sent = len(orjson.dumps([request.messages, read_too] if read_too else request.messages))
    return sent // 4 + 1 + images, sent + _TEMPLATE_TOKENS_PER_MESSAGE * len(request.messages) + images


async def _admit_chat(request: ChatRequest, caller: Caller, entries: list[CatalogEntry], call_id: str) -> Meter:
    prompt_tokens, worst_prompt_tokens = prompt_tokens_bounds(request)
    return await admit(
        key=caller.key,
        call_id=call_id,
        request_id=caller.request_id,
        session_id=caller.session_id,
        endpoint=caller.endpoint,
        models=[entry.public_id for entry in entries],
        prompt_tokens=prompt_tokens,
        max_output_tokens=max(
            max_output_tokens(request, context_length=entry.context_length, prompt_tokens=prompt_tokens)
            for entry in entries
        ),
        worst_prompt_tokens=worst_prompt_tokens,
    )


def _chat_call(request: ChatRequest, caller: Caller, deployment: DeploymentEntry) -> ChatCall:
    return ChatCall(
        deployment.upstream_model,
        _upstream_body(request.body, request.extra_fields, deployment),
        caller.request_id,
        deployment.timeout,
        max_tokens=request.max_tokens,
        n=request.n,
        organization=str(caller.key.organization_id),
        key=caller.key.public_id,
    )


async def chat(
    request: ChatRequest, *, caller: Caller, prepare: Prepare | None = None, call_id: str | None = None
) -> CallResult:
    """One chat completion, answered whole. `call_id` as for chat_stream."""
    entries = await _chat_models(request, caller.key)
    attempts = _attempts(entries, request.preferences, request.extra_fields)
    call_id = call_id or new_call_id()
    meter = await _admit_chat(request, caller, entries, call_id)
    # Where the call stands when it ends, whichever way it ends: settled from exactly this, once.
    answered: Attempt | None = None
    status: int = Status.ERROR
    result: dict[str, Any] | None = None
    produced = Produced()
    try:
        headers = dict(meter.rate_headers)
        if prepare is not None:
            headers.update(await prepare(entries))

        async def complete(entry: CatalogEntry, deployment: DeploymentEntry) -> dict[str, Any]:
            nonlocal answered
            # If the client leaves now, the prompt was processed here: that deployment is charged for it.
            answered = (entry, deployment)
            await preload_token_counter(entry, deployment)
            return await deployment.provider.chat(_chat_call(request, caller, deployment))

        completion, entry, deployment = await first_success(attempts, complete)
        result, answered, status = completion, (entry, deployment), Status.OK
        if not isinstance(completion.get("usage"), dict):
            produced.add_choices(completion["choices"])
    except asyncio.CancelledError:
        status = Status.CLIENT_DISCONNECTED
        raise
    except UpstreamTimeout as error:
        # The last deployment tried was working on it when it ran out of time: its prompt (and whatever it
        # reports producing) is charged, as that upstream charges it.
        result = {"usage": error.usage} if error.usage else None
        _with_rate_headers(error, meter)
        raise
    except BaseException as error:
        answered = None  # nothing was produced that anyone could use
        _with_rate_headers(error, meter)
        raise
    finally:
        settle_chat(
            meter,
            entry=answered[0] if answered else entries[0],
            deployment=answered[1] if answered else None,
            status=status,
            messages=request.messages,
            usage=result.get("usage") if result is not None else None,
            produced=produced.text(),
        )
    await meter.recorded()  # in the usage stream before the client has its answer
    completion["model"] = entry.public_id
    normalize_completion(completion)
    headers.update(_routing_headers(entry, deployment))
    return CallResult(
        call_id=call_id, body=completion, usage=completion.get("usage"), model=entry.public_id,
        deployment=deployment, headers=headers,
    )


async def chat_stream(
    request: ChatRequest, *, caller: Caller, prepare: Prepare | None = None, call_id: str | None = None
) -> ChatStream:
    """One chat completion, answered in chunks. The first ones are awaited here, before anything is sent: an
    upstream that fails at once can still be replaced by the next deployment, or get the client a proper
    HTTP status and a JSON error. Once a byte has gone to the client there is no retry.

    `call_id` names the call in the ledger where the surface has an id for it already (a response is one
    call, metered under the response's id); it must be unique."""
    entries = await _chat_models(request, caller.key)
    attempts = _attempts(entries, request.preferences, request.extra_fields)
    call_id = call_id or new_call_id()
    meter = await _admit_chat(request, caller, entries, call_id)

    tried: Attempt | None = None

    async def open_stream(
        entry: CatalogEntry, deployment: DeploymentEntry
    ) -> tuple[Any, list[dict[str, Any]] | None]:
        nonlocal tried
        tried = (entry, deployment)
        await preload_token_counter(entry, deployment)
        upstream = deployment.provider.chat_stream(_chat_call(request, caller, deployment))
        try:
            return upstream, await anext(upstream, None)
        except BaseException:
            await upstream.aclose()
            raise

    try:
        headers = dict(meter.rate_headers)
        if prepare is not None:
            headers.update(await prepare(entries))
        (upstream, first), entry, deployment = await first_success(attempts, open_stream)
    except BaseException as error:
        # Nothing reached the client; nothing was produced that anyone could use. But an upstream that timed
        # out was working on the prompt meanwhile, and that is charged, as it charges it.
        status = Status.CLIENT_DISCONNECTED if isinstance(error, asyncio.CancelledError) else Status.ERROR
        if isinstance(error, UpstreamTimeout) and tried is not None:
            settle_chat(meter, entry=tried[0], deployment=tried[1], status=status, messages=request.messages,
                        usage=error.usage)
        else:
            settle_chat(meter, entry=entries[0], deployment=None, status=status, messages=request.messages)
        _with_rate_headers(error, meter)
        raise
    meter.first_token()
    headers.update(_routing_headers(entry, deployment))
    return ChatStream(call_id, meter, request, entry, deployment, upstream, first, headers)


class ChatStream:
    """A chat completion arriving in chunks, which settles itself exactly once:

    - exhausted: the upstream finished, so the call is settled `ok` before the iterator says so — a surface
      that then sends its last frames has already journaled the call;
    - broken: the upstream failed mid-stream, so what it produced is charged as `incomplete`, and the error
      is raised to the surface (to frame as an SSE error event, say);
    - closed before either (`close()`, called by Django when a streaming response is closed or abandoned,
      by a WebSocket consumer, or by leaving `async with`): the client is charged for what was produced
      (`client_disconnected`) and the upstream is told to stop.

    Iterating yields each chunk's `choices`, already in OpenAI's shape; `batches()` yields them in lists, one
    per batch of chunks that arrived together (a surface relays a batch in one write). `usage` holds the
    upstream's report once it came.
    """

    def __init__(
        self,
        call_id: str,
        meter: Meter,
        request: ChatRequest,
        entry: CatalogEntry,
        deployment: DeploymentEntry,
        upstream: Any,
        first: list[dict[str, Any]] | None,
        headers: dict[str, str],
    ) -> None:
        self.call_id = call_id
        self.model = entry.public_id
        self.deployment = deployment
        self.headers = headers
        self.usage: dict[str, Any] | None = None
        self._meter = meter
        self._request = request
        self._entry = entry
        self._upstream = upstream
        self._first = first
        self._normalizer = ChunkNormalizer()
        self._produced = Produced()
        self._settled = False
        self._loop = asyncio.get_running_loop()
        process.counter_add("open_streams", 1)

    def __aiter__(self) -> AsyncIterator[list[dict[str, Any]]]:
        return self._choices()

    async def _choices(self) -> AsyncIterator[list[dict[str, Any]]]:
        async with contextlib.aclosing(self.batches()) as batches:
            async for batch in batches:
                for choices in batch:
                    yield choices

    async def batches(self) -> AsyncGenerator[list[list[dict[str, Any]]], None]:
        if self._settled:
            return  # closed before it was read
        upstream, batch = self._upstream, self._first
        self._first = None
        normalizer, produced = self._normalizer, self._produced
        try:
            while batch is not None:
                out = []
                for chunk in batch:
                    usage = chunk.pop("usage", None)
                    if usage:
                        self.usage = usage
                    choices = chunk.get("choices")
                    if choices:
                        normalizer.frame_choices(choices)
                        produced.add_choices(choices)
                        out.append(choices)
                if out:
                    yield out
                batch = await anext(upstream, None)
        except Exception as error:
            self._upstream = None  # it raised, so it is finished
            self._settle(Status.INCOMPLETE)
            _with_rate_headers(error, self._meter)
            raise
        self._upstream = None  # finished: nothing to stop
        self._settle(Status.OK)
        await self._meter.recorded()  # in the usage stream before the surface sends the last frames

    def _settle(self, status: int) -> None:
        if self._settled:
            return
        self._settled = True
        process.counter_add("open_streams", -1)
        settle_chat(
            self._meter, entry=self._entry, deployment=self.deployment, status=status,
            messages=self._request.messages, usage=self.usage, produced=self._produced.text(),
        )

    @property
    def billed_usage(self) -> dict[str, int] | None:
        """The tokens the call was charged for, in chat's usage shape, once it is settled (the upstream's
        report where there was one, else the count): what a surface that reports usage at the end reports."""
        meter = self._meter
        if not self._settled:
            return None
        return {
            "prompt_tokens": meter.prompt_tokens,
            "completion_tokens": meter.completion_tokens,
            "total_tokens": meter.prompt_tokens + meter.completion_tokens,
            "cached_tokens": meter.cached_tokens,
        }

    def close(self) -> None:
        """Settle what is left and stop the upstream. Synchronous (it runs while a task is being cancelled,
        and from Django's response closers) and safe to call more than once, from any thread."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            # Django's own handler closes responses from a worker thread: settle on the stream's loop.
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self.close)
            return
        if not self._settled:
            self._settle(Status.CLIENT_DISCONNECTED)
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            self._loop.create_task(_close_quietly(upstream))

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


async def _close_quietly(upstream: Any) -> None:
    try:
        await upstream.aclose()
    except Exception:  # noqa: BLE001, S110 - a broken upstream closing badly changes nothing already settled
        pass


async def realtime_upstream(entry: CatalogEntry, *, beta: bool) -> tuple[Any, DeploymentEntry]:
    """Open the upstream realtime socket of a relayed model: the first of its deployments (in routing order)
    that connects. Connecting is not metered; each response on it is (`relay_turn`)."""
    attempts = [(entry, deployment) for deployment in plan(entry, Preferences())
                if hasattr(deployment.provider, "realtime_connect")]
    if not attempts:
        raise ApiError(f"No deployment of `{entry.public_id}` serves realtime sessions.", status=404,
                       param="model", code="no_deployment_available")

    async def connect(entry: CatalogEntry, deployment: DeploymentEntry) -> Any:
        return await deployment.provider.realtime_connect(deployment.upstream_model, beta=beta)  # type: ignore[attr-defined]

    socket, _, deployment = await first_success(attempts, connect)
    return socket, deployment


async def relay_turn(
    entry: CatalogEntry, deployment: DeploymentEntry, *, caller: Caller, prompt_tokens: int, max_output_tokens: int
) -> RelayTurn:
    """Admit one response of a relayed realtime session: counted against the rate limits with the
    surface's estimate of its prompt, and reserved at the worst case (the model's whole context in, the
    response's output limit out), because the conversation lives upstream."""
    call_id = new_call_id()
    meter = await admit(
        key=caller.key, call_id=call_id, request_id=caller.request_id, session_id=caller.session_id,
        endpoint=caller.endpoint, models=[entry.public_id], prompt_tokens=prompt_tokens,
        max_output_tokens=max_output_tokens, worst_prompt_tokens=entry.context_length,
    )
    return RelayTurn(call_id, meter, entry, deployment, prompt_tokens)


class RelayTurn:
    """One relayed response, admitted, and settled exactly once by `finish`: from the usage the upstream
    reported in its `response.done`, or, where it never came (the client left first), estimated."""

    def __init__(
        self, call_id: str, meter: Meter, entry: CatalogEntry, deployment: DeploymentEntry, prompt_tokens: int
    ) -> None:
        self.call_id = call_id
        self.headers = dict(meter.rate_headers)
        self._meter = meter
        self._entry = entry
        self._deployment = deployment
        self._prompt_tokens = prompt_tokens
        self.finished = False

    def finish(self, *, usage: Any, status: int, produced_bytes: int = 0) -> None:
        if self.finished:
            return
        self.finished = True
        reported = _realtime_usage(usage)
        if reported is not None:
            source, (prompt, cached, completion) = UsageSource.REPORTED, reported
        else:
            source, cached = UsageSource.ESTIMATED, 0
            prompt, completion = self._prompt_tokens, produced_bytes // 4 + (1 if produced_bytes else 0)
        self._meter.settle(
            model=self._entry.public_id, deployment_id=self._deployment.id, provider=self._deployment.provider_name,
            status=status, usage_source=source, prompt_tokens=prompt, cached_tokens=cached,
            completion_tokens=completion,
        )


def _realtime_usage(usage: Any) -> tuple[int, int, int] | None:
    """(input, cached, output) tokens from a realtime `response.usage` (audio and text together)."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int) or prompt < 0 or completion < 0:
        return None
    details = usage.get("input_token_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return prompt, min(cached, prompt) if isinstance(cached, int) and cached >= 0 else 0, completion


async def embed(request: EmbeddingsRequest, *, caller: Caller) -> CallResult:
    """One embeddings call."""
    entry = await resolve_model(caller.key, request.model, capability="embeddings", purpose="embeddings")
    if request.wants_dimensions and "dimensions" not in entry.capabilities:
        raise ApiError(
            f"The model `{entry.public_id}` does not support the 'dimensions' parameter.",
            param="dimensions",
            code="unsupported_parameter",
        )
    attempts = _attempts([entry], request.preferences, request.extra_fields)
    call_id = new_call_id()
    meter = await admit(
        key=caller.key,
        call_id=call_id,
        request_id=caller.request_id,
        session_id=caller.session_id,
        endpoint=Endpoint.EMBEDDINGS,
        models=[entry.public_id],
        prompt_tokens=estimate_tokens(request.inputs),
        max_output_tokens=0,
        # The most the inputs can be counted at: a token per byte of text, and token-id lists as they are.
        worst_prompt_tokens=sum(len(item.encode()) if isinstance(item, str) else len(item) for item in request.inputs),
    )
    answered: DeploymentEntry | None = None
    status: int = Status.ERROR
    result: dict[str, Any] | None = None
    try:
        async def embed_with(entry: CatalogEntry, deployment: DeploymentEntry) -> dict[str, Any]:
            call = EmbeddingsCall(
                deployment.upstream_model, _upstream_body(request.body, request.extra_fields, deployment),
                caller.request_id, entry.context_length, deployment.timeout,
                organization=str(caller.key.organization_id), key=caller.key.public_id,
            )
            return await deployment.provider.embeddings(call)

        embeddings, _, deployment = await first_success(attempts, embed_with)
        result, answered, status = embeddings, deployment, Status.OK
    except asyncio.CancelledError:
        status = Status.CLIENT_DISCONNECTED
        raise
    except BaseException as error:
        _with_rate_headers(error, meter)
        raise
    finally:
        settle_embeddings(
            meter, entry=entry, deployment=answered, inputs=request.inputs, status=status,
            usage=result.get("usage") if result is not None else None,
        )
    await meter.recorded()  # in the usage stream before the client has its answer
    embeddings["model"] = entry.public_id
    return CallResult(
        call_id=call_id, body=embeddings, usage=embeddings.get("usage"), model=entry.public_id,
        deployment=deployment, headers={**meter.rate_headers, **_routing_headers(entry, deployment)},
    )

