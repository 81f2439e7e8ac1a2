"""A fast OpenAI-compatible HTTP upstream for benchmarks and fault injection (a real server on loopback).

The requested model name picks the behaviour:
  ok (or anything else)  answer at once; streams send CHUNKS content chunks, a finish chunk and usage
  slow                   sleep 30 s before answering (timeouts)
  http500 / http429 / http400 / http401
                         answer with that status and an OpenAI error body (429 with Retry-After: 7)
  badjson                answer 200 with a body that is not JSON
  stream-break           send two chunks, then drop the connection (no [DONE])
  stream-garbage         send two chunks, then a data line that is not JSON
  stream-stall           send two chunks, then nothing for 30 s (a silent upstream mid-stream)
  trickle                answer like ok, a few bytes at a time (a slow network): TRICKLE_SECONDS in all
  stream-framing         stream like ok, framed every way the SSE format allows: CRLF line ends, comment
                         lines, an event's JSON over two data lines, writes cut in the middle of lines
  stream-huge            send two chunks, then a data line of 2 MiB that never ends
  stream-burst           stream like ok, every event in one write (a fast upstream: they arrive together)
  burst-garbage          the role and two chunks, then a data line that is not JSON, in one write
  drip                   stream like ok, one chunk every DRIP_SECONDS (clients that leave mid-stream)
  slow-stream-<S>        stream like ok, the chunks spread over S seconds (many long streams at once)
  no-usage               stream like ok, but report no usage however it is asked (as llama_cpp.server does)
  chars                  answer like ok, but count one prompt token per character of the messages' text (as
                         CJK text often costs): more than a byte-based estimate expects
  tools-split / tools-repeat / tools-whole
                         answer with two tool calls (get_weather for Paris, get_time), framed as OpenAI does,
                         with id/type/name repeated on every delta and no index, or each call whole with its
                         arguments as an object and finish_reason "stop"
GET /v1/realtime is a realtime WebSocket upstream (audio deltas, usage; models named *vad* answer committed
audio by themselves, as server VAD does).
Run standalone: python bench/fake_upstream.py --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import time

import orjson
from aiohttp import web

CHUNKS = 20
# Connections waiting to be accepted (aiohttp's default is 128): a burst of 1,000 new connections overflowed
# it, and the kernel's dropped handshakes were retried a second later, which bench/targets.py's burst row
# measured as the upstream's (and Keyway's) first byte.
BACKLOG = 4096
DRIP_SECONDS = 0.1
TRICKLE_SECONDS = 0.5
RETRY_AFTER = "7"
SEEN = web.AppKey("seen", list)
REALTIME_SEEN = web.AppKey("realtime_seen", list)


def _completion(model: str) -> dict[str, object]:
    return {
        "id": "chatcmpl-upstream",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the fake upstream."},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16},
    }


def _chunk(model: str, delta: dict[str, object], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-upstream",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


TOOL_CALLS = [("call_w", "get_weather", '{"city": "Paris"}'), ("call_t", "get_time", "{}")]


def _tool_deltas(model: str) -> list[dict[str, object]]:
    deltas: list[dict[str, object]] = []
    for index, (call_id, name, arguments) in enumerate(TOOL_CALLS):
        if model == "tools-whole":
            deltas.append({"tool_calls": [{"id": call_id, "type": "function",
                                           "function": {"name": name, "arguments": orjson.loads(arguments)}}]})
            continue
        pieces = [arguments[: len(arguments) // 2], arguments[len(arguments) // 2 :]]
        if model == "tools-repeat":
            for piece in pieces:
                deltas.append({"role": "assistant", "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": name, "arguments": piece}}]})
            continue
        deltas.append({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                       "function": {"name": name, "arguments": ""}}]})
        deltas += [{"tool_calls": [{"index": index, "function": {"arguments": piece}}]} for piece in pieces]
    return deltas


def _error(status: int) -> web.Response:
    body = {"error": {"message": f"fake upstream error {status}", "type": "invalid_request_error",
                      "param": "messages", "code": f"fake_{status}"}}
    headers = {"Retry-After": RETRY_AFTER} if status == 429 else None
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


async def _trickle(response: web.StreamResponse, data: bytes, seconds: float) -> None:
    """Write `data` a few bytes at a time over `seconds`."""
    step = max(1, len(data) // 50)
    for start in range(0, len(data), step):
        await response.write(data[start : start + step])
        await asyncio.sleep(seconds / 50)


def _ok_events(model: str) -> list[bytes]:
    """ok's stream as events: the role, CHUNKS content chunks, a finish chunk and usage (no [DONE])."""
    events = [_chunk(model, {"role": "assistant", "content": ""})]
    events += [_chunk(model, {"content": f"t{index} "}) for index in range(CHUNKS)]
    events.append(_chunk(model, {}, "stop"))
    usage = {"id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": int(time.time()),
             "model": model, "choices": [],
             "usage": {"prompt_tokens": 9, "completion_tokens": CHUNKS, "total_tokens": 9 + CHUNKS}}
    events.append(b"data: " + orjson.dumps(usage) + b"\n\n")
    return events


