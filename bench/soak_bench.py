"""A soak: half an hour of steady mixed load through Keyway, watching every worker's memory and open file
descriptors, and the latency of each kind of request, interval by interval. Flat is the target.

Starts the fake upstream (bench/fake_upstream.py) and Keyway (uvicorn with --workers processes, or daphne)
on a scratch database (or DATABASE_URL / REDIS_URL if set, with a scratch database and Redis prefix),
metering on its full path as in proxy_bench.py (prepaid credit, a price per model, the ledger), rate limits
on but out of reach. Keyway runs with DEBUG off, as in production: with DEBUG on, Django keeps the text of
the last 9,000 SQL statements of every database connection (the ledger's batched inserts included), which
fills slowly and would read as a leak. The load is a fixed rate (--rate requests per second in all), not
as much as the server takes: a soak looks for leaks and drift, so minute 30 must see the load of minute 1.

  kind      share  what                                                            latency is
  chat        39%  chat completion, JSON                                           the whole answer
  stream      30%  chat completion, SSE stream of 20 chunks                        until [DONE]
  embed       12%  embeddings of two inputs (the fake upstream's)                  the whole answer
  rt-turn     10%  realtime text turns (response.create, out of band) on           send to response.done
                   --sockets long-lived WebSockets
  rt-open      2%  a realtime socket opened, one turn in its conversation, closed  connect to closed
  rt-relay     2%  the same on an audio model relayed to the upstream's realtime   connect to closed
                   WebSocket (a second socket per session, upstream)
  rt-cut       1%  a realtime socket dropped (TCP abort) at its first delta        to the first delta
  rt-gone      1%  a realtime socket dropped as soon as the handshake is answered  to the handshake
  http-cut     1%  a stream dropped (TCP abort) at its first event                 to the first event
  401-key      1%  a key that does not exist, or a wrong secret (expects 401)      the whole answer
  413-body   0.5%  a body over KEYWAY_MAX_BODY_BYTES, set to 64 KiB (expects 413)  the whole answer
  400-max    0.5%  max_tokens over the model's context (expects 400)               the whole answer

The error paths are there because leaks hide in them. Requests are sent on a fixed schedule whatever the
answers do (a slow server shows as latency, not as fewer requests); each has 30 s before it counts as a
timeout. Anything other than the expected answer (a status, an error event, a broken stream, an exception)
is an unexpected outcome. KEYWAY_REALTIME_SESSIONS_PER_KEY is 64, several times what the load holds open,
so sessions that are never released end in 429s within the soak rather than going unseen.

Every --interval seconds it prints one block: the interval's requests and unexpected outcomes; the
streams and sockets Keyway reports open (/metrics) and Redis' memory (the whole instance's) where there is
Redis; the CPU of the server (master and workers), of the load generator and of the upstream, which share
the machine's cores; per worker process its RSS (VmRSS in /proc/<pid>/status, at the end of the interval)
and its open file descriptors (/proc/<pid>/fd, read every 2 s): the fewest and the most, and the fewest
outside established TCP connections; and per kind, done, unexpected and p50/p95/p99 latency.

The descriptors judged are those outside established connections. The pools on both sides of Keyway
(the load generator's kept-alive connections, Keyway's upstream pool) are aiohttp's, which reuse their
connections in turn, so under steady load they keep every connection of the busiest moment so far: the
total steps up with each new peak of concurrency (a burst of latency on a shared machine) and does not come
down while the load lasts, a high-water mark rather than a leak. A descriptor that is never closed ends up
outside them: a file, a pipe, an eventfd, or a socket its peer has closed (the fake upstream closes an
idle HTTP connection after 75 s). A connection neither side closes (a relayed realtime socket, say) is
caught at the end: once the load stops, every connection with a client or the upstream must close within
75 s.

At the end: a table with one row per interval, each worker's first and last RSS and descriptors, and their
slopes (least squares, per 10 minutes) over the intervals that end after --warmup minutes. The verdict is
"growing" when a worker's RSS slope is over --max-rss-growth (3 MB per 10 minutes, ~70 bytes a request at
the default load; RSS too steps up with the peak of concurrency, and one step of 4 MB in the middle of 30
minutes fits as 2 MB per 10 minutes) or the slope of its descriptors outside connections is over
--max-fd-growth (5 per 10 minutes, less than one descriptor kept per 45 requests of the rarest kind); fewer
than 3 intervals after the warm-up are too few to judge. Then the books: the ledger's rows against the
metered calls the load made (proxy_bench.py's LEDGER_COUNT; a call that timed out may or may not be in it),
no stream or socket left open, no connection left, no usage journal left; on Redis no hold left on any
worker's lease and the organization's spend counter equal to the ledger's total cost. Last, the ERROR
records of the server's log, by cause. The exit status is 1 when the verdict is growing, a worker restarted,
an outcome was unexpected, the books do not balance or the server logged an error, so it can gate; the
scratch directory (server and upstream logs, SQLite database) is then kept, and removed otherwise.

    .venv/bin/python bench/soak_bench.py [--minutes 30] [--interval 60] [--rate 150] [--workers 2]
        [--server uvicorn|daphne] [--sockets 4] [--warmup 2] [--env NAME=value ...] [--skip KIND ...]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import os
import random
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import websockets

BASE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BASE_DIR))

from bench.proxy_bench import LEDGER_COUNT, cpu_seconds, percentile, prepare_demo  # noqa: E402
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

SHARES = {
    "chat": 0.39,
    "stream": 0.30,
    "embed": 0.12,
    "rt-turn": 0.10,
    "rt-open": 0.02,
    "rt-relay": 0.02,
    "rt-cut": 0.01,
    "rt-gone": 0.01,
    "http-cut": 0.01,
    "401-key": 0.01,
    "413-body": 0.005,
    "400-max": 0.005,
}
TIMEOUT = 30.0
MAX_BODY = 64 * 1024
# Requests of one kind still waiting for an answer past which a new one is counted as unexpected ("backlog")
# rather than sent: a server that stops answering must not make the load generator pile up without bound.
MAX_IN_FLIGHT = 500
# Kinds refused before admission: never in the ledger.
NEVER_METERED = {"401-key", "413-body", "400-max", "rt-gone"}
FD_EVERY = 2.0
# Seconds after the load by which every idle connection must have closed: Keyway's upstream pool drops a
# connection idle for 30 s at its clean-up, which runs every 30 s.
IDLE_WAIT = 75.0

# The fake upstream's other models: `drip` streams one chunk every 0.1 s (so a client can leave mid-stream),
# `embed` answers embeddings, `voice` is an audio model whose sessions are relayed to its realtime socket.
SOAK_SETUP = """
from billing.models import Price
from completions.services import provider_upsert_openai_compatible as upsert
url = {url!r}
upsert(name="fake", base_url=url, models=["drip"])
upsert(name="fake", base_url=url, models=["embed"], capabilities=["embeddings"])
upsert(name="fake", base_url=url, models=["voice"], capabilities=["realtime"], context_length=32000)
for model in ("drip", "embed", "voice"):
    Price.objects.create(model=model, input_per_million_micros=2_500_000, output_per_million_micros=10_000_000)
