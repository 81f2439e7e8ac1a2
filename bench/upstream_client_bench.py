"""CPU per upstream JSON call of the two HTTP clients Keyway could make it with: aiohttp (as the providers
configured it) and completions.providers.upstream_http (what JSON calls use), in one process on
uvloop, against the fake upstream (bench/fake_upstream.py, a real HTTP server in its own process). Rounds
alternate between the two, so that the machine's drift falls on both.

    .venv/bin/python bench/upstream_client_bench.py [--calls 5000] [--concurrency 1,32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "platform_site.settings")

import aiohttp  # noqa: E402
import orjson  # noqa: E402
import uvloop  # noqa: E402

from tests.e2e.server import free_port, wait_for  # noqa: E402

PAYLOAD = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-upstream"}


async def measure(kind: str, base_url: str, calls: int, concurrency: int) -> float:
    """CPU µs per call of `concurrency` callers making `calls` calls together, after a warm-up round."""
    from completions.providers.upstream_http import Origin, UpstreamHTTP

    one: Callable[[], Awaitable[object]]
    if kind == "aiohttp":
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30), headers={"Accept-Encoding": "identity"},
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        timeout = aiohttp.ClientTimeout(total=30, sock_connect=5)

        async def one_aiohttp() -> object:
            async with session.post(base_url + "/chat/completions", data=orjson.dumps(PAYLOAD), headers=HEADERS,
                                    timeout=timeout) as response:
                return orjson.loads(await response.read())

        one, close = one_aiohttp, session.close
    else:
        client, origin = UpstreamHTTP(), Origin(base_url, HEADERS)

        async def one_lean() -> object:
            answer = await client.post(origin, "/chat/completions", orjson.dumps(PAYLOAD), timeout=30,
                                       connect_timeout=5)
            return orjson.loads(answer.body)

        one, close = one_lean, client.close

    async def run(count: int) -> None:
        left = iter(range(count))

        async def caller() -> None:
            for _ in left:
                await one()

        await asyncio.gather(*(caller() for _ in range(concurrency)))

    await run(min(calls, 1000))
    started = time.process_time()
    await run(calls)
    spent = time.process_time() - started
    await close()
    return spent / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import django

    django.setup()
    port = free_port()
    upstream = subprocess.Popen([sys.executable, str(BASE_DIR / "bench" / "fake_upstream.py"), "--port", str(port)],
                                cwd=BASE_DIR)
    try:
        wait_for(f"http://127.0.0.1:{port}/v1/models", process=upstream)
        base_url = f"http://127.0.0.1:{port}/v1"
        print(f"CPU µs per JSON call, {args.calls} calls per case, {args.rounds} alternating rounds")
        print(f"{'client':<14}" + "".join(f"{f'c={c}':>18}" for c in args.concurrency.split(",")))
        results: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for kind in ("aiohttp", "upstream_http"):
                for concurrency in (int(c) for c in args.concurrency.split(",")):
                    results.setdefault((kind, concurrency), []).append(
                        uvloop.run(measure(kind, base_url, args.calls, concurrency)))
        for kind in ("aiohttp", "upstream_http"):
            cells = [" / ".join(f"{value:.1f}" for value in results[(kind, int(c))])
                     for c in args.concurrency.split(",")]
            print(f"{kind:<14}" + "".join(f"{cell:>18}" for cell in cells))
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)


if __name__ == "__main__":
    main()
