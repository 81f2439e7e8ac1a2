"""POST /v1/chat/completions: parse, one engine call, respond (JSON, or Server-Sent Events)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from django.http import HttpResponseBase, StreamingHttpResponse

from apikeys.scopes import CHAT
from completions.api import sse
from completions.api.content import content_step
from completions.api.http import ApiRequest, api_endpoint, json_body, json_response
from completions.api.requests import parse_chat
from completions.api.turns import chat_turn, is_turn
from completions.engine import calls
from platform_site.kernel import ids
from platform_site.kernel.errors import to_api_error


@api_endpoint(methods=("POST",), scope=CHAT)
async def chat_completions(request: ApiRequest) -> HttpResponseBase:
    body = json_body(request)
    if is_turn(body, request.api_key.pinned_model):
        return await chat_turn(request, body)
    chat, report = parse_chat(body, model_pinned=bool(request.api_key.pinned_model))
    completion_id = f"chatcmpl-{ids.token_hex(12)}"
    if chat.stream:
        stream = await calls.chat_stream(chat, caller=request.caller, prepare=content_step(report))
        return StreamingHttpResponse(
            _ServerSentEvents(stream, completion_id=completion_id, include_usage=chat.include_usage,
                              request_id=request.request_id),
            content_type=sse.CONTENT_TYPE,
            headers={**sse.HEADERS, **stream.headers},
        )
    result = await calls.chat(chat, caller=request.caller, prepare=content_step(report))
    completion = result.body
    completion["id"] = completion_id
    completion["object"] = "chat.completion"
    completion.setdefault("created", int(time.time()))
    return json_response(completion, headers=result.headers)


class _ServerSentEvents:
    """The body of a streamed answer: the engine's chunks as `chat.completion.chunk` events.

    It has a `close()`, so Django's StreamingHttpResponse registers it among the response's closers: when the
    response is closed — finished, or abandoned by a client that left, under whichever handler — the engine's
    stream settles what is left.
    """

    def __init__(self, stream: calls.ChatStream, *, completion_id: str, include_usage: bool, request_id: str):
        self.stream = stream
        self.close = stream.close
        self.envelope = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": stream.model}
        self.include_usage = include_usage
        self.request_id = request_id

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events()

    async def _events(self) -> AsyncIterator[bytes]:
        """One part per batch of chunks that arrived together, so that one write relays them all."""
        envelope = self.envelope
        frame = sse.frame
        try:
            async with contextlib.aclosing(self.stream.batches()) as batches:
                async for batch in batches:
                    if len(batch) == 1:
                        yield frame({**envelope, "choices": batch[0]})
                    else:
                        yield b"".join([frame({**envelope, "choices": choices}) for choices in batch])
        except Exception as exc:  # noqa: BLE001 - after the first byte an error can only be an SSE event
            # The stream has settled itself as incomplete; the client learns why.
            yield sse.error_frame(to_api_error(exc, request_id=self.request_id).body()) + sse.DONE
            return
        # The stream settled itself when the upstream finished, before these last frames.
        if self.include_usage:
            final: dict[str, Any] = {**envelope, "choices": [], "usage": self._usage()}
            yield frame(final) + sse.DONE
        else:
            yield sse.DONE

    def _usage(self) -> dict[str, Any] | None:
        """The upstream's own report, or else the tokens the call was charged for (counted), as OpenAI reports
        them: a client that asked for usage always gets it."""
        if self.stream.usage is not None:
            return self.stream.usage
        billed = self.stream.billed_usage
        if billed is None:
            return None
        return {"prompt_tokens": billed["prompt_tokens"], "completion_tokens": billed["completion_tokens"],
                "total_tokens": billed["total_tokens"]}