"""
# The demo organization's id and its ledger, for the books at the end.
LEDGER_TOTALS = """
from django.db.models import Count, Sum
from billing.models import UsageEvent
from platform_site.models import Organization
org = Organization.objects.get(slug="demo")
rows = UsageEvent.objects.filter(organization=org)
print("totals", org.id, rows.aggregate(total=Sum("cost_micros"))["total"] or 0)
for endpoint, status, count in rows.values_list("endpoint", "status").annotate(n=Count("id")).order_by():
    print("row", UsageEvent.Endpoint(endpoint).label, UsageEvent.Status(status).label, count)
"""

USER = {"role": "user", "content": "Say hello."}
CHAT = orjson.dumps({"model": "bench", "messages": [USER], "max_tokens": 32})
STREAM = orjson.dumps({"model": "bench", "messages": [USER], "max_tokens": 32, "stream": True})
DRIP = orjson.dumps({"model": "drip", "messages": [USER], "max_tokens": 32, "stream": True})
EMBED = orjson.dumps({"model": "embed", "input": ["a soak test", "another input"]})
TOO_BIG = orjson.dumps({"model": "bench", "messages": [{"role": "user", "content": "x" * (MAX_BODY + 4096)}]})
MAX_TOKENS_OVER = orjson.dumps({"model": "bench", "messages": [USER], "max_tokens": 10**7})
USER_ITEM = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}
TURN = orjson.dumps({"type": "response.create", "response": {"conversation": "none", "input": [USER_ITEM]}}).decode()
ITEM = orjson.dumps({"type": "conversation.item.create", "item": USER_ITEM}).decode()
RESPONSE = orjson.dumps({"type": "response.create"}).decode()


class Unexpected(Exception):
    """An answer other than the one expected; `metered` when the call reached the ledger all the same."""

    def __init__(self, reason: str, *, metered: bool = False) -> None:
        super().__init__(reason)
        self.metered = metered


@dataclass
class Tally:
    """What one kind did in one interval (and in the whole run)."""

    latencies: list[float] = field(default_factory=list)
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def failed(self) -> int:
        return sum(self.unexpected.values())


class Load:
    """The load generator's books: per kind, this interval's tally and the whole run's; the calls that should
    be in the ledger, and those that may be (a request that timed out or lost its connection may have been
    metered all the same)."""

    def __init__(self) -> None:
        self.interval = {kind: Tally() for kind in SHARES}
        self.total = {kind: Tally() for kind in SHARES}
        self.metered = 0
        self.maybe_metered = 0
        self.in_flight = collections.Counter[str]()

    def ok(self, kind: str, seconds: float, *, metered: bool) -> None:
        self.interval[kind].latencies.append(seconds)
        self.total[kind].latencies.append(seconds)
        self.metered += metered

    def fail(self, kind: str, reason: str, *, metered: bool = False, lost: bool = False) -> None:
        self.interval[kind].unexpected[reason] += 1
        self.total[kind].unexpected[reason] += 1
        self.metered += metered
        self.maybe_metered += lost and kind not in NEVER_METERED

    def take(self) -> dict[str, Tally]:
        taken, self.interval = self.interval, {kind: Tally() for kind in SHARES}
        return taken

    async def measure(self, kind: str, call: Callable[[], Awaitable[tuple[float, bool]]]) -> None:
        """Run one request; `call` returns its latency and whether it was metered, or raises."""
        self.in_flight[kind] += 1
        try:
            async with asyncio.timeout(TIMEOUT):
                seconds, metered = await call()
        except Unexpected as exc:
            self.fail(kind, str(exc), metered=exc.metered)
        except TimeoutError:
            self.fail(kind, "timeout", lost=True)
        except (aiohttp.ClientError, websockets.WebSocketException, OSError) as exc:
            self.fail(kind, type(exc).__name__, lost=True)
        else:
            self.ok(kind, seconds, metered=metered)
        finally:
            self.in_flight[kind] -= 1


def _error_code(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["code"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "?"


class Client:
    """The requests of each kind, against one Keyway."""

    def __init__(self, base: str, key: str, *, keep: aiohttp.ClientSession, fresh: aiohttp.ClientSession) -> None:
        self.http = f"http://{base}"
        self.ws = f"ws://{base}/v1/realtime"
        self.key = key
        self.auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        # Kept-alive connections for the ordinary requests; a new connection for each one that fails or
        # leaves, as such clients do, so that connection set-up and tear-down are soaked too.
        self.keep = keep
        self.fresh = fresh

    async def _post(
        self,
        path: str,
        body: bytes,
        *,
        expect: int,
        headers: dict[str, str] | None = None,
        metered: bool = True,
        session: aiohttp.ClientSession | None = None,
        stream: bool = False,
    ) -> tuple[float, bool]:
        started = time.perf_counter()
        async with (session or self.keep).post(f"{self.http}{path}", data=body, headers=headers or self.auth) as got:
            answer = await got.read()
        if got.status != expect:
            raise Unexpected(f"{got.status} {_error_code(answer)}")
        if stream and not answer.rstrip().endswith(b"data: [DONE]"):
            raise Unexpected("stream without [DONE]", metered=True)
        return time.perf_counter() - started, metered

    async def chat(self) -> tuple[float, bool]:
        return await self._post("/v1/chat/completions", CHAT, expect=200)

    async def stream(self) -> tuple[float, bool]:
        return await self._post("/v1/chat/completions", STREAM, expect=200, stream=True)

    async def embed(self) -> tuple[float, bool]:
        return await self._post("/v1/embeddings", EMBED, expect=200)

    async def bad_key(self) -> tuple[float, bool]:
        # Half a key nobody has (a lookup that finds nothing), half this key's public part with another
        # secret (found, then refused by the HMAC check); a new key each time, so no cache answers for it.
        alphabet = string.ascii_letters + string.digits
        public = self.key.split("-")[2] if random.random() < 0.5 else secrets.token_hex(6)
        raw = f"sk-kw-{public}-{''.join(secrets.choice(alphabet) for _ in range(44))}"
        headers = {"Authorization": f"Bearer {raw}", "Content-Type": "application/json"}
        return await self._post(
            "/v1/chat/completions", CHAT, expect=401, headers=headers, metered=False, session=self.fresh
        )

    async def too_big(self) -> tuple[float, bool]:
        return await self._post("/v1/chat/completions", TOO_BIG, expect=413, metered=False, session=self.fresh)

    async def max_tokens_over(self) -> tuple[float, bool]:
        return await self._post("/v1/chat/completions", MAX_TOKENS_OVER, expect=400, metered=False)

    async def http_cut(self) -> tuple[float, bool]:
        started = time.perf_counter()
        async with self.fresh.post(f"{self.http}/v1/chat/completions", data=DRIP, headers=self.auth) as got:
            if got.status != 200:
                raise Unexpected(f"{got.status} {_error_code(await got.read())}")
            while not (await got.content.readline()).startswith(b"data: "):
                if got.content.at_eof():
                    raise Unexpected("stream ended before its first event", metered=True)
            seconds = time.perf_counter() - started
            got.close()  # drops the connection mid-stream
        return seconds, True

    def connect(self, model: str) -> Any:
        return websockets.connect(
            f"{self.ws}?model={model}",
            additional_headers={"Authorization": f"Bearer {self.key}"},
            max_size=None,
            open_timeout=TIMEOUT,
            close_timeout=5,
        )

    async def rt_open(self, model: str) -> tuple[float, bool]:
        started = time.perf_counter()
        async with self.connect(model) as socket:
            await until(socket, "session.created")
            await socket.send(ITEM)
            await socket.send(RESPONSE)
            await until(socket, "response.done")
        return time.perf_counter() - started, True

    async def rt_gone(self) -> tuple[float, bool]:
        started = time.perf_counter()
        async with self.connect("bench") as socket:
            socket.transport.abort()  # gone as soon as the handshake is answered, before session.created
        return time.perf_counter() - started, False

    async def rt_cut(self) -> tuple[float, bool]:
        started = time.perf_counter()
        async with self.connect("drip") as socket:
            await until(socket, "session.created")
            await socket.send(TURN)
            await until(socket, ".delta", metered=True)
            seconds = time.perf_counter() - started
            socket.transport.abort()  # gone, without a closing handshake
        return seconds, True


async def until(socket: Any, wanted: str, *, metered: bool = False) -> dict[str, Any]:
    """Read events until one of type `wanted` (or, for ".delta", any delta); an error event, or a response
    that did not complete, is unexpected."""
    while True:
        event = orjson.loads(await socket.recv())
        kind = event.get("type", "")
        if kind == "error":
            raise Unexpected(f"error event {event.get('error', {}).get('code')}", metered=metered)
        if kind == "response.done" and event["response"].get("status") != "completed":
            raise Unexpected(f"response {event['response'].get('status')}", metered=True)
        if kind == wanted or (wanted == ".delta" and kind.endswith(".delta")):
            return event


async def paced(
    load: Load,
    kind: str,
    rate: float,
    call: Callable[[], Awaitable[tuple[float, bool]]],
    stopping: asyncio.Event,
    tasks: set[asyncio.Task[None]],
) -> None:
    """Start `call` `rate` times a second on a fixed schedule, whether or not earlier ones have answered."""
    loop = asyncio.get_running_loop()
    period = 1.0 / rate
    next_at = loop.time() + random.random() * period
    while not stopping.is_set():
        await asyncio.sleep(max(0.0, next_at - loop.time()))
        next_at += period
        if stopping.is_set():
            return
        if load.in_flight[kind] >= MAX_IN_FLIGHT:
            load.fail(kind, "backlog")
            continue
        task = loop.create_task(load.measure(kind, call))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def long_lived(load: Load, client: Client, rate: float, phase: float, stopping: asyncio.Event) -> None:
    """One realtime socket that stays open for the whole soak, running an out-of-band text turn `rate` times
    a second. A socket the server closes is unexpected, and opened again."""
    loop = asyncio.get_running_loop()
    period = 1.0 / rate
    while not stopping.is_set():
        try:
            async with client.connect("bench") as socket:
                await until(socket, "session.created")
                next_at = loop.time() + phase * period
                while not stopping.is_set():
                    await asyncio.sleep(max(0.0, next_at - loop.time()))
                    next_at = max(next_at + period, loop.time() - period)
                    started = time.perf_counter()
                    async with asyncio.timeout(TIMEOUT):
                        await socket.send(TURN)
                        await until(socket, "response.done")
                    load.ok("rt-turn", time.perf_counter() - started, metered=True)
        except Unexpected as exc:
            load.fail("rt-turn", str(exc), metered=exc.metered)
        except (TimeoutError, websockets.WebSocketException, OSError) as exc:
            load.fail("rt-turn", type(exc).__name__, lost=True)
        if not stopping.is_set():
            await asyncio.sleep(1.0)


# Server processes, from /proc.


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def worker_pids(master: int) -> list[int]:
    """uvicorn's worker processes (children of its master started by multiprocessing's spawn, which leaves out
    its resource tracker); the server process itself when it has none (daphne, or uvicorn with one worker)."""
    workers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None or int(fields[1]) != master:
            continue
        try:
            if b"spawn_main" in (entry / "cmdline").read_bytes():
                workers.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return sorted(workers) or [master]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return math.nan


TCP_STATES = {"01": "ESTABLISHED", "08": "CLOSE_WAIT", "04": "FIN_WAIT1", "05": "FIN_WAIT2", "0A": "LISTEN"}


def tcp_sockets() -> dict[str, tuple[int, int, str]]:
    """The machine's TCP sockets (/proc/net/tcp and tcp6), by inode: local port, remote port, state."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote = (int(address.rsplit(":", 1)[1], 16) for address in fields[1:3])
                found[fields[9]] = (local, remote, TCP_STATES.get(fields[3], fields[3]))
    return found


