"""Keyway's backing services failing under load, against real processes: a Redis and a PostgreSQL cluster of the
test's own, killed, frozen and restarted while two uvicorn workers serve a steady stream of requests.

What each failure must do is the README's table (When a backing service fails); these tests are that table:
- Redis away: admission that needs the shared counters is refused at once with a 503 naming what is missing
  (billing_unavailable for prepaid credit, rate_limits_unavailable for rate limits, closed by default), keys
  are read from the database, no request waits past the Redis timeout, and within seconds of Redis's return
  everything is served again, without a restart. No usage event is lost or charged twice, and the counters,
  rebuilt from the ledger, agree with it after one reconciliation pass.
- PostgreSQL away: requests with cached keys go on being served, their usage waits in the journal and reaches
  the ledger exactly once after the database is back; /health says 503 meanwhile and 200 after; no 5xx after
  the outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from bench.proxy_bench import PREPAID_SETUP
from tests.e2e import server

# Redis failing is a production matter: these run beside PostgreSQL (CI's second leg), not again beside SQLite.
_REDIS_IN_PRODUCTION_SHAPE = pytest.mark.skipif(
    shutil.which("redis-server") is None or not os.environ.get("DATABASE_URL", "").startswith("postgres"),
    reason="needs redis-server, and runs on PostgreSQL (production's shape) only",
)

pytestmark = pytest.mark.e2e

POSTGRES_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None) if Path(
    "/usr/lib/postgresql").is_dir() else None

POSTPAID_SETUP = """
from apikeys.services import apikey_create
from platform_site.services import organization_create
org = organization_create(name="Postpaid", slug="post", actor_label="test")
print(apikey_create(organization=org, name="post", actor_label="test")[1])
"""

LEDGER = """
import json
from django.db.models import Count, Sum
from billing.models import BillingAccount, UsageEvent
rows = UsageEvent.objects.values("organization__slug", "status").annotate(n=Count("id"), cost=Sum("cost_micros"))
accounts = {a.organization.slug: a.usage_total_micros for a in BillingAccount.objects.select_related("organization")}
print(json.dumps({"rows": [[r["organization__slug"], r["status"], r["n"], r["cost"]] for r in rows],
                  "accounts": accounts, "duplicates": UsageEvent.objects.values("call_id").annotate(
                      n=Count("id")).filter(n__gt=1).count()}))
"""


@dataclass
class Answer:
    key: str
    started: float
    seconds: float
    status: int
    code: str | None


async def _load(url: str, keys: dict[str, str], stop: asyncio.Event, answers: list[Answer],
                per_key: int = 3) -> None:
    """Steady requests from each key (per_key at a time) until `stop`."""
    body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    async with httpx2.AsyncClient(timeout=30) as client:

        async def one(name: str, key: str) -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = await client.post(f"{url}/v1/chat/completions", json=body,
                                                  headers={"Authorization": f"Bearer {key}"})
                    status = response.status_code
                    code = None if status == 200 else response.json()["error"]["code"]
                except httpx2.HTTPError as error:
                    status, code = 0, type(error).__name__
                answers.append(Answer(name, started, time.monotonic() - started, status, code))
                if status != 200:
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(one(name, key) for name, key in keys.items() for _ in range(per_key)))


def _health(url: str) -> tuple[int, dict[str, Any]]:
    response = httpx2.get(f"{url}/health", timeout=10)
    return response.status_code, response.json()


def _wait_until(check: Any, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    raise TimeoutError(f"{check} did not hold within {timeout} s")


def _ledger(env: dict[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(server.django_shell(env, LEDGER).strip().splitlines()[-1])
    return result


def _ok_rows(ledger: dict[str, Any], slug: str) -> int:
    return sum(n for org, status, n, _ in ledger["rows"] if org == slug and status == 1)


# --- Redis -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _redis(port: int, log: Path) -> Iterator[dict[str, Any]]:
    """A Redis of the test's own, keeping nothing on disk (a restart starts it empty, the hardest case)."""
    state: dict[str, Any] = {}

    def start() -> None:
        state["process"] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=log.open("ab"), stderr=subprocess.STDOUT,
        )
        _wait_until(lambda: _redis_ping(port), 10)

    state["start"] = start
    start()
    try:
        yield state
    finally:
        process = state["process"]
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
        server.stop(process)


