"""Graceful drain, against a real uvicorn worker: on SIGTERM it stops accepting connections, lets the open
streams finish up to its deadline (UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN), cuts the rest, settles every call
(cut ones as `client_disconnected`, charged what they produced), writes the ledger and exits."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.e2e import server

pytestmark = pytest.mark.e2e

DEADLINE = 3
LONG, SHORT = 50, 10
OK, CUT = 1, 3  # UsageEvent.Status: ok, client_disconnected

COUNT_BY_STATUS = """
from django.db.models import Count, Min
from billing.models import UsageEvent
rows = UsageEvent.objects.values("model", "status").annotate(n=Count("id"), least=Min("completion_tokens"))
print(json.dumps(sorted([row["model"], row["status"], row["n"], row["least"]] for row in rows)))
"""


async def _open_streams(url: str, key: str, opened: asyncio.Event, target: int) -> tuple[list[bytes], list[bytes]]:
    started = 0
    limits = httpx2.Limits(max_connections=LONG + SHORT + 5)
    async with httpx2.AsyncClient(limits=limits, timeout=60) as client:

        async def one(model: str) -> bytes:
            nonlocal started
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
            received = b""
            try:
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                                         headers={"Authorization": f"Bearer {key}"}) as answer:
                    assert answer.status_code == 200
                    async for piece in answer.aiter_raw():
                        if not received:
                            started += 1
                            if started == target:
                                opened.set()
                        received += piece
            except httpx2.HTTPError:
                pass  # cut by the server at its deadline
            return received

        tasks = [one("slow-stream-30") for _ in range(LONG)] + [one("slow-stream-2") for _ in range(SHORT)]
        results = await asyncio.gather(*tasks)
    return list(results[:LONG]), list(results[LONG:])


def test_sigterm_finishes_short_streams_cuts_long_ones_at_the_deadline_and_settles_every_call(
    tmp_path: Path,
) -> None:
    with server.keyway_stack(tmp_path, upstream_models="slow-stream-30,slow-stream-2",
                             env_extra={"UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN": str(DEADLINE)}) as stack:
        process, url, key, env = stack["process"], stack["url"], stack["key"], stack["env"]

        async def scenario() -> tuple[list[bytes], list[bytes], float]:
            opened = asyncio.Event()
            streams = asyncio.ensure_future(_open_streams(url, key, opened, LONG + SHORT))
            await asyncio.wait_for(opened.wait(), 30)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.5)
            # No longer accepting: a new connection is refused.
            with pytest.raises(httpx2.ConnectError):
                async with httpx2.AsyncClient() as fresh:
                    await fresh.get(f"{url}/health")
            long, short = await streams
            return long, short, time.monotonic() - signalled

        long, short, waited = asyncio.run(scenario())
        # uvicorn re-raises the SIGTERM it handled once it has shut down.
        assert process.wait(timeout=20) in (0, -signal.SIGTERM)
        # Short streams ran to their end; long ones were stopped at the deadline, after some chunks, with an
        # error event that says why (the SDKs raise it) and the end of the stream.
        assert all(text.endswith(b"data: [DONE]\n\n") and b'"error"' not in text for text in short)
        assert all(text.count(b"data: ") > 2 and b'"code": "server_shutting_down"' in text
                   and text.endswith(b"data: [DONE]\n\n") for text in long)
        assert DEADLINE - 0.5 < waited < DEADLINE + 5
        # Every call is in the ledger once, settled: the finished ones ok, the cut ones as the client's
        # disconnection, charged what they produced.
        found = json.loads(server.django_shell(env, "import json\n" + COUNT_BY_STATUS).strip().splitlines()[-1])
        rows = {(model, status): (count, least) for model, status, count, least in found}
        assert set(rows) == {("slow-stream-2", OK), ("slow-stream-30", CUT)}
        assert rows["slow-stream-2", OK] == (SHORT, 20)
        assert rows["slow-stream-30", CUT][0] == LONG and rows["slow-stream-30", CUT][1] >= 1


TURN = {"type": "response.create", "response": {"conversation": "none", "input": [
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}}


def test_sigterm_closes_realtime_sockets_with_1012_and_settles_their_turns(tmp_path: Path) -> None:
    """uvicorn closes WebSockets at once on SIGTERM, with 1012 (Service Restart: reconnect elsewhere), without
    waiting for the deadline; a turn in flight is settled as the client's disconnection, charged what it
    produced, and an idle session costs nothing."""
    import websockets

    with server.keyway_stack(tmp_path, upstream_models="slow-stream-30,slow-stream-2",
                             env_extra={"UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN": str(DEADLINE)}) as stack:
        process, env = stack["process"], stack["env"]
        base = stack["url"].replace("http", "ws", 1) + "/v1/realtime?model="
        headers = {"Authorization": f"Bearer {stack['key']}"}

        async def scenario() -> list[tuple[int | None, float, list[str]]]:
            sockets = [await websockets.connect(base + model, additional_headers=headers)
                       for model in ("slow-stream-30", "slow-stream-2", "slow-stream-2")]
            for socket in sockets:
                assert json.loads(await socket.recv())["type"] == "session.created"
            for socket in sockets[:2]:  # two turns in flight; the third session is idle
                await socket.send(json.dumps(TURN))
            for socket in sockets[:2]:
                while json.loads(await socket.recv())["type"] != "response.output_text.delta":
                    pass
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()

            async def until_closed(socket: Any) -> tuple[int | None, float, list[str]]:
                kinds = []
                try:
                    while True:
                        kinds.append(json.loads(await socket.recv())["type"])
                except websockets.ConnectionClosed as closed:
                    return (closed.rcvd.code if closed.rcvd else None, time.monotonic() - signalled, kinds)

            return list(await asyncio.gather(*(until_closed(socket) for socket in sockets)))

        closes = asyncio.run(scenario())
        assert process.wait(timeout=20) in (0, -signal.SIGTERM)
        assert all(code == 1012 and seconds < 2 for code, seconds, _ in closes), closes
        found = json.loads(server.django_shell(env, "import json\n" + COUNT_BY_STATUS).strip().splitlines()[-1])
        rows = {(model, status): (count, least) for model, status, count, least in found}
        # One settled call per turn, as the client's disconnection, charged the tokens it had produced.
        assert set(rows) == {("slow-stream-30", CUT), ("slow-stream-2", CUT)}, rows
        assert rows["slow-stream-30", CUT][0] == 1 and rows["slow-stream-2", CUT][0] == 1
        assert rows["slow-stream-30", CUT][1] >= 1 and rows["slow-stream-2", CUT][1] >= 1
