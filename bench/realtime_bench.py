"""Realtime turns per second and the server's CPU per turn, next to the same answer as an SSE chat stream.

Starts the fake upstream (bench/fake_upstream.py) and Keyway (uvicorn or daphne) on a scratch database (or
DATABASE_URL / REDIS_URL if set), opens N realtime sockets, and on each runs text turns back to back: one
`response.create` (out of band, so every turn has the same one-message prompt) answered by the upstream's
20-chunk stream, read until `response.done`. A turn is one metered engine call, like one chat stream, so
the budget is the same: ≤ 3 ms of server CPU per 20-chunk answer. Metering is on its full path (prepaid, a
price, the ledger), as in proxy_bench.py. Run by hand:
    .venv/bin/python bench/realtime_bench.py --server uvicorn --seconds 5 --concurrency 1,32
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import websockets

BASE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BASE_DIR))

from bench.proxy_bench import LEDGER_COUNT, cpu_seconds, prepare_demo  # noqa: E402
from platform_site import serve  # noqa: E402
from tests.e2e.server import (  # noqa: E402
    drop_database,
    free_port,
    make_environment,
    manage,
    start_fake_upstream,
    stop,
    wait_for,
)

TURN = orjson.dumps({"type": "response.create", "response": {"conversation": "none", "input": [
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}]}}).decode()
CHAT = orjson.dumps({"model": "bench", "stream": True, "messages": [{"role": "user", "content": "Say hello."}]})


async def realtime_turns(url: str, key: str, *, concurrency: int, seconds: float) -> tuple[int, int]:
    """Turns completed and errors, over `concurrency` sockets for `seconds`."""
    done = errors = 0
    stop_at = time.monotonic() + seconds

    async def one_socket() -> None:
        nonlocal done, errors
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"},
                                      max_size=None) as socket:
            await socket.recv()  # session.created
            while time.monotonic() < stop_at:
                await socket.send(TURN)
                while True:
                    event = orjson.loads(await socket.recv())
                    if event["type"] == "error":
                        errors += 1
                        break
                    if event["type"] == "response.done":
                        done += 1
                        break

    await asyncio.gather(*(one_socket() for _ in range(concurrency)))
    return done, errors


async def chat_streams(url: str, key: str, *, concurrency: int, seconds: float) -> tuple[int, int]:
    done = errors = 0
    stop_at = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def one_client(session: aiohttp.ClientSession) -> None:
        nonlocal done, errors
        while time.monotonic() < stop_at:
            async with session.post(url, data=CHAT, headers=headers) as response:
                await response.read()
                if response.status == 200:
                    done += 1
                else:
                    errors += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(one_client(session) for _ in range(concurrency)))
    return done, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=["daphne", "uvicorn"], default="uvicorn")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--ws", default="auto", help="uvicorn's WebSocket implementation (auto, websockets, "
                        "websockets-sansio, wsproto)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="keyway-bench-"))
    env, database = make_environment(scratch)
    env.update(DEBUG="1", KEYWAY_VAR_DIR=str(scratch), KEYWAY_DEFAULT_MODEL="", KEYWAY_DEFAULT_EMBEDDING_MODEL="",
               KEYWAY_DEFAULT_RPM=str(10**9), KEYWAY_DEFAULT_TPM=str(10**12), KEYWAY_PROJECT_RPM=str(10**9),
               KEYWAY_PROJECT_TPM=str(10**12), KEYWAY_REALTIME_SESSIONS_PER_KEY="1000")
    upstream, upstream_url = start_fake_upstream(scratch / "upstream.log")
    keyway = None
    try:
        key = prepare_demo(env, upstream_url)
        port = free_port()
        if args.server == "uvicorn":
            command = [sys.executable, "-m", "uvicorn", "platform_site.asgi:application", "--port", str(port),
                       "--loop", "uvloop", "--http", "httptools", "--ws", args.ws, "--no-access-log",
                       "--log-level", "warning"]
        else:
            command = serve.command(port)
        keyway = subprocess.Popen(command, cwd=BASE_DIR, env=env)
        base = f"127.0.0.1:{port}"
        wait_for(f"http://{base}/health", process=keyway)
        rows = []
        sent = 0
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            for name, run, url in (
                ("sse chat stream", chat_streams, f"http://{base}/v1/chat/completions"),
                ("realtime turn", realtime_turns, f"ws://{base}/v1/realtime?model=bench"),
            ):
                before = cpu_seconds(keyway.pid)
                started = time.monotonic()
                done, errors = asyncio.run(run(url, key, concurrency=concurrency, seconds=args.seconds))
                elapsed = time.monotonic() - started
                cpu = (cpu_seconds(keyway.pid) - before) * 1000 / max(done, 1)
                sent += done + errors
                rows.append((name, concurrency, done, errors, done / elapsed, cpu))
        stop(keyway)
        keyway = None
        ledger = manage(env, "shell", "-c", LEDGER_COUNT).strip().splitlines()[-1].split()[0]
        served = f"{args.server} --ws {args.ws}" if args.server == "uvicorn" else args.server
        print(f"\nserver: {served}, 1 worker, metering and limits on, {args.seconds:g} s per case, "
              f"database: {env.get('DATABASE_URL', 'sqlite')}, cache: {'redis' if env.get('REDIS_URL') else 'local'}")
        print(f"{'case':<20}{'conc':>5}{'done':>8}{'err':>5}{'per s':>9}{'cpu ms each':>13}")
        for name, concurrency, done, errors, rate, cpu in rows:
            print(f"{name:<20}{concurrency:>5}{done:>8}{errors:>5}{rate:>9.0f}{cpu:>13.2f}")
        print(f"answers sent: {sent}; usage ledger rows: {ledger}")
    finally:
        if keyway is not None:
            stop(keyway)
        stop(upstream)
        drop_database(database)


if __name__ == "__main__":
    main()
