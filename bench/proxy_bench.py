"""Throughput, latency and server CPU of /v1/chat/completions through Keyway versus straight to the upstream.

Starts a fast fake upstream (bench/fake_upstream.py, a real HTTP server on loopback) and Keyway (daphne or
uvicorn, N workers) on a scratch SQLite database (or DATABASE_URL / REDIS_URL if set), then drives both with
an aiohttp load generator at each concurrency. Prints requests/s, p50/p99 latency, and the server processes'
CPU time per request, read from /proc. Run by hand: `make bench` or
    .venv/bin/python bench/proxy_bench.py --server uvicorn --workers 2 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

BASE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BASE_DIR))

from tests.e2e.server import free_port, manage, stop, wait_for  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants (uvicorn's workers are children)."""
    total = 0.0
    pids = [pid]
    try:
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        pids += [int(child) for child in children]
    except FileNotFoundError:
        pass
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


async def load(url: str, headers: dict[str, str], body: bytes, *, concurrency: int, seconds: float,
               max_requests: int, stream: bool) -> tuple[int, list[float], int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    sent = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal errors, sent
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as response:
                    if stream:
                        async for _ in response.content:
                            pass
                    else:
                        await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies), latencies, errors


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def run_case(name: str, url: str, headers: dict[str, str], *, stream: bool, concurrency: int, seconds: float,
                   pid: int | None) -> dict[str, object]:
    body = orjson.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
    # Warm up connections, caches and the catalog before measuring.
    await load(url, headers, body, concurrency=concurrency, seconds=1.0, max_requests=200, stream=stream)
    cpu_before = cpu_seconds(pid) if pid else 0.0
    started = time.perf_counter()
    count, latencies, errors = await load(url, headers, body, concurrency=concurrency, seconds=seconds,
                                          max_requests=100_000, stream=stream)
    elapsed = time.perf_counter() - started
    cpu = (cpu_seconds(pid) - cpu_before) if pid else None
    return {
        "case": name,
        "concurrency": concurrency,
        "requests": count,
        "errors": errors,
        "rps": count / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "cpu_ms_per_request": (cpu * 1000 / count) if cpu is not None and count else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=["daphne", "uvicorn"], default="uvicorn")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--no-limits", action="store_true", help="run Keyway with rate limiting off")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="keyway-bench-"))
    env = dict(os.environ, DEBUG="1", KEYWAY_VAR_DIR=str(scratch), KEYWAY_DEFAULT_MODEL="",
               KEYWAY_DEFAULT_EMBEDDING_MODEL="", PYTHONUNBUFFERED="1",
               # Limits on but out of reach: the benchmark measures their cost, not their refusals.
               KEYWAY_DEFAULT_RPM=str(10**9), KEYWAY_DEFAULT_TPM=str(10**12),
               KEYWAY_RATE_LIMITS="0" if args.no_limits else "1")
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(BASE_DIR / "bench" / "fake_upstream.py"), "--port",
                                 str(upstream_port)], cwd=BASE_DIR)
    keyway = None
    try:
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        wait_for(f"{upstream_url}/v1/models", process=upstream)
        env.update(KEYWAY_UPSTREAM_BASE_URL=f"{upstream_url}/v1", KEYWAY_UPSTREAM_MODELS="bench",
                   KEYWAY_UPSTREAM_NAME="fake")
        manage(env, "migrate", "--no-input", "-v", "0")
        manage(env, "bootstrap")
        key = manage(env, "createapikey", "demo", "--name", "bench").strip()
        port = free_port()
        if args.server == "uvicorn":
            command = [sys.executable, "-m", "uvicorn", "platform_site.asgi:application", "--port", str(port),
                       "--workers", str(args.workers), "--loop", "uvloop", "--http", "httptools",
                       "--no-access-log", "--log-level", "warning"]
        else:
            if args.workers != 1:
                parser.error("daphne runs one process; use --server uvicorn for several workers")
            command = [sys.executable, "-m", "daphne", "-p", str(port), "-v", "0", "platform_site.asgi:application"]
        keyway = subprocess.Popen(command, cwd=BASE_DIR, env=env)
        keyway_url = f"http://127.0.0.1:{port}"
        wait_for(f"{keyway_url}/health", process=keyway)

        results = []
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        plain = {"Content-Type": "application/json"}
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            for stream in (False, True):
                kind = "stream(20 chunks)" if stream else "json"
                results.append(asyncio.run(run_case(
                    f"direct {kind}", f"{upstream_url}/v1/chat/completions", plain, stream=stream,
                    concurrency=concurrency, seconds=args.seconds, pid=None)))
                results.append(asyncio.run(run_case(
                    f"keyway {kind}", f"{keyway_url}/v1/chat/completions", auth, stream=stream,
                    concurrency=concurrency, seconds=args.seconds, pid=keyway.pid)))
        print(f"\nserver: {args.server}, workers: {args.workers}, rate limits: {'off' if args.no_limits else 'on'}, "
              f"{args.seconds:g} s per case, "
              f"database: {env.get('DATABASE_URL', 'sqlite')}, cache: {'redis' if env.get('REDIS_URL') else 'local'}")
        print(f"{'case':<28}{'conc':>5}{'req':>8}{'err':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'cpu ms/req':>12}")
        for row in results:
            cpu = row["cpu_ms_per_request"]
            print(f"{row['case']:<28}{row['concurrency']:>5}{row['requests']:>8}{row['errors']:>5}"
                  f"{row['rps']:>9.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
                  f"{(f'{cpu:.2f}' if cpu is not None else '-'):>12}")
    finally:
        if keyway is not None:
            stop(keyway)
        stop(upstream)


if __name__ == "__main__":
    main()