def established() -> set[str]:
    """The socket inodes of the machine's established TCP connections."""
    return {inode for inode, (_, _, state) in tcp_sockets().items() if state == "ESTABLISHED"}


def socket_inodes(pid: int) -> list[str]:
    found = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                target = os.readlink(f"/proc/{pid}/fd/{name}")
                if target.startswith("socket:["):
                    found.append(target[8:-1])
    return found


def connections_left(pids: list[int], keyway_port: int, upstream_port: int) -> dict[int, collections.Counter[str]]:
    """Per worker, its sockets with a client (on Keyway's port, but for the listening one) or with the
    upstream, by peer and state."""
    table = tcp_sockets()
    left: dict[int, collections.Counter[str]] = {}
    for pid in pids:
        left[pid] = collections.Counter()
        for inode in socket_inodes(pid):
            local, remote, state = table.get(inode, (0, 0, "?"))
            if local == keyway_port and state != "LISTEN":
                left[pid][f"from a client {state}"] += 1
            elif remote == upstream_port:
                left[pid][f"to the upstream {state}"] += 1
    return left


def fd_kinds(pid: int, live: set[str]) -> collections.Counter[str] | None:
    """A process's open descriptors by kind: connections (established TCP, as in `live`), other sockets
    (listening, half-closed, Unix), files, pipes, anon_inodes (epoll, eventfd); None when it is gone."""
    kinds: collections.Counter[str] = collections.Counter()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return None
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue  # closed since the listing
        if target.startswith("socket:["):
            kinds["connections" if target[8:-1] in live else "sockets"] += 1
        else:
            kinds["files" if target.startswith("/") else target.split(":", 1)[0] + "s"] += 1
    return kinds


