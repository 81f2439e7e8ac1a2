"""Many long streams at once through Keyway: do they all succeed, and what does a client get past the bound?

Starts the fake upstream (bench/fake_upstream.py) and Keyway (uvicorn, 2 workers, default settings) and
opens `--streams` concurrent streams of a model whose upstream spreads its 20 chunks over `--seconds`.
Prints how many completed, and the statuses of those that did not. Before the upstream gate, 1,000 streams
of 10 s at the default pool of 256 per worker lost 191 as 504s after 10 s (a pool wait counted as a
connect timeout).

    .venv/bin/python bench/streams_bench.py [--streams 1000] [--seconds 10] [--workers 2] [--env K=V ...]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

BASE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BASE_DIR))

from bench.proxy_bench import prepare_demo  # noqa: E402
from tests.e2e.server import (  # noqa: E402
    drop_database,
    free_port,
    make_environment,
    manage,
    start_fake_upstream,
    stop,
    wait_for,
)


async def one(session: aiohttp.ClientSession, url: str, key: str, model: str) -> str:
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                         "max_tokens": 64})
    try:
        async with session.post(url, data=body, headers={"Authorization": f"Bearer {key}",
                                                          "Content-Type": "application/json"}) as response:
            if response.status != 200:
                error = orjson.loads(await response.read()).get("error") or {}
                return f"{response.status} {error.get('code')}: {str(error.get('message'))[:90]}"
            text = (await response.read()).decode()
            return "ok" if text.rstrip().endswith("data: [DONE]") else "broken"
    except aiohttp.ClientError as exc:
        return type(exc).__name__


async def drive(url: str, key: str, model: str, streams: int) -> tuple[collections.Counter[str], float]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        started = time.monotonic()
        outcomes = await asyncio.gather(*(one(session, url, key, model) for _ in range(streams)))
        return collections.Counter(outcomes), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--env", action="append", default=[], help="a Keyway setting, NAME=value")
    args = parser.parse_args()
    model = f"slow-stream-{args.seconds:g}"
    with tempfile.TemporaryDirectory() as scratch:
        var_dir = Path(scratch)
        env, database = make_environment(var_dir)
        upstream, upstream_url = start_fake_upstream(var_dir / "upstream.log")
        keyway = None
        try:
            key = prepare_demo(env, upstream_url)
            env["KEYWAY_UPSTREAM_MODELS"] = f"bench,{model}"
            manage(env, "bootstrap")  # again, to add the slow model
            # Limits that let all the streams in: what is measured is the server's capacity, not the key's.
            key = manage(env, "createapikey", "demo", "--name", "streams", "--rpm", "1000000",
                         "--tpm", "1000000000").strip()
            env.update(dict(item.split("=", 1) for item in args.env))
            port = free_port()
            keyway = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "platform_site.asgi:application", "--port", str(port),
                 "--workers", str(args.workers), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                 "--log-level", "warning", "--backlog", "4096"],
                cwd=BASE_DIR, env=env, stdout=(var_dir / "keyway.log").open("ab"), stderr=subprocess.STDOUT,
            )
            url = f"http://127.0.0.1:{port}"
            wait_for(f"{url}/health", process=keyway)
            outcomes, took = asyncio.run(drive(f"{url}/v1/chat/completions", key, model, args.streams))
            print(f"{args.streams} concurrent {args.seconds:g}-second streams, {args.workers} workers, "
                  f"{' '.join(args.env) or 'default settings'}: done in {took:.1f} s")
            for outcome, count in outcomes.most_common():
                print(f"  {outcome}: {count}")
        finally:
            for process in (keyway, upstream):
                if process is not None:
                    stop(process)
            drop_database(database)


if __name__ == "__main__":
    main()
