"""Three gateway hosts sharing one PostgreSQL and one Redis, on this machine (issue 16's simulation).

Each host is a network namespace of its own (iproute2: `ip netns`, a veth pair, one bridge), with its own
address, its own var directory (its journals, its metrics) and its own uvicorn worker. They reach PostgreSQL,
Redis and the upstream only through the bridge, as hosts reach them over a network; PostgreSQL and Redis
listen on this machine's loopback, so a small TCP forwarder carries the bridge's port to each.

What is proven, with clients spread over the three hosts:
- a key's requests-per-minute limit and a prepaid organization's credit are exact across hosts: of more
  requests than either allows, arriving at once, exactly the allowed number is served;
- a host killed outright (SIGKILL, its var directory deleted: its disk is lost with it) while serving JSON and
  long streams loses no usage event: every answer a client received is in the ledger exactly once, the
  organization's total is the ledger's sum, and the shared counters hold no reservation of the lost host's
  calls (the live hosts reaped its lease and claimed the events it had read and not written).

Needs root (network namespaces) and the PostgreSQL + Redis leg of CI; elsewhere it is skipped, except where
KEYWAY_REQUIRE_NETNS is set (CI), where not being able to build the hosts fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.e2e import server

pytestmark = pytest.mark.e2e

HOSTS = 3
OUTPUT_PRICE = 1_000_000_000  # 1,000 micro-USD per output token: the fake upstream's 7 tokens cost 7,000
COST = 7_000


def _can_build_hosts() -> str:
    if not os.environ.get("DATABASE_URL", "").startswith("postgres") or not os.environ.get("REDIS_URL"):
        return "the PostgreSQL + Redis run of CI: hosts share one PostgreSQL and one Redis"
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "network namespaces need root and iproute2"
    return ""


_WHY_NOT = _can_build_hosts()
if _WHY_NOT and not (os.environ.get("KEYWAY_REQUIRE_NETNS") and os.environ.get("REDIS_URL")):
    pytestmark = [pytest.mark.e2e, pytest.mark.skip(reason=_WHY_NOT)]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class _Forwarder:
    """Accepts on the bridge's address and carries each connection to a port on this machine's loopback."""

    def __init__(self, host: str, target_port: int) -> None:
        self.host, self.target_port = host, target_port
        self.port = server.free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            await asyncio.gather(self._pipe(reader, target_writer), self._pipe(target_reader, writer))
        except (OSError, asyncio.CancelledError):
            # Refused, or the forwarder closing at the end of the module (asyncio's stream callback would log
            # a cancelled connection as an error).
            writer.close()

    def __enter__(self) -> _Forwarder:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._connection, self.host, self.port), self.loop
        ).result(10)
        return self

    async def _close(self) -> None:
        self.server.close()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@contextlib.contextmanager
def _network() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """A bridge on this machine and HOSTS namespaces on it; yields (the bridge's address, [(namespace,
    address)])."""
    tag = uuid.uuid4().hex[:4]
    subnet = f"10.{64 + secrets.randbelow(64)}.{1 + secrets.randbelow(250)}"
    bridge, gateway = f"kw{tag}br", f"{subnet}.1"
    hosts = [(f"kw{tag}h{number}", f"{subnet}.{10 + number}") for number in range(1, HOSTS + 1)]
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{gateway}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for number, (namespace, address) in enumerate(hosts, start=1):
            outside, inside = f"kw{tag}v{number}", f"kw{tag}p{number}"
            _ip("netns", "add", namespace)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", namespace)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", namespace, "link", "set", inside, "up")
            _ip("-n", namespace, "route", "add", "default", "via", gateway)
        yield gateway, hosts
    finally:
        for namespace, _ in hosts:
            _kill_namespace(namespace)
            with contextlib.suppress(subprocess.SubprocessError):
                _ip("netns", "del", namespace)  # its end of the veth pair goes with it
        with contextlib.suppress(subprocess.SubprocessError):
            _ip("link", "del", bridge)


def _kill_namespace(namespace: str) -> None:
    """Every process of the host, at once: what a power cut does."""
    result = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False)
    for pid in result.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def _start_host(namespace: str, address: str, env: dict[str, str], var_dir: Path) -> subprocess.Popen[bytes]:
    var_dir.mkdir(parents=True, exist_ok=True)
    host_env = {**env, "KEYWAY_VAR_DIR": str(var_dir)}
    server.SERVER_LOGS.append((var_dir / "server.log", var_dir))
    return subprocess.Popen(
        ["ip", "netns", "exec", namespace, server.PYTHON, "-m", "uvicorn", "--host", address, "--port", "8000",
         "--no-access-log", "--workers", "1", "platform_site.asgi:application"],
        cwd=server.BASE_DIR, env=host_env, stdout=(var_dir / "server.log").open("ab"), stderr=subprocess.STDOUT,
    )


SETUP = """
from apikeys.services import apikey_create
from billing.models import Plan, Price
from billing.services import billing_plan_set, credit_add
from platform_site.models import Organization
from platform_site.services import organization_create
for model in ("ok", "slow-stream-2"):
    Price.objects.update_or_create(model=model, defaults={{"output_per_million_micros": {price}}})