def describe_fds(pid: int) -> str:
    kinds = fd_kinds(pid, established())
    if kinds is None:
        return "gone"
    return f"{sum(kinds.values())} (" + ", ".join(f"{count} {kind}" for kind, count in kinds.most_common()) + ")"


class FdWatch:
    """Each worker's descriptors since the last take(), read every FD_EVERY seconds: the fewest and the most in
    all, and the fewest that are not an established TCP connection. That last figure is the one judged. The
    connections of the load generator and of Keyway's pools come and go with the load (the upstream pool
    keeps an idle connection 30 s, so a burst of latency leaves it larger for a while), whereas a descriptor
    that is never closed ends up outside them: a file, a pipe, an eventfd, or a socket its peer has closed."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.seen: dict[int, tuple[int, int, int]] = {}

    def read(self) -> None:
        live = established()
        for pid in self.pids:
            kinds = fd_kinds(pid, live)
            if kinds is None:
                continue
            total = sum(kinds.values())
            other = total - kinds["connections"]
            low, high, low_other = self.seen.get(pid, (total, total, other))
            self.seen[pid] = (min(low, total), max(high, total), min(low_other, other))

    def take(self) -> dict[int, tuple[int, int, int]]:
        self.read()
        taken = {pid: self.seen.get(pid, (-1, -1, -1)) for pid in self.pids}
        self.seen = {}
        return taken

    async def watch(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self.read()
            await asyncio.sleep(FD_EVERY)


@dataclass
class Sample:
    """One interval's figures."""

    minute: float
    done: int
    unexpected: int
    seconds: float  # the interval's length
    cpu: float  # server CPU seconds in the interval
    # pid -> RSS MB at the end; the fewest and most descriptors; the fewest outside established connections
    workers: dict[int, tuple[float, int, int, int]]
    p99: dict[str, float]


