"""Reconciliation of the shared counters with the ledger (billing.reconcile), against a real Redis: drift is
injected by hand, and a pass corrects what is quiet, leaves what is busy, and reaps the leases of workers that
are gone."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.management import call_command

from apikeys.models import ApiKey
from billing import keys
from billing.models import BillingAccount
from billing.reconcile import reconcile
from billing.services import SettledUsage, credit_add, usage_events_write
from platform_site.kernel import metrics
from platform_site.models import Organization

pytestmark = pytest.mark.django_db(transaction=True)

REDIS_URL = "redis://127.0.0.1:6379/14"


@pytest.fixture
async def redis_client() -> AsyncIterator[Any]:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception:  # noqa: BLE001
        pytest.skip("no Redis on 127.0.0.1:6379")
    yield client
    await client.aclose()


@pytest.fixture
def prefix(redis_client: Any) -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _event(org: Organization, key: ApiKey | None, cost: int, call_id: str | None = None) -> SettledUsage:
    return SettledUsage(
        call_id=call_id or uuid.uuid4().hex, request_id="req", session_id="", organization_id=org.pk,
        api_key_id=key.pk if key else None, endpoint=1, model="m", deployment_id=None, provider="p",
        prompt_tokens=1, cached_tokens=0, completion_tokens=1, cost_micros=cost, status=1, usage_source=1,
        latency_ms=1, ttft_ms=None, created_at=time.time(), project_id=key.project_id if key else None,
    )


def _corrections(kind: str) -> float:
    registry_value = 0.0
    for family in metrics.metrics().reconciled.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("counter") == kind:
                registry_value += sample.value
    return registry_value


async def test_a_pass_corrects_quiet_drift_leaves_busy_counters_and_reaps_dead_leases(
    redis_client: Any, prefix: str, org: Organization, other_org: Organization, api_key: tuple[ApiKey, str],
) -> None:
    key = api_key[0]
    month = time.strftime("%Y%m", time.gmtime())

    def ledger() -> tuple[int, int]:
        usage_events_write([_event(org, key, 1000), _event(org, key, 2000), _event(other_org, None, 400)])
        credit_add(organization=org, amount_micros=10**6, reason="test", actor_label="test")
        account = BillingAccount.objects.get(organization=org)
        return account.credit_total_micros, account.credit_version

    credit_total, credit_version = await sync_to_async(ledger)()
    # One more event settled on this host, still in its journal (not yet written): it counts.
    journal = Path(settings.KEYWAY_USAGE_JOURNAL_DIR) / f"host-1-{time.time_ns()}-1.usage"
    journal.write_bytes(orjson.dumps(_event(org, key, 50).as_row()) + b"\n")

    bill = f"{keys.shard_prefix(0, prefix)}:bill"  # one shard: every billing key in it
    await redis_client.set(f"{bill}:spend:{org.pk}", 9999)  # drifted up
    await redis_client.set(f"{bill}:month:{org.pk}:{month}", 3150)  # right, once the dead lease's 100 is back
    await redis_client.set(f"{bill}:kmonth:{key.pk}:{month}", 0, ex=3600)  # drifted down
    await redis_client.set(f"{bill}:spend:{other_org.pk}", 900)  # drifted, but a live call holds 500 on it
    await redis_client.hset(f"{bill}:credit:{org.pk}", mapping={"t": 5, "v": 1})
    # A live worker (registered, heartbeat) holding a call in flight on the other organization...
    await redis_client.sadd(f"{bill}:workers", "live")
    await redis_client.set(f"{bill}:alive:live", 1, ex=60)
    await redis_client.hset(f"{bill}:lease:live", f"{bill}:spend:{other_org.pk}", 500)
    # ...and a worker that is gone (neither), whose lease still holds 100 on the month counter.
    await redis_client.hset(f"{bill}:lease:ghost", f"{bill}:month:{org.pk}:{month}", 100)

    dry = await reconcile(redis_client, prefix=prefix, quiet_seconds=0.05, dry_run=True)
    assert int(await redis_client.get(f"{bill}:spend:{org.pk}")) == 9999  # a dry run changes nothing
    assert {name for name, _, _ in dry.corrected} >= {f"{bill}:spend:{org.pk}", f"{bill}:kmonth:{key.pk}:{month}"}

    before = _corrections("spend")
    report = await reconcile(redis_client, prefix=prefix, quiet_seconds=0.05)
    assert report.reaped_leases == 1
    assert not await redis_client.exists(f"{bill}:lease:ghost")
    assert int(await redis_client.get(f"{bill}:spend:{org.pk}")) == 3050  # the ledger's 3,000 and the journal's 50
    assert int(await redis_client.get(f"{bill}:month:{org.pk}:{month}")) == 3050
    assert int(await redis_client.get(f"{bill}:kmonth:{key.pk}:{month}")) == 3050
    assert await redis_client.ttl(f"{bill}:kmonth:{key.pk}:{month}") > 0  # the month's expiry is kept
    assert int(await redis_client.get(f"{bill}:spend:{other_org.pk}")) == 900  # busy: left for a later run
    assert await redis_client.hmget(f"{bill}:credit:{org.pk}", "t", "v") == [
        str(credit_total).encode(), str(credit_version).encode()]
    assert {name for name, _, _ in report.corrected} == {
        f"{bill}:spend:{org.pk}", f"{bill}:kmonth:{key.pk}:{month}", f"{bill}:credit:{org.pk}"}
    assert _corrections("spend") == before + 1
    assert report.busy == 1

    # Once the call is settled (its hold gone, its cost in the counter and the ledger), the next pass finds the
    # other organization's counter right, and nothing else to do.
    await sync_to_async(usage_events_write)([_event(other_org, None, 500)])
    await redis_client.hset(f"{bill}:lease:live", f"{bill}:spend:{other_org.pk}", 0)
    again = await reconcile(redis_client, prefix=prefix, quiet_seconds=0.05)
    assert again.corrected == [] and again.busy == 0 and again.reaped_leases == 0
    journal.unlink()
    await redis_client.delete(*[name async for name in redis_client.scan_iter(f"{prefix}:*")])


async def test_a_counter_that_moves_during_the_pass_is_left_alone(
    redis_client: Any, prefix: str, org: Organization, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from billing import reconcile as module

    name = keys.spend(org.pk, prefix)
    await redis_client.set(name, 777)
    real = module._expected

    def expected_while_a_call_settles(*args: Any) -> Any:
        import redis

        redis.Redis.from_url(REDIS_URL).incrby(name, 5)  # a settlement lands between the two readings
        return real(*args)

    monkeypatch.setattr(module, "_expected", expected_while_a_call_settles)
    report = await reconcile(redis_client, prefix=prefix, quiet_seconds=0.01)
    assert report.corrected == [] and report.busy == 1
    assert int(await redis_client.get(name)) == 782
    await redis_client.delete(name)


def test_the_command_says_there_is_nothing_to_reconcile_without_redis(
    capsys: pytest.CaptureFixture[str], settings: Any
) -> None:
    settings.REDIS_URL = ""
    call_command("reconcile_counters")
    assert "nothing to reconcile" in capsys.readouterr().out
