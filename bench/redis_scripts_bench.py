"""CPU per Lua script call of billing's two Redis clients, alone: redis-py's registered script, and
billing.lean_redis's (what billing.counters uses on one Redis).

    .venv/bin/python bench/redis_scripts_bench.py [--calls 5000] [--rounds 2] [--concurrency 1,32]

Runs a small script with billing's settlement's shape (a few keys, a few arguments, one a JSON event) against
REDIS_URL (redis://127.0.0.1:6379/15 by default), the clients alternating, on uvloop as the workers run. Prints
this process's CPU (user + system) and the wall time per call; Redis's own time is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCRIPT = """
for i = 1, tonumber(ARGV[1]) do redis.call('INCRBY', KEYS[i], ARGV[i + 1]) end
redis.call('SET', KEYS[#KEYS], ARGV[#ARGV], 'PX', 10000)
return 1
"""
EVENT = b'{"call_id":"call_0123456789abcdef","request_id":"req_0123456789","model":"bench","prompt_tokens":12,' \
        b'"completion_tokens":7,"cost_micros":123,"status":0}'


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(call, calls: int, concurrency: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    async def worker(count: int) -> None:
        for _ in range(count):
            await call()

    await asyncio.gather(*(worker(50) for _ in range(concurrency)))  # warm: connections open
    started_cpu, started = cpu(), time.perf_counter()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    done = calls // concurrency * concurrency
    return (cpu() - started_cpu) / done * 1e6, (time.perf_counter() - started) / done * 1e6


async def main(args: argparse.Namespace) -> None:
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from billing.lean_redis import LeanRedis

    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/15"
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}:a", f"{prefix}:b", f"{prefix}:c", f"{prefix}:event"]
    arguments = [3, 5, -2, 1, EVENT]
    # As billing.connections makes it: a blocking pool, no retries.
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=64, timeout=8, socket_connect_timeout=2, socket_timeout=2, retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )
    redis_py = redis.asyncio.Redis(connection_pool=pool)
    lean = LeanRedis(url, timeout=2.0, pool_size=64)
    scripts = {"redis-py": redis_py.register_script(SCRIPT), "lean_redis": lean.script(SCRIPT)}
    try:
        print(f"{'client':<12}{'conc':>6}{'CPU µs/call':>14}{'wall µs/call':>14}")
        for concurrency in args.concurrency:
            for _ in range(args.rounds):
                for name, script in scripts.items():
                    spent, took = await measure(lambda script=script: script(keys=names, args=arguments),
                                                args.calls, concurrency)
                    print(f"{name:<12}{concurrency:>6}{spent:>14.1f}{took:>14.1f}")
    finally:
        await redis_py.delete(*names)
        await redis_py.aclose()
        await lean.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=lambda text: [int(part) for part in text.split(",")], default=[1, 32])
    import uvloop

    uvloop.run(main(parser.parse_args()))
