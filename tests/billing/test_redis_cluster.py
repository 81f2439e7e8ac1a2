"""Billing on a real Redis Cluster (billing.connections, billing.keys): three primary nodes, organizations in
four shards spread over them, every script and transaction in one hash slot.

A Redis Cluster refuses a command or script that declares keys of two slots (CROSSSLOT), a script that reaches
an undeclared key of another slot, and a key whose slot another node holds (MOVED, which the cluster client
follows). Admission with rate limits, credit and every monthly cap, with slices (billing.slices); a settlement
batch spanning the shards; the usage streams written to the ledger; a dead worker's holds reaped in two shards
by a live worker's heartbeat; a reconciliation pass, which scans every node.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
from asgiref.sync import sync_to_async

from apikeys.auth import authenticate_key
from apikeys.services import apikey_create
from billing import counters, keys, metering
from billing import reconcile as reconcile_module
from billing.ledger import drain_stream
from billing.models import BillingAccount, Plan, Price, UsageEvent
from billing.reconcile import reconcile
from billing.services import billing_plan_set, credit_add
from platform_site.models import Organization
from platform_site.services import organization_create

pytestmark = pytest.mark.django_db(transaction=True)

SHARDS = 4
COST = 3_000  # 3 output tokens at 1,000 micro-USD each


def _free_port() -> int:
    """A free port whose cluster bus port (the port + 10,000) is free too, and exists."""
    for port in random.sample(range(20_000, 50_000), 200):
        with socket.socket() as probe, socket.socket() as bus:
            try:
                probe.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


NODES = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[int, int, int]]]:
    """A Redis Cluster of three primary nodes, each holding a third of the 16,384 slots: (port, first slot,
    last slot) of each."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    nodes, clients, made = [], [], []
    try:
        for number in range(NODES):
            directory: Path = tmp_path_factory.mktemp(f"redis-cluster-{number}")
            port = _free_port()
            nodes.append(subprocess.Popen(  # noqa: S603 (a fixed argument list)
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", str(directory / "nodes.conf"), "--dir", str(directory), "--save", "",
                 "--appendonly", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            clients.append(redis.Redis(host="127.0.0.1", port=port))
            first, last = number * 16384 // NODES, (number + 1) * 16384 // NODES - 1
            made.append((port, first, last))
        deadline = time.monotonic() + 20
        for client in clients:
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        for client, (_, first, last) in zip(clients, made, strict=True):
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for port, _, _ in made[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        while not all(client.cluster("info")["cluster_state"] == "ok" for client in clients):
            assert time.monotonic() < deadline, "the cluster never became ready"
            time.sleep(0.1)
        yield made
    finally:
        for client in clients:
            client.close()
        for node in nodes:
            node.terminate()
            node.wait(timeout=10)


def _node_of(cluster: list[tuple[int, int, int]], name: str) -> int:
    from redis.crc import key_slot

    slot = key_slot(name.encode())
    return next(port for port, first, last in cluster if first <= slot <= last)


# Redis 7 checks that a script reaches only keys of its declared keys' slot when the script says it is a
# script of Redis 7 (the `#!lua` line); without one it does not, for scripts written before clusters. Here
# every script billing runs says so, so that a key reached by name (a lease, a heartbeat) is checked too.
SCRIPTS = {
    counters: ("_ADMIT", "_SETTLE", "_SEED", "_HEARTBEAT", "_RETIRE"),
    reconcile_module: ("_SNAPSHOT", "_CORRECT", "_CORRECT_CREDIT", "_REAP_ORPHAN"),
}


@pytest.fixture
def on_cluster(cluster: list[tuple[int, int, int]], settings: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Billing on the cluster (billing.connections), in four shards spread over its three nodes; the rest of
    Keyway (the cache) on this machine's Redis."""
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
    except redis.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    for module, names in SCRIPTS.items():
        for name in names:
            monkeypatch.setattr(module, name, "#!lua\n" + getattr(module, name))
    settings.REDIS_URL = "redis://127.0.0.1:6379/14"
    settings.KEYWAY_BILLING_REDIS_URL = f"redis://127.0.0.1:{cluster[0][0]}/0"
    settings.KEYWAY_BILLING_REDIS_CLUSTER = True
    settings.KEYWAY_REDIS_SHARDS = SHARDS
    settings.KEYWAY_CACHE_PREFIX = f"test-{uuid.uuid4().hex[:8]}"
    # Every node holds a shard: the proof below runs on all three.
    assert {_node_of(cluster, keys.spend(shard)) for shard in range(SHARDS)} == {port for port, _, _ in cluster}
    return settings.KEYWAY_BILLING_REDIS_URL


def test_the_nodes_refuse_what_a_cluster_refuses(on_cluster: str, cluster: list[tuple[int, int, int]]) -> None:
    """The proof below can fail: a node refuses keys of two slots, declared or reached from a script, and a
    key of a slot another node holds."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=_node_of(cluster, keys.spend(0)))
    with pytest.raises(redis.ResponseError, match="hash to the same slot"):
        client.eval("return 1", 2, keys.spend(0), keys.spend(1))
    with pytest.raises(redis.ResponseError, match="do not hash to the same slot"):
        client.eval("#!lua\nreturn redis.call('GET', ARGV[1])", 1, keys.spend(0), keys.spend(1))
    with pytest.raises(redis.exceptions.MovedError):
        client.get(keys.spend(2))
    client.close()


def _organizations() -> list[tuple[Organization, str]]:
    """Four prepaid organizations, one in each shard, each with a key under rate limits and every monthly
    cap, and credit for ten calls."""
    Price.objects.create(model="m", output_per_million_micros=1_000_000_000)
    plan = Plan.objects.create(name="prepaid-capped", billing_mode=Plan.Mode.PREPAID, default_rpm=100,
                               default_tpm=100_000, monthly_budget_micros=10**9)
    made = []
    for number in range(SHARDS):
        organization = organization_create(name=f"Shard {number}", slug=f"shard-{number}", actor_label="test")
        billing_plan_set(organization=organization, plan=plan, actor_label="test")
        credit_add(organization=organization, amount_micros=10 * COST, reason="test", actor_label="test")
        _, raw = apikey_create(organization=organization, name="key", monthly_budget_micros=10**9,
                               actor_label="test")
        made.append((organization, raw))
    assert sorted(keys.shard_of(organization.pk) for organization, _ in made) == list(range(SHARDS))
    return made


async def _admit(worker: counters._RedisCounters, raw: str, call_id: str) -> metering.Meter:
    key = await authenticate_key(raw)
    with patch.object(counters, "store", return_value=worker):
        return await metering.admit(key=key, call_id=call_id, request_id="req_cluster", endpoint=1, models=["m"],
                                    prompt_tokens=2, max_output_tokens=5)


async def test_admission_settlement_the_usage_streams_reaping_and_reconciliation_run_on_a_cluster(
    on_cluster: str,
) -> None:
    organizations = await sync_to_async(_organizations)()
    live, dead = counters._RedisCounters(), counters._RedisCounters()
    with patch.object(counters, "store", return_value=live):
        # One call in each shard, settled together: one settlement batch across the four shards.
        meters = [await _admit(live, raw, f"call-{uuid.uuid4().hex}") for _, raw in organizations]
        for meter in meters:
            meter.settle(model="m", status=1, usage_source=1, prompt_tokens=2, completion_tokens=3)
        await counters.flush()
        spends = {organization.pk: await live.read(keys.spend(organization.pk)) for organization, _ in organizations}
        assert spends == {organization.pk: COST for organization, _ in organizations}
        assert sum([await live.client.xlen(keys.usage_stream(shard)) for shard in keys.shards()]) == SHARDS

        # Another worker takes holds in two shards and dies; the live worker's heartbeat gives them back.
        for organization, raw in organizations[:2]:
            await _admit(dead, raw, f"call-{uuid.uuid4().hex}")
            assert await live.read(keys.spend(organization.pk)) == COST + 5_000
        assert dead.heartbeats is not None and dead.reconciler is not None
        dead.heartbeats.cancel()
        dead.reconciler.cancel()
        for shard in keys.shards():
            await dead.client.delete(keys.alive(shard, dead.worker))
        await live.heartbeat()
        for organization, _ in organizations[:2]:
            assert await live.read(keys.spend(organization.pk)) == COST
            assert not await live.client.exists(dead.lease(keys.shard_of(organization.pk)))

        assert await sync_to_async(drain_stream)() == SHARDS

        def ledger() -> dict[int, tuple[int, int]]:
            return {organization.pk: (UsageEvent.objects.filter(organization=organization).count(),
                                      BillingAccount.objects.get(organization=organization).usage_total_micros)
                    for organization, _ in organizations}

        assert await sync_to_async(ledger)() == {organization.pk: (1, COST) for organization, _ in organizations}
        report = await reconcile(live.client, quiet_seconds=0.05)
        # Each organization's spend, credit, month and key month counters: all right.
        assert report.checked == 4 * len(organizations) and report.corrected == [] and report.busy == 0, report
    await dead.client.aclose()
    await live.close()
