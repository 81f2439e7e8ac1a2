"""Any OpenAI-compatible HTTP upstream (OpenAI, vLLM, llama.cpp server, Ollama…) through pooled clients.

Chat completions (whole and streamed) and embeddings go through upstream_http, Keyway's own lean HTTP/1.1
client (its module says why); realtime WebSockets through aiohttp.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson

from completions.providers.base import (
    ChatCall,
    EmbeddingsCall,
    ProviderBusy,
    ProviderConfig,
    ProviderError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from completions.providers.upstream_http import Origin, UpstreamHTTPError, upstream_http
from platform_site.kernel.conf import settings  # Django's, read faster (the module says why)
from platform_site.kernel.loops import PerLoop


def _new_session() -> aiohttp.ClientSession:
    # No connection limit here: the gate below bounds the calls in flight, so a call never waits inside
    # aiohttp for a connection, where the wait would count against its connect timeout and end as a
    # misleading 504. Idle keep-alive connections close after 30 s.
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=0,
        ttl_dns_cache=300,
        keepalive_timeout=30,
    )
    # Compressed upstream bodies would cost CPU on the hot path for nothing on a LAN; ask for identity. No
    # cookie jar: a cookie one upstream sets must not ride along on another tenant's request.
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=True, headers={"Accept-Encoding": "identity"},
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def _close_session(session: aiohttp.ClientSession) -> None:
    await session.close()


# The realtime WebSockets' client session, one per event loop: a session must not cross loops, and a server
# process runs a single loop, so in production this is exactly one pool per worker.
upstream_sessions: PerLoop[aiohttp.ClientSession] = PerLoop(
    "upstream HTTP", _new_session, _close_session, is_closed=lambda session: session.closed
)


class _Gate:
    """The upstream calls and streams in flight from this worker: KEYWAY_UPSTREAM_POOL_SIZE at most, one key
    KEYWAY_UPSTREAM_MAX_PER_KEY of them. A call past the pool's bound waits up to KEYWAY_UPSTREAM_POOL_WAIT
    seconds for a place, then gets 503 `server_overloaded`; a key past its own bound gets 429 at once, so a
    key holding slow streams cannot take every connection from the other tenants."""

    def __init__(self) -> None:
        self._places = asyncio.Semaphore(settings.KEYWAY_UPSTREAM_POOL_SIZE)
        self._by_key: dict[str, int] = {}

    async def enter(self, key: str) -> None:
        held = self._by_key.get(key, 0)
        if key and held >= settings.KEYWAY_UPSTREAM_MAX_PER_KEY:
            raise ProviderBusy(
                f"Too many concurrent upstream requests for this key: at most "
                f"{settings.KEYWAY_UPSTREAM_MAX_PER_KEY} at once on this server. Please try again shortly.",
                retry_after=1, status=429,
            )
        self._by_key[key] = held + 1
        try:
            if self._places.locked():
                await asyncio.wait_for(self._places.acquire(), settings.KEYWAY_UPSTREAM_POOL_WAIT)
            else:
                await self._places.acquire()  # free: returns at once, no timer on the hot path
        except BaseException as error:
            self._forget(key)
            if isinstance(error, TimeoutError):
                raise ProviderBusy(
                    "The server is overloaded: every upstream connection stayed in use for "
                    f"{settings.KEYWAY_UPSTREAM_POOL_WAIT:g} s. Please try again shortly.", retry_after=1,
                ) from None
            raise

    def leave(self, key: str) -> None:
        self._places.release()
        self._forget(key)

    def _forget(self, key: str) -> None:
        held = self._by_key[key] - 1
        if held:
            self._by_key[key] = held
        else:
            del self._by_key[key]


async def _no_close(gate: _Gate) -> None:
    return None


upstream_gates: PerLoop[_Gate] = PerLoop("upstream gate", _Gate, _no_close)


def _retry_after(value: str | None) -> dict[str, str]:
    """An upstream's Retry-After (seconds, at most an hour) for the client, when it is a plain number."""
    try:
        seconds = float(value) if value else -1.0
    except ValueError:
        return {}
    return {"Retry-After": str(max(1, round(seconds)))} if 0 <= seconds <= 3600 else {}


def _rejection(status: int, raw: bytes, retry_after: str | None = None) -> ProviderError:
    """Turn an upstream error answer into the error our client should see. A 429's Retry-After goes with it:
    the client waits as long as the upstream asked (should no other deployment answer)."""
    message, error_type, code, param = f"The upstream provider answered HTTP {status}.", None, None, None
    try:
        parsed = orjson.loads(raw)
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            error_type = error.get("type")
            code = error.get("code")
            param = error.get("param")
        elif isinstance(error, str):
            message = error
    except orjson.JSONDecodeError:
        pass
    if status in (401, 403):
        # The upstream refused *our* credentials; passing its 401 on would tell the client its own key is bad.
        return UpstreamUnavailable("The upstream provider rejected the gateway's credentials.")
    if status >= 500:
        # Its own failure, not the client's: its text (which may name its internals, or another tenant's
        # request) stays here.
        return UpstreamUnavailable(f"The upstream provider failed with HTTP {status}.")
    rejected = UpstreamRejected(
        message,
        status=status,
        error_type=str(error_type) if isinstance(error_type, str) else "invalid_request_error",
        code=str(code) if code is not None else None,
        param=str(param) if param is not None else None,
    )
    if status == 429:
        rejected.headers.update(_retry_after(retry_after))
    return rejected