async def open_now(session: aiohttp.ClientSession, url: str, token: str) -> dict[str, int]:
    """The streams and WebSockets Keyway's workers report open, from /metrics."""
    async with session.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}) as got:
        text = await got.text()
    found = {"streams": 0, "websockets": 0}
    for line in text.splitlines():
        if line.startswith("keyway_open{"):
            labels, value = line.rsplit(" ", 1)
            kind = labels.split('kind="', 1)[1].split('"', 1)[0]
            found[kind] = found.get(kind, 0) + int(float(value))
    return found


def redis_client(env: dict[str, str]) -> Any:
    if not env.get("REDIS_URL"):
        return None
    import redis

    return redis.Redis.from_url(env["REDIS_URL"])


def slope_per_10_minutes(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (minute, value) points, per 10 minutes; None under 3 points."""
    if len(points) < 3:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return 10 * sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else None


def ms(values: list[float], fraction: float) -> str:
    return f"{percentile(values, fraction) * 1000:.1f}" if values else "-"


async def soak(
    args: argparse.Namespace, base: str, key: str, master: int, upstream: int, metrics_token: str, redis_db: Any
) -> tuple[Load, list[Sample], list[str]]:
    load = Load()
    samples: list[Sample] = []
    notes: list[str] = []
    stopping = asyncio.Event()
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as keep,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True), timeout=timeout) as fresh,
    ):
        client = Client(base, key, keep=keep, fresh=fresh)
        calls: dict[str, Callable[[], Awaitable[tuple[float, bool]]]] = {
            "chat": client.chat,
            "stream": client.stream,
            "embed": client.embed,
            "rt-open": lambda: client.rt_open("bench"),
            "rt-relay": lambda: client.rt_open("voice"),
            "rt-cut": client.rt_cut,
            "rt-gone": client.rt_gone,
            "http-cut": client.http_cut,
            "401-key": client.bad_key,
            "413-body": client.too_big,
            "400-max": client.max_tokens_over,
        }
        tasks: set[asyncio.Task[None]] = set()
        drivers = [
            loop.create_task(paced(load, kind, args.rate * SHARES[kind], call, stopping, tasks))
            for kind, call in calls.items()
            if kind not in args.skip
        ]
        turn_rate = args.rate * SHARES["rt-turn"] / args.sockets
        drivers += [
            loop.create_task(long_lived(load, client, turn_rate, index / args.sockets, stopping))
            for index in range(args.sockets if "rt-turn" not in args.skip else 0)
        ]
        workers = worker_pids(master)
        fds = FdWatch(workers)
        drivers.append(loop.create_task(fds.watch(stopping)))
        started = loop.time()
        cpu_before = cpu_seconds(master)
        # The load generator's and the upstream's CPU too: on a small machine they share the cores with the
        # server, and a starved load generator shows as latency.
        others_before = time.process_time(), cpu_seconds(upstream)
        intervals = math.ceil(args.minutes * 60 / args.interval)
        print(
            f"soak: {args.minutes:g} min at {args.rate:g} requests/s, {args.server} with {len(workers)} "
            f"worker(s) {', '.join(map(str, workers))}, one block every {args.interval:g} s"
            + (f", without {', '.join(args.skip)}" if args.skip else ""),
            flush=True,
        )
        for index in range(1, intervals + 1):
            with_interrupt = asyncio.ensure_future(interrupted.wait())
            await asyncio.wait([with_interrupt], timeout=max(0.0, started + index * args.interval - loop.time()))
            with_interrupt.cancel()
            elapsed = loop.time() - started - (index - 1) * args.interval
            tallies = load.take()
            cpu_now = cpu_seconds(master)
            cpu, cpu_before = cpu_now - cpu_before, cpu_now
            others_now = time.process_time(), cpu_seconds(upstream)
            client_cpu, upstream_cpu = (now - before for now, before in zip(others_now, others_before, strict=True))
            others_before = others_now
            figures = {pid: (rss_mb(pid), *counts) for pid, counts in fds.take().items()}
            now = worker_pids(master)
            if now != workers:
                notes.append(f"worker processes changed in interval {index}: {workers} -> {now}")
                workers = fds.pids = now
            try:
                opened = await open_now(keep, f"http://{base}", metrics_token)
            except (aiohttp.ClientError, TimeoutError) as exc:
                opened = {}
                notes.append(f"/metrics unreadable in interval {index}: {type(exc).__name__}")
            done = sum(len(tally.latencies) for tally in tallies.values())
            unexpected = sum(tally.failed for tally in tallies.values())
            minute = (loop.time() - started) / 60
            samples.append(
                Sample(
                    minute,
                    done,
                    unexpected,
                    elapsed,
                    cpu,
                    figures,
                    {kind: percentile(t.latencies, 0.99) for kind, t in tallies.items() if t.latencies},
                )
            )
            redis_memory = f"; redis {redis_db.info('memory')['used_memory'] / 2**20:.1f} MB" if redis_db else ""
            print(
                f"\n[{minute:5.1f} min] interval {index}: {done} done ({done / elapsed:.0f}/s), {unexpected} "
                f"unexpected; open now: {opened.get('streams', '?')} streams, {opened.get('websockets', '?')} "
                f"sockets{redis_memory}"
            )
            print(
                f"  cpu, % of a core: server {cpu / elapsed * 100:.0f} ({cpu * 1000 / max(done, 1):.2f} ms/request), "
                f"load generator {client_cpu / elapsed * 100:.0f}, upstream {upstream_cpu / elapsed * 100:.0f}"
            )
            print(
                "  "
                + " | ".join(
                    f"worker {pid}: {rss:.1f} MB, {low}-{high} fds, {other} outside connections"
                    for pid, (rss, low, high, other) in figures.items()
                )
            )
            print(f"  {'kind':<10}{'done':>7}{'unexp':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
            for kind, tally in tallies.items():
                values = tally.latencies
                print(
                    f"  {kind:<10}{len(values):>7}{tally.failed:>7}{ms(values, 0.5):>9}{ms(values, 0.95):>9}"
                    f"{ms(values, 0.99):>9}"
                )
                for reason, count in tally.unexpected.most_common(3):
                    print(f"  {'':<10}{count:>7} x {reason}")
            sys.stdout.flush()
            if interrupted.is_set():
                notes.append(f"interrupted after interval {index}")
                break
        stopping.set()
        await asyncio.wait(drivers, timeout=TIMEOUT + 5)
        if tasks:
            await asyncio.wait(tasks, timeout=TIMEOUT + 5)
    loop.remove_signal_handler(signal.SIGINT)
    return load, samples, notes


def books(env: dict[str, str], base: str, metrics_token: str, redis_db: Any) -> tuple[list[str], bool]:
    """With the load stopped and the server still up: nothing open, no hold left (Redis), and the spend
    counter equal to the ledger's cost. Returns lines to print and whether it all balances."""
    lines, ok = [], True
    time.sleep(3)  # the last settlements and the ledger's batch (every 0.25 s) land

    async def read_open() -> dict[str, int]:
        async with aiohttp.ClientSession() as session:
            return await open_now(session, f"http://{base}", metrics_token)

    opened = asyncio.run(read_open())
    still = sum(opened.values())
    ok &= still == 0
    lines.append(
        f"open after the load: {opened.get('streams', 0)} streams, {opened.get('websockets', 0)} sockets"
        f" ({'ok' if still == 0 else 'NOT CLOSED'})"
    )
    printed = [line.split() for line in manage(env, "shell", "-c", LEDGER_TOTALS).splitlines()]
    organization, cost = next(words[1:] for words in printed if words[:1] == ["totals"])
    by_status = [" ".join(words[1:]) for words in printed if words[:1] == ["row"]]
    lines.append("ledger by endpoint and status: " + ", ".join(by_status))
    if redis_db is not None:
        prefix = env["KEYWAY_CACHE_PREFIX"]
        held = sum(
            abs(int(value))
            for lease in redis_db.scan_iter(f"{prefix}:{{s*}}:bill:lease:*", count=1000)
            for value in redis_db.hvals(lease)
        )
        # The soak runs on one shard (KEYWAY_REDIS_SHARDS, billing.keys).
        spend = int(redis_db.get(f"{prefix}:{{s0}}:bill:spend:{organization}") or 0)
        balanced = held == 0 and spend == int(cost)
        ok &= balanced
        lines.append(
            f"redis: holds left on leases {held}; spend counter {spend} micro-USD, ledger cost {cost} "
            f"({'ok' if balanced else 'DOES NOT BALANCE'})"
        )
        kinds = collections.Counter(
            ":".join(name.decode().removeprefix(f"{prefix}:").split(":")[:2])
            for name in redis_db.scan_iter(f"{prefix}:*", count=1000)
        )
        lines.append("redis keys under the prefix: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    return lines, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between reports")
    parser.add_argument("--rate", type=float, default=150.0, help="requests (and realtime turns) a second, all kinds")
    parser.add_argument("--server", choices=["daphne", "uvicorn"], default="uvicorn")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sockets", type=int, default=4, help="long-lived realtime sockets")
    parser.add_argument("--warmup", type=float, default=2.0, help="minutes left out of the slopes")
    parser.add_argument("--max-rss-growth", type=float, default=3.0, help="MB per 10 minutes, per worker")
    parser.add_argument(
        "--max-fd-growth", type=float, default=5.0, help="descriptors outside connections per 10 minutes, per worker"
    )
    parser.add_argument("--env", action="append", default=[], help="a Keyway setting, NAME=value")
    parser.add_argument(
        "--skip", action="append", default=[], choices=list(SHARES), help="leave a kind out (a known failure, say)"
    )
    args = parser.parse_args()
    if args.server == "daphne" and args.workers != 1:
        args.workers = 1  # daphne runs one process

    scratch = Path(tempfile.mkdtemp(prefix="keyway-soak-"))
    env, database = make_environment(scratch)
    metrics_token = secrets.token_hex(16)
    env.update(
        DEBUG="0",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        KEYWAY_VAR_DIR=str(scratch),
        KEYWAY_DEFAULT_MODEL="",
        KEYWAY_DEFAULT_EMBEDDING_MODEL="",
        PYTHONUNBUFFERED="1",
        KEYWAY_METRICS_TOKEN=metrics_token,
        **{name: secrets.token_urlsafe(48) for name in ("SECRET_KEY", "KEYWAY_KEY_PEPPER", "KEYWAY_ENCRYPTION_KEY")},
        KEYWAY_DEFAULT_RPM=str(10**9),
        KEYWAY_DEFAULT_TPM=str(10**12),
        KEYWAY_PROJECT_RPM=str(10**9),
        KEYWAY_PROJECT_TPM=str(10**12),
        KEYWAY_AUTH_FAILURES_PER_MINUTE=str(10**9),
        KEYWAY_REALTIME_SESSIONS_PER_KEY="64",
        KEYWAY_MAX_BODY_BYTES=str(MAX_BODY),
    )
    upstream, upstream_url = start_fake_upstream(scratch / "upstream.log")
    keyway = None
    redis_db = redis_client(env)
    failures: list[str] = []
    try:
        key = prepare_demo(env, upstream_url)
        manage(env, "shell", "-c", SOAK_SETUP.format(url=f"{upstream_url}/v1"))
        commits_before = manage(env, "shell", "-c", LEDGER_COUNT).strip().splitlines()[-1].split()[1]
        env.update(dict(item.split("=", 1) for item in args.env))
        port = free_port()
        if args.server == "uvicorn":
            options = f"--port {port} --workers {args.workers} --loop uvloop --http httptools --no-access-log"
            command = [sys.executable, "-m", "uvicorn", "platform_site.asgi:application", *options.split()]
            command += ["--log-level", "warning"]
        else:
            command = serve.command(port)
        log = scratch / "keyway.log"
        # A session of its own, so that a Ctrl-C ends the load and leaves the server up for the books.
        keyway = subprocess.Popen(
            command, cwd=BASE_DIR, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
        )
        base = f"127.0.0.1:{port}"
        wait_for(f"http://{base}/health", process=keyway)
        time.sleep(2)  # uvicorn's other workers come up after the first answers

        workers = worker_pids(keyway.pid)
        idle = {pid: describe_fds(pid) for pid in workers}
        runner = asyncio.Runner(loop_factory=_loop_factory())
        with runner:
            load, samples, notes = runner.run(soak(args, base, key, keyway.pid, upstream.pid, metrics_token, redis_db))
        book_lines, balanced = books(env, base, metrics_token, redis_db)
        drained = {pid: describe_fds(pid) for pid in worker_pids(keyway.pid)}
        # Idle connections close by themselves (uvicorn's kept-alive ones after 5 s, Keyway's upstream pool's
        # after 30 s, at its next clean-up); what is still there after that was never closed.
        quiet = time.monotonic()
        while True:
            left = connections_left(list(drained), port, int(upstream_url.rsplit(":", 1)[1]))
            if not any(left.values()) or time.monotonic() - quiet > IDLE_WAIT:
                break
            time.sleep(5)
        book_lines.append(
            f"connections left {time.monotonic() - quiet:.0f} s after the load: "
            + "; ".join(
                f"worker {pid}: " + (", ".join(f"{count} {kind}" for kind, count in kinds.items()) or "none")
                for pid, kinds in left.items()
            )
            + (" (ok)" if not any(left.values()) else " (NOT CLOSED)")
        )
        balanced &= not any(left.values())
        stop(keyway)  # a clean stop writes the last usage events
        keyway = None
        ledger = manage(env, "shell", "-c", LEDGER_COUNT).strip().splitlines()[-1].split()
        journals = [path.name for path in (scratch / "usage-journal").glob("*") if path.is_file()]

        print(
            f"\nsummary: {samples[-1].minute if samples else 0:.1f} min at {args.rate:g} requests/s, {args.server}, "
            f"{args.workers} worker(s), database {env.get('DATABASE_URL', 'sqlite').rsplit('@', 1)[-1]}, "
            f"cache {'redis' if redis_db else 'local'}"
        )
        failures += report(args, load, samples)
        for pid in idle:
            print(f"worker {pid} fds before the load: {idle[pid]}; after it: {drained.get(pid, 'gone')}")
        for line in book_lines:
            print(line)
        rows = int(ledger[0])
        ledger_ok = load.metered <= rows <= load.metered + load.maybe_metered
        transactions = (
            f"; database transactions per metered call: {(int(ledger[1]) - int(commits_before)) / max(rows, 1):.3f}"
            if ledger[1] != "-"
            else ""
        )
        print(
            f"ledger: {rows} rows for {load.metered} metered calls"
            + (f" and {load.maybe_metered} that timed out or lost their connection" if load.maybe_metered else "")
            + f" ({'ok' if ledger_ok else 'MISMATCH'}){transactions}"
        )
        print(f"usage journals left after the stop: {len(journals)} {'(ok)' if not journals else journals}")
        if not balanced or not ledger_ok or journals:
            failures.append("books")
        errors = server_errors(log)
        print(
            f"server log: {sum(errors.values())} errors" + "".join(f"\n  {n} x {e}" for e, n in errors.most_common(5))
        )
        if errors:
            failures.append("server errors")
        for note in notes:
            print(f"note: {note}")
        if any(note.startswith("worker processes changed") for note in notes):
            failures.append("a worker restarted")
        if any(note.startswith("interrupted") for note in notes):
            failures.append("interrupted")
        print(f"result: {'FAIL (' + ', '.join(failures) + ')' if failures else 'pass'}")
        if failures:
            print(f"kept for a look: {scratch} (keyway.log, upstream.log)")
    finally:
        if keyway is not None:
            stop(keyway)
        stop(upstream)
        drop_database(database)
    if not failures:
        shutil.rmtree(scratch, ignore_errors=True)
    sys.exit(1 if failures else 0)


def report(args: argparse.Namespace, load: Load, samples: list[Sample]) -> list[str]:
    """The summary: a row per interval, each kind over the whole run, and per worker the first and last
    figures, the slopes after the warm-up and the verdict. Returns what failed."""
    failures = []
    pids = list(dict.fromkeys(pid for sample in samples for pid in sample.workers))
    main_kinds = ("chat", "stream", "embed", "rt-turn", "rt-relay")
    header = f"{'min':>5}{'done':>7}{'unexp':>6}{'cpu%':>6}"
    header += "".join(f"{f'{pid} MB':>12}{'fds':>5}{'other':>6}" for pid in pids)
    header += "".join(f"{f'{kind} p99':>13}" for kind in main_kinds)
    print(header)
    for sample in samples:
        row = f"{sample.minute:>5.1f}{sample.done:>7}{sample.unexpected:>6}{sample.cpu / sample.seconds * 100:>6.0f}"
        for pid in pids:
            rss, low, _, other = sample.workers.get(pid, (math.nan, -1, -1, -1))
            row += f"{rss:>12.1f}{low:>5}{other:>6}"
        row += "".join(
            f"{sample.p99[kind] * 1000:>13.1f}" if kind in sample.p99 else f"{'-':>13}" for kind in main_kinds
        )
        print(row)
    print(
        "(MB: RSS at the end of the interval; fds: the fewest open during it; other: the fewest that were not an "
        "established TCP connection; p99 in ms)"
    )

    print(f"\n{'kind':<10}{'done':>8}{'unexp':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}   (whole run)")
    for kind, tally in load.total.items():
        values = tally.latencies
        print(
            f"{kind:<10}{len(values):>8}{tally.failed:>7}{ms(values, 0.5):>9}{ms(values, 0.95):>9}{ms(values, 0.99):>9}"
        )
    unexpected = {kind: tally.unexpected for kind, tally in load.total.items() if tally.unexpected}
    for kind, reasons in unexpected.items():
        print(f"unexpected {kind}: " + ", ".join(f"{count} x {reason}" for reason, count in reasons.most_common()))
    if unexpected:
        failures.append("unexpected outcomes")

    growing = []
    judged = False
    print()
    for pid in pids:
        # (minute, RSS, fewest descriptors, fewest outside connections)
        series = [
            (s.minute, s.workers[pid][0], s.workers[pid][1], s.workers[pid][3]) for s in samples if pid in s.workers
        ]
        after = [point for point in series if point[0] > args.warmup]
        rss_slope, all_slope, fd_slope = (
            slope_per_10_minutes([(point[0], point[column]) for point in after]) for column in (1, 2, 3)
        )
        first, last = series[0], series[-1]
        slopes = (
            f"after minute {args.warmup:g}, per 10 min: RSS {rss_slope:+.2f} MB, fds outside connections "
            f"{fd_slope:+.1f} (all fds {all_slope:+.1f})"
            if rss_slope is not None and fd_slope is not None
            else "too few intervals after the warm-up"
        )
        print(
            f"worker {pid}: RSS {first[1]:.1f} -> {last[1]:.1f} MB, fds {first[2]} -> {last[2]}, outside connections "
            f"{first[3]} -> {last[3]} (minute {first[0]:.1f} -> {last[0]:.1f}); {slopes}"
        )
        if rss_slope is None or fd_slope is None:
            continue
        judged = True
        limits = (
            ("RSS", rss_slope, args.max_rss_growth, "MB"),
            ("fds outside connections", fd_slope, args.max_fd_growth, ""),
        )
        growing += [
            f"worker {pid} {name} {slope:+.1f}{unit} > {limit:g}{unit}"
            for name, slope, limit, unit in limits
            if slope > limit
        ]
    if not judged:
        print(f"verdict: too short to judge (needs 3 intervals ending after minute {args.warmup:g})")
    elif growing:
        failures.append("growing")
        print(f"verdict: growing, per 10 min after minute {args.warmup:g}: {'; '.join(growing)}")
    else:
        print(
            f"verdict: flat (per 10 min after minute {args.warmup:g}, every worker within +{args.max_rss_growth:g} MB "
            f"RSS and +{args.max_fd_growth:g} fds outside connections)"
        )
    return failures


def server_errors(log: Path) -> collections.Counter[str]:
    """The server's ERROR and CRITICAL records, by logger and first line of message (request ids and task
    numbers blanked, so that one cause is one line)."""
    found: collections.Counter[str] = collections.Counter()
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            if "Traceback" in line or " ERROR " in line or " CRITICAL " in line:
                found[line.strip()[:200]] += 1
            continue
        if isinstance(record, dict) and record.get("level") in ("ERROR", "CRITICAL"):
            message = str(record.get("message", "")).splitlines()[0]
            message = re.sub(r"req_[0-9a-f]+", "req_…", re.sub(r"Task-\d+", "Task-…", message))
            found[f"{record.get('logger')}: {message[:160]}"] += 1
    return found


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    main()
