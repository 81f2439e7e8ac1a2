"""A scripted tool-calling model, served over real HTTP on loopback in OpenAI's chat completions shape (the
embedded model is a base model that never calls tools on cue). What it does is read off the conversation:

- the last message is a tool result → it answers `result: <that result>`;
- the last user message is `call <function> <json arguments>` → it calls that function (the arguments
  arriving in pieces, as OpenAI streams them); `always <function> <json>` calls it at every step;
- otherwise → `echo <n>: <last user text>`, n being how many messages (other than system ones) it was sent;
  a last user message starting with `slow` makes it wait two seconds before it starts.

Every request it receives is kept, for tests to look at what each step was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import web

SEEN = web.AppKey("seen", list)


def _plan(messages: list[dict[str, Any]]) -> tuple[str, dict[str, Any] | None]:
    last = messages[-1] if messages else {}
    user = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    text = user.get("content") if isinstance(user.get("content"), str) else ""
    words = text.split(" ", 2)
    if words[0] == "always" and len(words) == 3:
        return "", {"name": words[1], "arguments": words[2]}
    if last.get("role") == "tool":
        return f"result: {last.get('content')}", None
    if words[0] == "call" and len(words) == 3:
        return "", {"name": words[1], "arguments": words[2]}
    counted = sum(1 for m in messages if m.get("role") != "system")
    return f"echo {counted}: {text}", None


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    payload = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": int(time.time()),
               "model": "scripted", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    request.app[SEEN].append(body)
    messages = body.get("messages") or []
    text, call = _plan(messages)
    if text.split(" ", 2)[-1].startswith("slow"):
        await asyncio.sleep(2)
    usage = {"prompt_tokens": 7 * len(messages), "completion_tokens": 3, "total_tokens": 7 * len(messages) + 3}
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if call:
            message["tool_calls"] = [{"id": "call_1", "type": "function", "function": call}]
        return web.json_response({"id": "chatcmpl-scripted", "object": "chat.completion", "created": 0,
                                  "model": "scripted", "usage": usage, "choices": [
                                      {"index": 0, "message": message,
                                       "finish_reason": "tool_calls" if call else "stop"}]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_chunk({"role": "assistant", "content": ""}))
    if call:
        step = len(request.app[SEEN])
        await response.write(_chunk({"tool_calls": [{"index": 0, "id": f"call_{step}", "type": "function",
                                                     "function": {"name": call["name"], "arguments": ""}}]}))
        arguments = call["arguments"]
        for start in range(0, len(arguments), 5):
            await response.write(_chunk({"tool_calls": [{"index": 0, "function": {
                "arguments": arguments[start:start + 5]}}]}))
        await response.write(_chunk({}, "tool_calls"))
    else:
        for start in range(0, len(text), 8):
            await response.write(_chunk({"content": text[start:start + 8]}))
        await response.write(_chunk({}, "stop"))
    final = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 0, "model": "scripted",
             "choices": [], "usage": usage}
    await response.write(b"data: " + orjson.dumps(final) + b"\n\ndata: [DONE]\n\n")
    return response


async def start() -> tuple[web.AppRunner, int, web.Application]:
    app = web.Application()
    app[SEEN] = []
    app.router.add_post("/v1/chat/completions", chat_completions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port, app


@contextlib.contextmanager
def in_thread() -> Iterator[tuple[str, web.Application]]:
    """The scripted model on its own event loop in a thread, for a server process to call: (base URL, app)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="scripted-model", daemon=True)
    thread.start()
    runner, port, app = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"http://127.0.0.1:{port}/v1", app
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