demo = Organization.objects.get(slug="demo")
print(apikey_create(organization=demo, name="limited", rpm_limit=40)[1])
prepaid = organization_create(name="Prepaid", slug="prepaid")
billing_plan_set(organization=prepaid, plan=Plan.objects.create(name="prepaid", billing_mode="prepaid"))
credit_add(organization=prepaid, amount_micros={credit}, reason="thirty calls", actor_label="test")
print(apikey_create(organization=prepaid, name="prepaid")[1])
"""

LEDGER = """
import json
from billing.models import BillingAccount, UsageEvent
rows = list(UsageEvent.objects.values_list("request_id", "organization__slug", "cost_micros", "status"))
accounts = dict(BillingAccount.objects.values_list("organization__slug", "usage_total_micros"))
print(json.dumps({"rows": rows, "accounts": accounts}))
"""


def _ledger(env: dict[str, str]) -> dict[str, Any]:
    import json

    return json.loads(server.django_shell(env, LEDGER).strip().splitlines()[-1])


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    var_dir = tmp_path_factory.mktemp("three-hosts")
    env, database = server.make_environment(var_dir / "admin")
    # A Redis database of their own: the test process empties its own before every test (`cache.clear()`).
    redis_port, redis_db = (int(part) for part in os.environ["REDIS_URL"].rsplit(":", 1)[1].split("/"))
    redis_db = (redis_db + 8) % 16
    upstream = None
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with _network() as (gateway, namespaces), _Forwarder(gateway, 5432) as postgres, \
                _Forwarder(gateway, redis_port) as redis:
            try:
                upstream, upstream_url = server.start_fake_upstream(var_dir / "upstream.log", host=gateway)
                env.update(
                    KEYWAY_UPSTREAM_BASE_URL=f"{upstream_url}/v1", KEYWAY_UPSTREAM_MODELS="ok,slow-stream-2",
                    KEYWAY_UPSTREAM_NAME="fake", KEYWAY_DEFAULT_RPM="1000000", KEYWAY_RECONCILE_INTERVAL="0",
                    KEYWAY_DEFAULT_EMBEDDING_MODEL="", REDIS_URL=f"redis://127.0.0.1:{redis_port}/{redis_db}",
                    # As production runs: DEBUG off, and the secrets every host shares (API key hashes depend on
                    # the pepper) from the environment.
                    DEBUG="0",
                    **{name: secrets.token_urlsafe(48) for name in ("SECRET_KEY", "KEYWAY_KEY_PEPPER",
                                                                     "KEYWAY_ENCRYPTION_KEY")},
                )
                output = server.manage(env, "bootstrap")
                key = next(word for word in output.split() if word.startswith("sk-kw-"))
                limited, prepaid = server.django_shell(
                    env, SETUP.format(price=OUTPUT_PRICE, credit=30 * COST)
                ).strip().splitlines()[-2:]
                host_env = {
                    **env,
                    # Through the bridge, as another machine reaches them.
                    "DATABASE_URL": env["DATABASE_URL"].replace("127.0.0.1:5432", f"{gateway}:{postgres.port}"),
                    "REDIS_URL": f"redis://{gateway}:{redis.port}/{redis_db}",
                    "ALLOWED_HOSTS": ",".join(address for _, address in namespaces),
                    "KEYWAY_WORKER_HEARTBEAT_INTERVAL": "0.5",
                    "KEYWAY_USAGE_CLAIM_IDLE": "2",
                }
                for number, (namespace, address) in enumerate(namespaces, start=1):
                    processes.append(_start_host(namespace, address, host_env, var_dir / f"host{number}"))
                urls = [f"http://{address}:8000" for _, address in namespaces]
                for process, url in zip(processes, urls, strict=True):
                    server.wait_for(f"{url}/health", process=process, timeout=90)
                yield {"env": env, "urls": urls, "namespaces": namespaces, "var_dir": var_dir,
                       "keys": {"demo": key, "limited": limited, "prepaid": prepaid}}
            finally:
                # While the forwarders still carry their connections: a clean stop, as a deploy does.
                for process in processes:
                    server.stop(process)
                if upstream is not None:
                    server.stop(upstream)
    finally:
        server.drop_database(database)


async def _call(client: httpx2.AsyncClient, url: str, key: str, *, model: str = "ok",
                stream: bool = False) -> tuple[int, str, str]:
    """(status, error code, request id); a stream counts as answered once its [DONE] arrived."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}
    headers = {"Authorization": f"Bearer {key}"}
    try:
        if not stream:
            response = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            code = response.json().get("error", {}).get("code", "") if response.status_code != 200 else ""
            return response.status_code, code, response.headers.get("x-request-id", "")
        body.update(stream=True, stream_options={"include_usage": True}, max_tokens=25)
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
            done = response.status_code == 200 and lines and lines[-1] == "data: [DONE]"
            return (200 if done else 599), "", response.headers.get("x-request-id", "")
    except httpx2.HTTPError as error:
        return 599, type(error).__name__, ""


