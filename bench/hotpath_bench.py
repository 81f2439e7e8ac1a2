"""CPU and Python function calls per request of Keyway's hot path, in one process, without server or load
generator noise.

The real ASGI application is called in process (the way a server would call it), against the fake upstream
(bench/fake_upstream.py, a real HTTP server in its own process), with auth, rate limits and metering on (a
prepaid organization, a priced model). Two numbers per case:
- CPU ms per request: this process's CPU time over many requests, so the upstream's work is not counted;
- Python function calls per request, counted by cProfile: deterministic for the same code and inputs, so a
  change's cost can be read from one run on a noisy machine.
Cases: a JSON chat completion, the same as a 20-chunk SSE stream, a realtime turn (a response.create on
an open WebSocket, answered by the same 20 chunks), a /v1/responses call answered by the same chunks, not
stored (`responses`) and stored (`stored`), and an agent's turn (`agent`: an agent without connectors on the
same model, answered in JSON; its session is opened and kept).

    .venv/bin/python bench/hotpath_bench.py [--requests 2000] [--concurrency 1,32]

Uses a scratch SQLite database, or DATABASE_URL / REDIS_URL when they are set (a scratch PostgreSQL database
and Redis key prefix, as bench/proxy_bench.py makes).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import gc
import os
import pstats
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BASE_DIR))

from tests.e2e.server import drop_database, free_port, make_environment, wait_for  # noqa: E402

BODY = b'{"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}'
STREAM_BODY = BODY[:-1] + b', "stream": true}'
RESPONSES_BODY = b'{"model": "bench", "input": "hi", "max_output_tokens": 16, "store": false}'
STORED_BODY = b'{"model": "bench", "input": "hi", "max_output_tokens": 16}'
# An agent's turn (an agent without connectors on the same model): a new session each time, kept when it ends.
AGENT_BODY = BODY.replace(b'"model": "bench"', b'"model": "agent:bench"')


async def asgi_call(
    app: object, raw_key: str, body: bytes, path: str = "/v1/chat/completions",
    messages: list[dict[str, object]] | None = None, *, method: str = "POST",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> int:
    """One request through the ASGI app, as a server would make it; returns the status (and appends what the
    app sent to `messages`, when given: tests read it). `headers` replaces the Host, Content-Type and bearer
    key ones."""
    status = 0
    sent = False

    async def receive() -> dict[str, object]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        nonlocal status
        if messages is not None:
            messages.append(message)
        if message["type"] == "http.response.start":
            status = int(message["status"])  # type: ignore[call-overload]

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
        "headers": headers if headers is not None else [
            (b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {raw_key}".encode())],
    }
    await app(scope, receive, send)  # type: ignore[operator]
    return status


REALTIME_TURN = (b'{"type": "response.create", "response": {"conversation": "none", "input": [{"type": "message", '
                 b'"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}}').decode()


async def _realtime(app: object, raw_key: str, *, requests: int, concurrency: int) -> list[int]:
    """`requests` realtime turns (a 20-chunk answer each) over `concurrency` sockets, through the ASGI app as
    a server would drive it; returns 200 for each turn that ended in response.done."""
    statuses: list[int] = []
    queue = iter(range(requests))

    async def socket() -> None:
        inbox: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        ready = asyncio.Event()

        async def send(message: dict[str, object]) -> None:
            text = str(message.get("text", ""))
            if text.startswith('{"type":"response.done"'):
                statuses.append(200 if '"status":"completed"' in text else 500)
                ready.set()
            elif text.startswith(('{"type":"session.created"', '{"type":"error"')):
                ready.set()

        scope = {
            "type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "ws",
            "path": "/v1/realtime", "raw_path": b"/v1/realtime", "query_string": b"model=bench", "root_path": "",
            "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000), "subprotocols": [],
            "headers": [(b"host", b"127.0.0.1:8000"), (b"authorization", f"Bearer {raw_key}".encode())],
        }
        await inbox.put({"type": "websocket.connect"})
        task = asyncio.get_running_loop().create_task(app(scope, inbox.get, send))  # type: ignore[operator]
        await ready.wait()
        for _ in queue:
            ready.clear()
            await inbox.put({"type": "websocket.receive", "text": REALTIME_TURN})
            await ready.wait()
        await inbox.put({"type": "websocket.disconnect", "code": 1000})
        await task

    await asyncio.gather(*(socket() for _ in range(concurrency)))
    return statuses


async def _run(app: object, raw_key: str, body: bytes | None, *, requests: int, concurrency: int) -> list[int]:
    if body is None:
        return await _realtime(app, raw_key, requests=requests, concurrency=concurrency)
    statuses: list[int] = []
    queue = iter(range(requests))

    path = "/v1/responses" if b'"input"' in body else "/v1/chat/completions"

    async def worker() -> None:
        for _ in queue:
            statuses.append(await asgi_call(app, raw_key, body, path))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


class Pauses:
    """The garbage collector's pauses while it is on: how many per generation, their total, the longest by
    generation (wall time: what a request waiting on this loop sees), and the longest in CPU time (wall time
    includes the process being descheduled, which this machine's two shared cores do often)."""

    def __init__(self) -> None:
        self.started = self.started_cpu = 0.0
        self.counts = [0, 0, 0]
        self.total = 0.0
        self.longest = [0.0, 0.0, 0.0]
        self.longest_cpu = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started, self.started_cpu = time.perf_counter(), time.thread_time()
            return
        pause = time.perf_counter() - self.started
        generation = info["generation"]
        self.counts[generation] += 1
        self.total += pause
        self.longest[generation] = max(self.longest[generation], pause)
        self.longest_cpu = max(self.longest_cpu, time.thread_time() - self.started_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--warm-up", type=int, default=600,
                        help="requests before measuring (past the heap's second freeze, at the 500th request)")
    parser.add_argument("--heap", action="store_true",
                        help="at the end, list what the oldest generation holds besides the frozen heap")
    parser.add_argument("--cases", default="json,stream,realtime,responses,stored,agent")
    parser.add_argument("--pstats", help="also write each case's profile to DIR/<case>-<concurrency>.pstats "
                        "(for pstats' callers and cumulative views)", metavar="DIR")
    parser.add_argument("--top", type=int, default=0, help="also list the N functions called most per request")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="keyway-hotpath-"))
    env, database = make_environment(scratch)
    os.environ.update(env)
    # DEBUG off, as in production: with it on, Django keeps the text of every SQL statement, which grows the
    # heap the garbage collector walks.
    os.environ.update(DEBUG="0", ALLOWED_HOSTS="127.0.0.1", KEYWAY_VAR_DIR=str(scratch),
                      **{name: secrets.token_urlsafe(48)
                         for name in ("SECRET_KEY", "KEYWAY_KEY_PEPPER", "KEYWAY_ENCRYPTION_KEY")},
                      KEYWAY_DEFAULT_MODEL="", KEYWAY_DEFAULT_EMBEDDING_MODEL="", KEYWAY_DEFAULT_RPM=str(10**9),
                      KEYWAY_DEFAULT_TPM=str(10**12),
                      KEYWAY_PROJECT_RPM=str(10**9), KEYWAY_PROJECT_TPM=str(10**12),
                      KEYWAY_REALTIME_SESSIONS_PER_KEY="1000")
    port = free_port()
    upstream = subprocess.Popen([sys.executable, str(BASE_DIR / "bench" / "fake_upstream.py"), "--port", str(port)],
                                cwd=BASE_DIR)
    try:
        wait_for(f"http://127.0.0.1:{port}/v1/models", process=upstream)
        import django

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "platform_site.settings")
        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        from apikeys.services import apikey_create
        from billing.models import Plan, Price
        from billing.services import billing_plan_set, credit_add
        from completions.services import provider_upsert_openai_compatible
        from platform_site.asgi import application
        from platform_site.models import Organization
        from platform_site.services import organization_create

        organization = organization_create(name="Bench", slug="bench", actor_label="bench")
        organization = Organization.objects.get(pk=organization.pk)
        billing_plan_set(organization=organization, plan=Plan.objects.create(name="bench", billing_mode="prepaid"))
        credit_add(organization=organization, amount_micros=10**15, reason="benchmark", actor_label="bench")
        Price.objects.create(model="bench", input_per_million_micros=2_500_000, output_per_million_micros=10_000_000)
        provider_upsert_openai_compatible(name="fake", base_url=f"http://127.0.0.1:{port}/v1", models=["bench"])
        _, raw_key = apikey_create(organization=organization, name="bench")
        from agents.models import Agent

        Agent.objects.create(organization=organization, project=organization.projects.first(), slug="bench",
                             name="Bench", model="bench")

        async def measure() -> None:
            print(f"database: {os.environ.get('DATABASE_URL', 'sqlite')}, cache: "
                  f"{'redis' if os.environ.get('REDIS_URL') else 'in-process'}, {args.requests} requests a case")
            print(f"{'case':<10} {'conc':>5} {'cpu ms/req':>11} {'calls/req':>10} {'gc ms/req':>10} "
                  f"{'gc 0/1/2 per 1k req':>20} {'longest gc ms 0/1/2':>20} {'cpu':>6}")
            for name, body in (("json", BODY), ("stream", STREAM_BODY), ("realtime", None),
                               ("responses", RESPONSES_BODY), ("stored", STORED_BODY), ("agent", AGENT_BODY)):
                if name not in args.cases.split(","):
                    continue
                for concurrency in (int(c) for c in args.concurrency.split(",")):
                    await _run(application, raw_key, body, requests=args.warm_up, concurrency=concurrency)  # warm up
                    pauses = Pauses()
                    gc.callbacks.append(pauses)
                    started = time.process_time()
                    statuses = await _run(application, raw_key, body, requests=args.requests, concurrency=concurrency)
                    cpu = (time.process_time() - started) / args.requests * 1000
                    gc.callbacks.remove(pauses)
                    assert set(statuses) == {200}, set(statuses)
                    profile = cProfile.Profile()
                    profile.enable()
                    await _run(application, raw_key, body, requests=200, concurrency=concurrency)
                    profile.disable()
                    stats = pstats.Stats(profile)
                    if args.pstats:
                        stats.dump_stats(Path(args.pstats) / f"{name}-{concurrency}.pstats")
                    calls = stats.total_calls / 200  # type: ignore[attr-defined]
                    per_1k = "/".join(f"{count * 1000 / args.requests:.0f}" for count in pauses.counts)
                    longest = "/".join(f"{pause * 1000:.1f}" for pause in pauses.longest)
                    print(f"{name:<10} {concurrency:>5} {cpu:>11.3f} {calls:>10.0f} "
                          f"{pauses.total * 1000 / args.requests:>10.3f} {per_1k:>20} {longest:>20} "
                          f"{pauses.longest_cpu * 1000:>6.2f}")
                    if args.top:
                        rows = sorted(stats.stats.items(), key=lambda item: -item[1][1])  # type: ignore[attr-defined]
                        for (file, line, function), (_, ncalls, *_rest) in rows[: args.top]:
                            print(f"{ncalls / 200:>10.1f}  {Path(file).name}:{line} {function}")
            if args.heap:
                survivors = gc.get_objects(generation=2)
                kinds = collections.Counter(type(item).__qualname__ for item in survivors)
                print(f"objects in the oldest generation, not frozen: {len(survivors)}; frozen: "
                      f"{gc.get_freeze_count()}; most common: "
                      + ", ".join(f"{kind} {count}" for kind, count in kinds.most_common(12)))
                del survivors
                print(f"a full collection now frees {gc.collect()} objects")
            from platform_site.kernel import process

            await process.run_shutdown_hooks()

        asyncio.run(measure())
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)
        from django.db import connections

        from billing.ledger import flush_at_exit

        flush_at_exit()  # now, while the scratch database exists: the exit hook would find it dropped
        connections.close_all()
        drop_database(database)


if __name__ == "__main__":
    main()