def _redis_ping(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@_REDIS_IN_PRODUCTION_SHAPE
def test_redis_killed_frozen_and_restarted_under_load(tmp_path: Path) -> None:
    port = server.free_port()
    with _redis(port, tmp_path / "redis.log") as redis_state, server.keyway_stack(
        tmp_path, upstream_models="bench", workers=2,
        env_extra={"REDIS_URL": f"redis://127.0.0.1:{port}/0", "KEYWAY_RECONCILE_INTERVAL": "0",
                   "KEYWAY_DEFAULT_RPM": "1000000"},
    ) as stack:
        url, env = stack["url"], stack["env"]
        server.django_shell(env, PREPAID_SETUP)
        keys = {"demo": stack["key"], "post": server.django_shell(env, POSTPAID_SETUP).strip().splitlines()[-1]}
        answers: list[Answer] = []
        marks: dict[str, float] = {}

        async def scenario() -> None:
            stop = asyncio.Event()
            load = asyncio.ensure_future(_load(url, keys, stop, answers))
            await asyncio.sleep(2)
            # Killed: connections refused.
            marks["killed"] = time.monotonic()
            redis_state["process"].kill()
            redis_state["process"].wait()
            await asyncio.sleep(3)
            marks["health_down"] = (await asyncio.to_thread(_health, url))[0]
            # Back, empty.
            marks["restarted"] = time.monotonic()
            await asyncio.to_thread(redis_state["start"])
            await asyncio.sleep(4)
            # Frozen: connections accepted, nothing answered (a hung server, a network partition).
            marks["frozen"] = time.monotonic()
            redis_state["process"].send_signal(signal.SIGSTOP)
            await asyncio.sleep(5)
            marks["thawed"] = time.monotonic()
            redis_state["process"].send_signal(signal.SIGCONT)
            await asyncio.sleep(4)
            marks["stopped"] = time.monotonic()
            stop.set()
            await load

        asyncio.run(scenario())
        assert marks["health_down"] == 503

        def during(start: str, end: str) -> list[Answer]:
            return [a for a in answers if marks[start] <= a.started < marks[end]]

        before = [a for a in answers if a.started + a.seconds < marks["killed"]]
        assert before and all(a.status == 200 for a in before), {(a.status, a.code) for a in before}
        # Nothing ever hangs: the slowest answer stays within the Redis timeout (KEYWAY_REDIS_TIMEOUT, 2 s) and a
        # margin.
        slowest = max(a.seconds for a in answers)
        assert slowest < 3, slowest
        # Down (killed, or frozen): every refusal is the documented 503, per what the key's organization needs.
        outage = during("killed", "restarted") + during("frozen", "thawed")
        refusals = [a for a in outage if a.status != 200]
        assert refusals, "the outage refused nothing"
        assert {(a.key, a.status, a.code) for a in refusals} <= {
            ("demo", 503, "billing_unavailable"), ("post", 503, "rate_limits_unavailable")}
        assert {a.key for a in refusals} == {"demo", "post"}
        # Back: served again within seconds, without a restart, and to the end.
        for start, end in (("restarted", "frozen"), ("thawed", "stopped")):
            recovered = [a for a in during(start, end) if a.status == 200]
            assert recovered, f"nothing was served after {start}"
            first_ok = min(a.started for a in recovered) - marks[start]
            assert first_ok < 3, (start, first_ok)
            settled = [a for a in during(start, end)
                       if a.started > marks[start] + first_ok + 1.5 and a.started + a.seconds < marks[end]]
            assert settled and all(a.status == 200 for a in settled), [
                (start, round(a.started - marks[start], 3), a.status, a.code) for a in settled if a.status != 200]
        assert _health(url)[0] == 200

        # Every answered request is in the ledger once; none that was refused; nothing charged twice.
        time.sleep(1.5)
        ledger = _ledger(env)
        assert ledger["duplicates"] == 0
        for name in keys:
            assert _ok_rows(ledger, name) == sum(1 for a in answers if a.key == name and a.status == 200)
        charged = {org: sum(cost for o, _, _, cost in ledger["rows"] if o == org) for org in keys}
        assert ledger["accounts"]["demo"] == charged["demo"]
        # The shared counters were rebuilt from the ledger: after one reconciliation pass (which reports any
        # drift the outage left), the spend counter equals the ledger to the micro-USD and no hold is open.
        import redis

        client = redis.Redis(port=port)
        prefix = env.get("KEYWAY_CACHE_PREFIX", "kw")
        report = server.manage(env, "reconcile_counters")
        assert "0 busy" in report, report
        organization_ids = json.loads(server.django_shell(env, (
            "import json\nfrom platform_site.models import Organization\n"
            "print(json.dumps(dict(Organization.objects.values_list('slug', 'id'))))")).strip().splitlines()[-1])
        # One shard (KEYWAY_REDIS_SHARDS, billing.keys): every billing key carries the tag {s0}.
        assert int(client.get(f"{prefix}:{{s0}}:bill:spend:{organization_ids['demo']}")) == charged["demo"]
        for lease in client.scan_iter(f"{prefix}:{{s0}}:bill:lease:*"):
            assert all(int(value) == 0 for value in client.hvals(lease))
        print(f"Redis outage: {len(answers)} requests, {len(refusals)} refused during the outages, "
              f"slowest {slowest:.3f} s; {report.strip()}")


TURN = {"type": "response.create", "response": {"conversation": "none", "input": [
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}}


async def _turn(socket: Any) -> dict[str, Any]:
    """One realtime turn: its response.done, or the error event that refused it."""
    await socket.send(json.dumps(TURN))
    while True:
        event: dict[str, Any] = json.loads(await asyncio.wait_for(socket.recv(), 10))
        if event["type"] in ("response.done", "error"):
            return event


@_REDIS_IN_PRODUCTION_SHAPE
def test_an_open_realtime_session_lives_through_a_redis_restart(tmp_path: Path) -> None:
    import websockets

    port = server.free_port()
    with _redis(port, tmp_path / "redis.log") as redis_state, server.keyway_stack(
        tmp_path, upstream_models="bench", env_extra={"REDIS_URL": f"redis://127.0.0.1:{port}/0"},
    ) as stack:
        url = stack["url"].replace("http", "ws", 1) + "/v1/realtime?model=bench"
        headers = {"Authorization": f"Bearer {stack['key']}"}

        async def scenario() -> None:
            async with websockets.connect(url, additional_headers=headers) as socket:
                assert json.loads(await socket.recv())["type"] == "session.created"
                assert (await _turn(socket))["type"] == "response.done"
                redis_state["process"].kill()
                redis_state["process"].wait()
                await asyncio.sleep(0.5)
                # The session stays open; a turn it cannot count is refused with the documented code.
                refused = await _turn(socket)
                assert refused["type"] == "error" and refused["error"]["code"] == "rate_limits_unavailable"
                # A new session is refused the same way, and closed.
                async with websockets.connect(url, additional_headers=headers) as other:
                    event = json.loads(await asyncio.wait_for(other.recv(), 10))
                    assert event["error"]["code"] == "rate_limits_unavailable"
                await asyncio.to_thread(redis_state["start"])
                await asyncio.sleep(1.5)  # the breaker's pause
                # Redis is back (empty): the same socket answers again, and a new one opens.
                back = await _turn(socket)
                assert back["type"] == "response.done", back
                async with websockets.connect(url, additional_headers=headers) as other:
                    assert json.loads(await other.recv())["type"] == "session.created"
                    assert (await _turn(other))["type"] == "response.done"

        asyncio.run(scenario())


# --- PostgreSQL ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _postgres(port: int) -> Iterator[dict[str, Any]]:
    """A PostgreSQL cluster of the test's own (initdb), run as the postgres user (in a directory it can reach:
    pytest's own are the test runner's alone)."""
    assert POSTGRES_BIN is not None
    directory = Path(tempfile.mkdtemp(prefix="keyway-pg-"))
    shutil.chown(directory, "postgres", "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = directory / "data"
    subprocess.run([*as_postgres, str(POSTGRES_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    log = directory / "postgres.log"

    def pg_ctl(*args: str) -> None:
        subprocess.run([*as_postgres, str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), *args],
                       check=True, capture_output=True, timeout=60)

    def start() -> None:
        pg_ctl("start", "-w", "-o", f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off")

    def crash() -> None:
        pg_ctl("stop", "-m", "immediate")  # no checkpoint, connections dropped: a crash, then recovery

    start()
    try:
        yield {"start": start, "crash": crash, "url": f"postgres://postgres@127.0.0.1:{port}/postgres"}
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(POSTGRES_BIN is None or not os.environ.get("DATABASE_URL", "").startswith("postgres"),
                    reason="the PostgreSQL run of CI: needs PostgreSQL's server binaries")
def test_postgresql_crashes_and_restarts_under_load(tmp_path: Path) -> None:
    with _postgres(server.free_port()) as postgres, server.keyway_stack(
        tmp_path, upstream_models="bench", workers=2,
        env_extra={"DATABASE_URL": postgres["url"], "REDIS_URL": "redis://127.0.0.1:6379/0",
                   "KEYWAY_CACHE_PREFIX": f"e2e-{uuid.uuid4().hex[:8]}", "KEYWAY_RECONCILE_INTERVAL": "0",
                   "KEYWAY_DEFAULT_RPM": "1000000"},
    ) as stack:
        url, env, key = stack["url"], stack["env"], stack["key"]
        server.django_shell(env, PREPAID_SETUP)
        answers: list[Answer] = []
        marks: dict[str, float] = {}
        health: list[tuple[float, int, dict[str, Any]]] = []

        async def watch_health(stop: asyncio.Event) -> None:
            while not stop.is_set():
                status, body = await asyncio.to_thread(_health, url)
                health.append((time.monotonic(), status, body))
                await asyncio.sleep(0.25)

        async def scenario() -> None:
            stop = asyncio.Event()
            load = asyncio.ensure_future(_load(url, {"demo": key}, stop, answers, per_key=4))
            watcher = asyncio.ensure_future(watch_health(stop))
            await asyncio.sleep(3)
            marks["crashed"] = time.monotonic()
            await asyncio.to_thread(postgres["crash"])
            await asyncio.sleep(5)
            marks["restarting"] = time.monotonic()
            await asyncio.to_thread(postgres["start"])
            marks["restarted"] = time.monotonic()
            await asyncio.sleep(6)
            marks["stopped"] = time.monotonic()
            stop.set()
            await asyncio.gather(load, watcher)

        asyncio.run(scenario())

        outage = [a for a in answers if marks["crashed"] + 0.2 <= a.started < marks["restarting"]]
        served = [a for a in outage if a.status == 200]
        # Cached keys, prices and terms: the outage is not the clients' (at most a few refusals at its edge).
        assert len(served) >= 0.9 * len(outage) and len(served) > 20, {(a.status, a.code) for a in outage}
        assert all(a.status in (200, 503) for a in answers), {(a.status, a.code) for a in answers}
        assert max(a.seconds for a in answers) < 5
        # /health follows the database: 503 while it is away, 200 again within seconds of its return.
        down = [status for at, status, _ in health if marks["crashed"] + 1 <= at < marks["restarting"]]
        assert down and all(status == 503 for status in down)
        back = [at for at, status, _ in health if at >= marks["restarted"] and status == 200]
        assert back and back[0] - marks["restarted"] < 3
        # No 5xx after the outage.
        after = [a for a in answers if a.started >= marks["restarted"] + 1]
        assert after and all(a.status == 200 for a in after), {(a.status, a.code) for a in after}

        # Every answer reached the ledger exactly once, after the database came back.
        _wait_until(lambda: _ok_rows(_ledger(env), "demo") >= sum(a.status == 200 for a in answers), 20)
        ledger = _ledger(env)
        assert ledger["duplicates"] == 0
        assert _ok_rows(ledger, "demo") == sum(a.status == 200 for a in answers)
        assert ledger["accounts"]["demo"] == sum(cost for _, _, _, cost in ledger["rows"])
        # The counters never lost track: reconciliation finds nothing to correct.
        report = server.manage(env, "reconcile_counters")
        assert "0 corrected" in report and "0 busy" in report, report
        print(f"PostgreSQL outage: {len(answers)} requests, {len(served)}/{len(outage)} served while it was down; "
              f"{report.strip()}")


def test_clients_that_hang_up_straight_after_the_handshake_leave_no_session_counted(tmp_path: Path) -> None:
    """Found by the soak (bench/soak_bench.py): a client gone before session.created left its session counted
    as open for good, until its key hit the per-key limit and was refused realtime. Now the failed send gives
    the place back: after 60 abandoned handshakes, a key limited to 4 sessions opens 4. And a client gone
    mid-answer is settled as a disconnection, not logged as three server errors."""
    import websockets

    with server.keyway_stack(tmp_path, upstream_models="bench,slow-stream-5", workers=2, env_extra={
        "KEYWAY_REALTIME_SESSIONS_PER_KEY": "4", "REDIS_URL": "redis://127.0.0.1:6379/0",
        "KEYWAY_CACHE_PREFIX": f"e2e-{uuid.uuid4().hex[:8]}",
    }) as stack:
        url = stack["url"].replace("http", "ws", 1) + "/v1/realtime?model=bench"
        headers = {"Authorization": f"Bearer {stack['key']}"}

        async def scenario() -> None:
            async def abandon() -> None:
                socket = await websockets.connect(url, additional_headers=headers)
                socket.transport.abort()  # gone, without a close frame, before the server's first event

            async def open_session(model_url: str) -> Any:
                """A session, once the key has a place: the server gives a hung-up client's place back when it
                learns of the hang-up, a moment later on a loaded machine (fixed pauses of 0.3 s, then 1 s, were
                each too short once). A place never given back fails here."""
                deadline = time.monotonic() + 10
                while True:
                    socket = await websockets.connect(model_url, additional_headers=headers)
                    event = json.loads(await asyncio.wait_for(socket.recv(), 10))
                    if event["type"] == "session.created":
                        return socket
                    assert event["error"]["code"] == "concurrent_sessions_exceeded", event
                    await socket.close()
                    assert time.monotonic() < deadline, "the places of clients that hung up were not given back"
                    await asyncio.sleep(0.2)

            async def cut_mid_answer() -> None:
                socket = await open_session(url.replace("=bench", "=slow-stream-5"))
                await socket.send(json.dumps(TURN))
                while json.loads(await socket.recv())["type"] != "response.output_text.delta":
                    pass
                socket.transport.abort()  # gone mid-answer

            for _ in range(6):
                await asyncio.gather(*(abandon() for _ in range(10)))
            for _ in range(10):
                await asyncio.gather(*(cut_mid_answer() for _ in range(2)))
            # All four places of the key, at once.
            sockets = [await open_session(url) for _ in range(4)]
            for socket in sockets:
                await socket.close()

        asyncio.run(scenario())
        # Neither kind of hang-up is an error of the server's; the cut turns are settled as disconnections.
        log = (tmp_path / "server.log").read_text()
        assert "Unhandled error" not in log and "Task exception was never retrieved" not in log
        assert "Realtime response failed" not in log
        found = server.django_shell(stack["env"], (
            "from billing.models import UsageEvent\n"
            "print(UsageEvent.objects.filter(status=UsageEvent.Status.CLIENT_DISCONNECTED).count())"))
        assert int(found.strip().splitlines()[-1]) == 20