def _at_start_of_a_minute() -> None:
    """Rate windows are calendar minutes: a burst that straddles two would get two allowances."""
    if time.time() % 60 > 45:
        time.sleep(60 - time.time() % 60 + 0.2)


def test_a_keys_rate_limit_and_an_organizations_credit_are_exact_across_three_hosts(hosts: dict[str, Any]) -> None:
    urls, keys = hosts["urls"], hosts["keys"]

    async def burst(key: str, count: int) -> list[tuple[int, str, str]]:
        async with httpx2.AsyncClient(timeout=30, limits=httpx2.Limits(max_connections=200)) as client:
            return await asyncio.gather(*(_call(client, urls[n % HOSTS], key) for n in range(count)))

    _at_start_of_a_minute()
    limited = asyncio.run(burst(keys["limited"], 120))
    statuses = sorted((status, code) for status, code, _ in limited)
    assert statuses.count((200, "")) == 40, statuses
    assert all(status in (200, 429) for status, _ in statuses), statuses

    prepaid = asyncio.run(burst(keys["prepaid"], 90))
    served = [answer for answer in prepaid if answer[0] == 200]
    refused = [answer for answer in prepaid if answer[0] != 200]
    assert len(served) == 30, sorted((status, code) for status, code, _ in prepaid)
    assert {(status, code) for status, code, _ in refused} == {(429, "insufficient_quota")}
    # Written by whichever host's consumer read them: exactly the credit, charged once per call.
    deadline = time.monotonic() + 20
    while True:
        ledger = _ledger(hosts["env"])
        rows = [row for row in ledger["rows"] if row[1] == "prepaid"]
        if len(rows) >= 30 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(row[0] for row in rows) == sorted(request_id for _, _, request_id in served)
    assert ledger["accounts"]["prepaid"] == sum(row[2] for row in rows) == 30 * COST


def test_a_host_killed_under_load_loses_no_usage_event_and_leaves_no_hold(hosts: dict[str, Any]) -> None:
    urls, key, env = hosts["urls"], hosts["keys"]["demo"], hosts["env"]
    answers: list[tuple[int, str, str]] = []
    killed_at: list[float] = []

    async def client_loop(url: str, stream: bool, stop: asyncio.Event) -> None:
        async with httpx2.AsyncClient(timeout=30) as client:
            while not stop.is_set():
                answer = await _call(client, url, key, model="slow-stream-2" if stream else "ok", stream=stream)
                answers.append(answer)
                if answer[0] != 200:
                    return  # its host is gone

    async def scenario() -> None:
        stop = asyncio.Event()
        loops = [asyncio.ensure_future(client_loop(url, stream, stop))
                 for url in urls for stream in (False, False, False, False, True, True)]
        await asyncio.sleep(3)
        # Host 2 goes away with its disk: every process at once, then its var directory (journals included).
        killed_at.append(time.monotonic())
        await asyncio.to_thread(_kill_namespace, hosts["namespaces"][1][0])
        shutil.rmtree(hosts["var_dir"] / "host2", ignore_errors=True)
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*loops)

    asyncio.run(scenario())
    answered = [request_id for status, _, request_id in answers if status == 200]
    lost = [answer for answer in answers if answer[0] != 200]
    assert len(answered) > 100 and lost, (len(answered), len(lost))  # the kill did cut calls off
    assert all(status == 599 for status, _, _ in lost), lost  # only what the dead host was serving

    # Within the heartbeat's expiry and the claim delay, the live hosts have written everything and given back
    # the lost host's holds. Checked without correcting anything (a dry run): any drift the loss left would
    # never go away, and fail this.
    report = ""
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        ledger = _ledger(env)
        written = [row[0] for row in ledger["rows"] if row[1] == "demo"]
        report = server.manage(env, "reconcile_counters", "--dry-run")
        if set(answered) <= set(written) and "0 corrected" in report and "0 busy" in report:
            break
        time.sleep(1)
    missing = set(answered) - set(written)
    assert not missing, f"{len(missing)} of {len(answered)} answered calls are not in the ledger"
    assert len(written) == len(set(written)), "a call was charged twice"
    assert ledger["accounts"]["demo"] == sum(row[2] for row in ledger["rows"] if row[1] == "demo")
    # The counters agree with the ledger: no hold of the lost host's calls is left behind.
    assert "0 corrected" in report and "0 busy" in report, report
    print(f"{len(answered)} answered, {len(lost)} cut off by the kill; {report.strip()}")