# The most one server-sent event of an upstream's stream may hold (its data lines together, or one line not yet
# ended): past it the stream is refused rather than buffered.
_MAX_STREAM_EVENT = 1 << 20


def _event_too_large() -> UpstreamUnavailable:
    return UpstreamUnavailable("The upstream provider sent a stream event over 1 MiB.")


def _add_event(data: bytes, batch: list[dict[str, Any]]) -> Exception | None:
    """Append an event's chunk to the batch; or return the failure the event is, appending nothing."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return UpstreamUnavailable("The upstream provider sent a stream event that is not JSON.")
    if not isinstance(chunk, dict):
        return UpstreamUnavailable("The upstream provider sent an unexpected stream event.")
    if chunk.get("error"):
        # Mid-stream failures are the upstream's own; their text is not passed on.
        return UpstreamUnavailable("The upstream provider failed mid-stream.")
    batch.append(chunk)
    return None


class OpenAICompatibleProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.headers = {"Content-Type": "application/json", **dict(config.extra_headers)}
        if config.api_key:
            self.headers["Authorization"] = f"Bearer {config.api_key}"
        self.timeout = config.timeout or settings.KEYWAY_UPSTREAM_TIMEOUT
        self._origin: Origin | None = None

    def origin(self) -> Origin:
        """The upstream calls' origin, built on first use: a configuration the client cannot send (not an http(s)
        URL, a line break in a header) fails those calls, not the catalog that holds every provider."""
        if self._origin is None:
            try:
                self._origin = Origin(self.base_url, self.headers)
            except ValueError:
                raise UpstreamUnavailable(
                    "The upstream provider's configuration cannot be used (its base URL or headers)."
                ) from None
        return self._origin

    def loaded_models(self) -> list[str]:
        return []

    async def _post_json(
        self, path: str, payload: dict[str, Any], timeout: float | None, key: str
    ) -> dict[str, Any]:
        gate = upstream_gates.get()
        await gate.enter(key)
        try:
            return await self._post_json_now(path, payload, timeout)
        finally:
            gate.leave(key)

    async def _post_json_now(self, path: str, payload: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        origin = self.origin()
        total = timeout or self.timeout
        try:
            answer = await upstream_http.get().post(
                origin, path, orjson.dumps(payload), timeout=total,
                connect_timeout=min(total, settings.KEYWAY_UPSTREAM_CONNECT_TIMEOUT),
            )
        except TimeoutError:
            raise UpstreamTimeout("The upstream provider did not answer in time.") from None
        except UpstreamHTTPError as exc:
            raise UpstreamUnavailable(f"Could not reach the upstream provider ({exc.reason}).") from None
        if answer.status >= 400:
            raise _rejection(answer.status, answer.body, answer.retry_after)
        try:
            data = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            raise UpstreamUnavailable("The upstream provider sent a body that is not JSON.") from None
        if not isinstance(data, dict):
            raise UpstreamUnavailable("The upstream provider sent an unexpected body.")
        return data

    async def chat(self, call: ChatCall) -> dict[str, Any]:
        data = await self._post_json("/chat/completions", {**call.body, "model": call.upstream_model}, call.timeout,
                                     call.key)
        if not isinstance(data.get("choices"), list):
            raise UpstreamUnavailable("The upstream provider sent a chat completion without choices.")
        return data

    async def embeddings(self, call: EmbeddingsCall) -> dict[str, Any]:
        data = await self._post_json("/embeddings", {**call.body, "model": call.upstream_model}, call.timeout,
                                     call.key)
        if not isinstance(data.get("data"), list):
            raise UpstreamUnavailable("The upstream provider sent an embeddings answer without data.")
        return data

    async def chat_stream(self, call: ChatCall) -> AsyncGenerator[list[dict[str, Any]], None]:
        gate = upstream_gates.get()
        await gate.enter(call.key)
        try:
            async for batch in self._stream(call):
                yield batch
        finally:
            gate.leave(call.key)

    async def _stream(self, call: ChatCall) -> AsyncGenerator[list[dict[str, Any]], None]:
        payload = {**call.body, "model": call.upstream_model, "stream": True}
        # Always ask for usage: metering must not depend on what the client asked for.
        payload["stream_options"] = {**(call.body.get("stream_options") or {}), "include_usage": True}
        origin = self.origin()
        read_timeout = call.timeout or self.timeout
        try:
            # The read timeout applies to each wait for the upstream (the head, then every read), not to the
            # whole stream: a stream that keeps producing is not cut, only a silent upstream times out.
            stream = await upstream_http.get().open_stream(
                origin, "/chat/completions", orjson.dumps(payload), read_timeout=read_timeout,
                connect_timeout=min(read_timeout, settings.KEYWAY_UPSTREAM_CONNECT_TIMEOUT),
            )
        except TimeoutError:
            raise UpstreamTimeout("The upstream provider did not answer in time.") from None
        except UpstreamHTTPError as exc:
            raise UpstreamUnavailable(f"Could not reach the upstream provider ({exc.reason}).") from None
        finished = False
        try:
            if stream.status >= 400:
                raise _rejection(stream.status, await stream.read_whole(), stream.retry_after)
            # The events are cut from whatever the connection has buffered, not read a line at a time (a
            # readline per line was 13 % of a relayed stream's CPU). The events of one read are yielded
            # together, as one batch, which the surfaces relay in one write.
            held: list[bytes] = []  # the start of a line whose end has not arrived
            held_bytes = 0
            data_lines: list[bytes] = []
            event_bytes = 0
            while not finished:
                block = await stream.read_any()
                if not block:
                    break
                if b"\n" not in block:
                    held.append(block)
                    held_bytes += len(block)
                    if held_bytes + event_bytes > _MAX_STREAM_EVENT:
                        raise _event_too_large()
                    continue
                if held:
                    held.append(block)
                    block = b"".join(held)
                    held, held_bytes = [], 0
                lines = block.split(b"\n")
                tail = lines.pop()
                if tail:
                    held, held_bytes = [tail], len(tail)
                batch: list[dict[str, Any]] = []
                failure: Exception | None = None
                for line in lines:
                    if line.endswith(b"\r"):
                        line = line[:-1]
                    if line:
                        if line.startswith(b"data:"):
                            data = line[5:].lstrip(b" ")
                            data_lines.append(data)
                            event_bytes += len(data)
                            if event_bytes > _MAX_STREAM_EVENT:
                                failure = _event_too_large()
                                break
                        continue
                    if not data_lines:
                        continue
                    data = data_lines[0] if len(data_lines) == 1 else b"\n".join(data_lines)
                    data_lines, event_bytes = [], 0
                    if data.startswith(b"[DONE]"):
                        finished = True
                        break
                    failure = _add_event(data, batch)
                    if failure is not None:
                        break
                if batch:
                    yield batch  # what came before a failure in the same read is relayed (and charged) first
                if failure is not None:
                    raise failure
            if not finished:
                raise UpstreamUnavailable("The upstream provider ended the stream before it was complete.")
        except TimeoutError:
            raise UpstreamTimeout("The upstream provider did not finish in time.") from None
        except UpstreamHTTPError as exc:
            raise UpstreamUnavailable(f"The upstream stream broke ({exc.reason}).") from None
        finally:
            # Kept for the next call if it was read to its end; closed otherwise, which is what tells the
            # upstream to stop generating.
            stream.close()

    async def realtime_connect(self, upstream_model: str, *, beta: bool) -> aiohttp.ClientWebSocketResponse:
        """Open the upstream's realtime WebSocket for `upstream_model` with the gateway's credentials (never
        the client's). The caller relays frames both ways and closes it."""
        url = self.base_url + "/realtime"
        url = ("wss://" + url[len("https://"):]) if url.startswith("https://") else ("ws://" + url[len("http://"):])
        headers = {name: value for name, value in self.headers.items() if name != "Content-Type"}
        if beta:
            headers["OpenAI-Beta"] = "realtime=v1"
        try:
            return await upstream_sessions.get().ws_connect(
                url, params={"model": upstream_model}, headers=headers, heartbeat=30.0,
                timeout=aiohttp.ClientWSTimeout(ws_close=5.0), max_msg_size=settings.KEYWAY_REALTIME_MAX_UPSTREAM_BYTES,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise UpstreamUnavailable("The upstream provider rejected the gateway's credentials.") from None
            if exc.status >= 500 or exc.status == 429:
                raise UpstreamUnavailable(f"The upstream realtime endpoint answered HTTP {exc.status}.") from None
            raise UpstreamRejected(f"The upstream realtime endpoint refused the session (HTTP {exc.status}).",
                                   status=exc.status, error_type="invalid_request_error", code=None,
                                   param=None) from None
        except TimeoutError:
            raise UpstreamTimeout("The upstream realtime endpoint did not answer in time.") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"Could not reach the upstream realtime endpoint ({type(exc).__name__}).") \
                from None


def abandon_pools() -> None:
    """At exit, for servers without lifespan (daphne), which end without closing the pools: drop the sockets
    synchronously, so aiohttp does not report every pool as leaked. `_close` is aiohttp's own synchronous
    half of `close()`."""
    for session in upstream_sessions.instances():
        connector = session.connector
        if connector is not None and not connector.closed:
            connector._close()