async def _framed(response: web.StreamResponse, model: str) -> None:
    """ok's stream, framed in every way SSE allows and written in pieces cut mid-line."""
    events = _ok_events(model)
    framed = b": keep-alive\r\n\r\n"
    for index, event in enumerate(events):
        data = event.removeprefix(b"data: ").rstrip(b"\n")
        if index % 3 == 0:  # the JSON over two data lines (joined with a newline, which JSON reads as space)
            cut = data.index(b",") + 1
            framed += b"data: " + data[:cut] + b"\r\ndata:" + data[cut:] + b"\r\n\r\n"
        elif index % 3 == 1:
            framed += b"event: message\r\nid: " + str(index).encode() + b"\r\ndata: " + data + b"\r\n\r\n"
        else:
            framed += b"data: " + data + b"\n\n"
    framed += b"data: [DONE]\r\n\r\n"
    for start in range(0, len(framed), 37):
        await response.write(framed[start : start + 37])
        await asyncio.sleep(0)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    model = body.get("model", "ok")
    request.app[SEEN].append(body)
    if model == "slow":
        await asyncio.sleep(30)
    if model.startswith("http"):
        return _error(int(model[4:]))
    if model == "badjson":
        return web.Response(status=200, body=b"<html>not json</html>", content_type="text/html")
    if model == "trickle" and not body.get("stream"):
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await _trickle(response, orjson.dumps(_completion(model)), TRICKLE_SECONDS)
        return response
    if not body.get("stream"):
        completion = _completion(model)
        if model == "chars":
            prompt = sum(len(m["content"]) for m in body["messages"] if isinstance(m.get("content"), str))
            completion["usage"] = {"prompt_tokens": prompt, "completion_tokens": 7, "total_tokens": prompt + 7}
        if model.startswith("tools"):
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": orjson.loads(arguments)}}
                for call_id, name, arguments in TOOL_CALLS]}
            completion["choices"] = [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}]
        return web.Response(body=orjson.dumps(completion), content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if model.startswith("tools"):
        for delta in _tool_deltas(model):
            await response.write(_chunk(model, delta))
        await response.write(_chunk(model, {}, "stop" if model != "tools-split" else "tool_calls"))
        await response.write(b"data: [DONE]\n\n")
        return response
    if model == "stream-framing":
        await _framed(response, model)
        return response
    if model == "stream-burst":
        await response.write(b"".join(_ok_events(model)) + b"data: [DONE]\n\n")
        return response
    if model == "burst-garbage":
        await response.write(b"".join(_ok_events(model)[:3]) + b"data: <html>502 Bad Gateway</html>\n\n")
        return response
    await response.write(_chunk(model, {"role": "assistant", "content": ""}))
    cut = model in ("stream-break", "stream-garbage", "stream-stall", "stream-huge")
    count = 2 if cut else CHUNKS
    pause = DRIP_SECONDS if model == "drip" else 0.0
    if model.startswith("slow-stream-"):
        pause = float(model.removeprefix("slow-stream-")) / count
    for index in range(count):
        if pause:
            await asyncio.sleep(pause)
        chunk = _chunk(model, {"content": f"t{index} "})
        if model == "trickle":
            await _trickle(response, chunk, TRICKLE_SECONDS / count)
        else:
            await response.write(chunk)
    if model == "stream-break":
        request.transport.close()  # type: ignore[union-attr]
        return response
    if model == "stream-garbage":
        await response.write(b"data: <html>502 Bad Gateway</html>\n\n")
        return response
    if model == "stream-stall":
        await asyncio.sleep(30)
        return response
    if model == "stream-huge":
        for _ in range(32):
            await response.write(b"data: " + b"x" * 65536)
        await asyncio.sleep(30)
        return response
    await response.write(_chunk(model, {}, "stop"))
    if (body.get("stream_options") or {}).get("include_usage") and model != "no-usage":
        usage = {"id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": int(time.time()),
                 "model": model, "choices": [],
                 "usage": {"prompt_tokens": 9, "completion_tokens": count, "total_tokens": 9 + count}}
        await response.write(b"data: " + orjson.dumps(usage) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    return response


async def embeddings(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    request.app[SEEN].append(body)
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = [{"object": "embedding", "index": i, "embedding": [0.5, -0.25, float(i)]} for i in range(len(inputs))]
    payload = {"object": "list", "data": data, "model": body.get("model"),
               "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)}}
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


# A 1×1 PNG, for server-side image fetching.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201a5a0b1a40000000049454e44ae426082"
)


async def image(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name == "slow.png":
        await asyncio.sleep(30)
    if name == "big.png":
        return web.Response(body=PNG + b"\0" * (2 * 1024 * 1024), content_type="image/png")
    if name == "page.html":
        return web.Response(text="<html></html>", content_type="text/html")
    return web.Response(body=PNG, content_type="image/png")


async def models(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps({"object": "list", "data": []}), content_type="application/json")


REALTIME_DELTAS = 10
REALTIME_SECONDS = 0.05


class _RealtimeSession:
    """The fake realtime upstream's side of one socket: a GA realtime server in miniature that answers every
    response with REALTIME_DELTAS audio and transcript deltas, REALTIME_SECONDS apart, and reports usage."""

    def __init__(self, ws: web.WebSocketResponse, model: str) -> None:
        self.ws = ws
        self.model = model
        self.count = 0
        self.audio_bytes = 0
        self.running: dict[str, asyncio.Task[None]] = {}

    async def send(self, event: dict[str, object]) -> None:
        self.count += 1
        await self.ws.send_str(orjson.dumps({"event_id": f"event_up{self.count}", **event}).decode())

    def session(self) -> dict[str, object]:
        return {"type": "realtime", "object": "realtime.session", "id": "sess_upstream", "model": self.model,
                "output_modalities": ["audio"], "instructions": "", "tools": [], "tool_choice": "auto",
                "max_output_tokens": "inf", "audio": {"output": {"voice": "marin"}}}

    def start(self, response_id: str) -> None:
        self.running[response_id] = asyncio.get_running_loop().create_task(self.respond(response_id))

    async def respond(self, response_id: str) -> None:
        item_id = f"item_{response_id}"
        base = {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
        produced = 0
        status = "completed"
        await self.send({"type": "response.created", "response": {"object": "realtime.response",
                                                                   "id": response_id, "status": "in_progress"}})
        try:
            await self.send({"type": "response.output_item.added", "response_id": response_id, "output_index": 0,
                             "item": {"id": item_id, "type": "message", "role": "assistant", "content": []}})
            for _ in range(REALTIME_DELTAS):
                await asyncio.sleep(REALTIME_SECONDS)
                await self.send({"type": "response.output_audio.delta", **base,
                                 "delta": base64.b64encode(bytes(4800)).decode()})
                await self.send({"type": "response.output_audio_transcript.delta", **base, "delta": "la "})
                produced += 1
        except asyncio.CancelledError:
            status = "cancelled"
        usage = {"total_tokens": 20 + produced * 5, "input_tokens": 20, "output_tokens": produced * 5,
                 "input_token_details": {"cached_tokens": 4, "text_tokens": 8, "audio_tokens": 12},
                 "output_token_details": {"text_tokens": produced, "audio_tokens": produced * 4}}
        self.running.pop(response_id, None)
        await self.send({"type": "response.done", "response": {"object": "realtime.response", "id": response_id,
                                                                "status": status, "usage": usage}})

    async def handle(self, event: dict[str, object]) -> None:
        kind = event.get("type")
        if kind == "session.update":
            await self.send({"type": "session.updated", "session": self.session()})
        elif kind == "input_audio_buffer.append":
            self.audio_bytes += len(base64.b64decode(str(event.get("audio", ""))))
        elif kind == "input_audio_buffer.commit":
            await self.send({"type": "input_audio_buffer.committed", "item_id": f"item_in{self.count}"})
            if "vad" in self.model:  # server VAD: the upstream answers by itself
                self.start(f"resp_vad{self.count}")
        elif kind == "conversation.item.create":
            raw = event.get("item")
            item = {"id": f"item_up{self.count}", "status": "completed", **(raw if isinstance(raw, dict) else {})}
            await self.send({"type": "conversation.item.added", "previous_item_id": None, "item": item})
            await self.send({"type": "conversation.item.done", "previous_item_id": None, "item": item})
        elif kind == "response.create":
            self.start(f"resp_up{self.count}")
        elif kind == "response.cancel":
            task = self.running.get(str(event.get("response_id")))
            if task is not None:
                task.cancel()
        else:
            await self.send({"type": "error", "error": {"type": "invalid_request_error", "code": "unknown_event",
                                                        "message": f"Unknown event {kind}",
                                                        "event_id": event.get("event_id")}})


async def realtime(request: web.Request) -> web.WebSocketResponse:
    """GET /v1/realtime: a fake realtime upstream (models named *vad* answer committed audio by themselves)."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    model = request.query.get("model", "")
    request.app[REALTIME_SEEN].append({"authorization": request.headers.get("Authorization"), "model": model,
                                       "beta": request.headers.get("OpenAI-Beta")})
    session = _RealtimeSession(ws, model)
    await session.send({"type": "session.created", "session": session.session()})
    # The upstream's own account limits: a gateway must not pass these to its clients.
    await session.send({"type": "rate_limits.updated", "rate_limits": [
        {"name": "requests", "limit": 99999, "remaining": 99998, "reset_seconds": 1}]})
    async for message in ws:
        if message.type == web.WSMsgType.TEXT:
            await session.handle(orjson.loads(message.data))
    for task in list(session.running.values()):
        task.cancel()
    return ws


class _Unkept(list[object]):
    """What a standalone server sees, which nobody can read: not kept. Kept, it grew by every request, and the
    full collections of that growing heap stalled the upstream for 7 ms after 40,000 requests and 54 ms after
    170,000 (wrk at concurrency 1: the bench's direct p99.9, and its p99 from 0.2 to 8 ms)."""

    def append(self, item: object) -> None:
        pass


def make_app(*, keep_seen: bool = True) -> web.Application:
    """`keep_seen`: the requests are kept in app[SEEN] and app[REALTIME_SEEN], for tests to read."""
    app = web.Application()
    app[SEEN] = [] if keep_seen else _Unkept()
    app[REALTIME_SEEN] = [] if keep_seen else _Unkept()
    app.router.add_get("/v1/realtime", realtime)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/files/{name}", image)
    return app


async def start(host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int, web.Application]:
    app = make_app()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=BACKLOG)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, bound, app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(keep_seen=False), host=args.host, port=args.port, access_log=None, print=None, backlog=BACKLOG)


if __name__ == "__main__":
    main()
