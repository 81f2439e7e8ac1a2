"""Throughput, latency and server CPU of /v1/chat/completions through Keyway versus straight to the upstream.

Starts a fast fake upstream (bench/fake_upstream.py, a real HTTP server on loopback) and Keyway (daphne or
uvicorn, N workers) on a scratch SQLite database (or DATABASE_URL / REDIS_URL if set), then drives both with
an aiohttp load generator at each concurrency. Prints requests/s, p50/p99 latency, and the server processes'
CPU time per request, read from /proc. Run by hand: `make bench` or
    .venv/bin/python bench/proxy_bench.py --server uvicorn --workers 2 --seconds 5

Metering is on by default, on its full path: the demo organization is prepaid (a credit check and a
reservation per request), the model has a price, and every request is settled into the usage ledger. The
closing lines compare the ledger with the requests sent, and (on PostgreSQL) count the database
transactions per request. `--no-metering` turns metering and rate limits off, to see what they cost.
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

CLK_TCK = os.sysconf("SC_CLK_TCK")

# The demo organization on a prepaid plan with ample credit, and a price for the benchmark's model, so that
# every request takes the full metered path: credit check, reservation, cost, ledger row.
PREPAID_SETUP = """
from billing.models import Plan, Price
from billing.services import billing_plan_set, credit_add
from platform_site.models import Organization
org = Organization.objects.get(slug="demo")
billing_plan_set(organization=org, plan=Plan.objects.create(name="bench", billing_mode="prepaid"))
credit_add(organization=org, amount_micros=10**15, reason="benchmark", actor_label="bench")
Price.objects.create(model="bench", input_per_million_micros=2_500_000, output_per_million_micros=10_000_000)
"""
# Ledger rows, and on PostgreSQL the transactions the database has committed so far (read before and after).
LEDGER_COUNT = """
from django.db import connection
from billing.models import UsageEvent
commits = "-"
if connection.vendor == "postgresql":
    with connection.cursor() as cursor:
        cursor.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        commits = cursor.fetchone()[0]
print(UsageEvent.objects.count(), commits)
"""


def prepare_demo(env: dict[str, str], upstream_url: str) -> str:
    """The scratch database of a benchmark: migrated, the demo organization on a prepaid plan, the fake
    upstream's `bench` model priced; returns a key of the demo organization."""
    env.update(KEYWAY_UPSTREAM_BASE_URL=f"{upstream_url}/v1", KEYWAY_UPSTREAM_MODELS="bench",
               KEYWAY_UPSTREAM_NAME="fake")
    manage(env, "migrate", "--no-input", "-v", "0")
    manage(env, "bootstrap")
    key = manage(env, "createapikey", "demo", "--name", "bench").strip()
    manage(env, "shell", "-c", PREPAID_SETUP)
    return key


def own_cpu_seconds(pid: int) -> float:
    """User + system CPU of one process, without its children's (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (uvicorn's workers)."""
    pids = [pid]
    try:
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        pids += [int(child) for child in children]
    except FileNotFoundError:
        pass
    return sum(own_cpu_seconds(one) for one in pids)


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
                   pid: int | None, store: bool | None = None) -> dict[str, object]:
    if store is None:
        body = orjson.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}], "stream": stream,
                             "max_tokens": 32})
    else:  # /v1/responses
        body = orjson.dumps({"model": "bench", "input": "hi", "stream": stream, "max_output_tokens": 32,
                             "store": store})
    # Warm up connections, caches and the catalog before measuring.
    warm, _, _ = await load(url, headers, body, concurrency=concurrency, seconds=1.0, max_requests=200, stream=stream)
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
        "sent": warm + count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=["daphne", "uvicorn"], default="uvicorn")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--no-limits", action="store_true", help="run Keyway with rate limiting off")
    parser.add_argument("--responses", action="store_true",
                        help="also measure /v1/responses, stored (a database write per response) and not")
    parser.add_argument("--no-metering", action="store_true",
                        help="run Keyway with metering (reservations, usage ledger) and rate limits off")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="keyway-bench-"))
    # A scratch database (a new PostgreSQL database where DATABASE_URL is set) and Redis key prefix.
    env, database = make_environment(scratch)
    env.update(DEBUG="1", KEYWAY_VAR_DIR=str(scratch), KEYWAY_DEFAULT_MODEL="",
               KEYWAY_DEFAULT_EMBEDDING_MODEL="", PYTHONUNBUFFERED="1",
               # Limits on but out of reach: the benchmark measures their cost, not their refusals.
               KEYWAY_DEFAULT_RPM=str(10**9), KEYWAY_DEFAULT_TPM=str(10**12),
               KEYWAY_PROJECT_RPM=str(10**9), KEYWAY_PROJECT_TPM=str(10**12),
               KEYWAY_RATE_LIMITS="0" if args.no_limits or args.no_metering else "1",
               KEYWAY_METERING="0" if args.no_metering else "1")
    upstream, upstream_url = start_fake_upstream(scratch / "upstream.log")
    keyway = None
    try:
        key = prepare_demo(env, upstream_url)
        commits_before = manage(env, "shell", "-c", LEDGER_COUNT).strip().splitlines()[-1].split()[1]
        port = free_port()
        if args.server == "uvicorn":
            command = [sys.executable, "-m", "uvicorn", "platform_site.asgi:application", "--port", str(port),
                       "--workers", str(args.workers), "--loop", "uvloop", "--http", "httptools",
                       "--no-access-log", "--log-level", "warning"]
        else:
            if args.workers != 1:
                parser.error("daphne runs one process; use --server uvicorn for several workers")
            command = serve.command(port)
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
                for store in (False, True) if args.responses else ():
                    results.append(asyncio.run(run_case(
                        f"keyway responses {'stored ' if store else ''}{'stream' if stream else 'json'}",
                        f"{keyway_url}/v1/responses", auth, stream=stream, concurrency=concurrency,
                        seconds=args.seconds, pid=keyway.pid, store=store)))
        stop(keyway)  # a clean stop writes the last usage events
        keyway = None
        ledger = manage(env, "shell", "-c", LEDGER_COUNT).strip().splitlines()[-1].split()
        sent = sum(int(row["sent"]) for row in results if str(row["case"]).startswith("keyway"))
        limits = "off" if args.no_limits or args.no_metering else "on"
        print(f"\nserver: {args.server}, workers: {args.workers}, rate limits: {limits}, "
              f"metering: {'off' if args.no_metering else 'on'}, "
              f"{args.seconds:g} s per case, "
              f"database: {env.get('DATABASE_URL', 'sqlite')}, cache: {'redis' if env.get('REDIS_URL') else 'local'}")
        print(f"{'case':<28}{'conc':>5}{'req':>8}{'err':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'cpu ms/req':>12}")
        for row in results:
            cpu = row["cpu_ms_per_request"]
            print(f"{row['case']:<28}{row['concurrency']:>5}{row['requests']:>8}{row['errors']:>5}"
                  f"{row['rps']:>9.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
                  f"{(f'{cpu:.2f}' if cpu is not None else '-'):>12}")
        print(f"requests sent to keyway: {sent}; usage ledger rows: {ledger[0]}; "
              f"database transactions per request: {(int(ledger[1]) - int(commits_before)) / sent:.3f}"
              if ledger[1] != "-" else
              f"requests sent to keyway: {sent}; usage ledger rows: {ledger[0]}")
    finally:
        if keyway is not None:
            stop(keyway)
        stop(upstream)
        drop_database(database)


if __name__ == "__main__":
    main()
