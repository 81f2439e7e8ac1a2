"""Metering through the real ASGI app against a real fake upstream on loopback: reservations under
concurrency (proofs a and b), settlement of broken streams (proof e), the 429s of quota and caps, and that
the ledger, the account totals and the shared counters agree to the micro-USD.

On PostgreSQL + Redis (CI's second leg) the counters are the Redis Lua scripts shared by all workers; on
the embedded default they are the in-process twins.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any
from unittest.mock import patch

import pytest
from asgiref.sync import sync_to_async
from django.db.models import Sum

from apikeys.services import apikey_create
from billing import counters, keys, metering
from billing.models import BillingAccount, Plan, Price, UsageEvent
from billing.pricing import forget_cached_terms
from billing.services import billing_plan_set, credit_add
from completions.services import provider_upsert_openai_compatible
from platform_site.kernel import breaker
from platform_site.models import Organization
from tests.conftest import USES_REDIS, bearer

pytestmark = pytest.mark.django_db(transaction=True)
MESSAGES = [{"role": "user", "content": "hi"}]
# 1,000 USD per million output tokens: 1,000 micro-USD a token. Input is free, so a request's worst case
# (max_tokens out) equals its real cost whenever the upstream produces exactly max_tokens.
OUTPUT_PRICE = 1_000_000_000
JSON_COST = 7 * 1000  # the fake upstream's JSON answer: 7 completion tokens
STREAM_COST = 20 * 1000  # its streams: 20 chunks, usage reports 20 completion tokens


@pytest.fixture
async def fake(org: Organization, upstream: tuple[int, Any]) -> Organization:
    port, _ = upstream

    def setup() -> None:
        provider_upsert_openai_compatible(
            name="fake", base_url=f"http://127.0.0.1:{port}/v1", models=["ok", "stream-break", "http500"]
        )
        for model in ("ok", "stream-break", "http500"):
            Price.objects.create(model=model, output_per_million_micros=OUTPUT_PRICE)

    await sync_to_async(setup)()
    return org


def _prepaid(org: Organization, *, credit: int) -> None:
    plan = Plan.objects.create(name="prepaid", billing_mode=Plan.Mode.PREPAID)
    billing_plan_set(organization=org, plan=plan, actor_label="test")
    if credit:
        credit_add(organization=org, amount_micros=credit, reason="test top-up", actor_label="test")


def _ledger(org: Organization) -> dict[str, Any]:
    account = BillingAccount.objects.get(pk=org.pk)
    events = UsageEvent.objects.filter(organization=org)
    return {
        "events": events.count(),
        "cost": events.aggregate(total=Sum("cost_micros"))["total"] or 0,
        "usage_total": account.usage_total_micros,
        "balance": account.balance_micros,
        "statuses": sorted(events.values_list("status", flat=True)),
    }


async def _ledger_of(org: Organization) -> dict[str, Any]:
    await metering.flush()
    return await sync_to_async(_ledger)(org)


async def _spend_counter(org: Organization) -> int | None:
    await metering.flush()
    return await counters.store().read(
        counters.names(organization_id=org.pk, key_public_id="-", key_id=0, project_id=None, model="-", now=0)[2]
    )


async def _burst(asgi_client, raw_key: str, count: int, **body: Any) -> list[Any]:
    payload = {"model": "ok", "messages": MESSAGES, **body}
    return await asyncio.gather(
        *(asgi_client.post("/v1/chat/completions", headers=bearer(raw_key), json=payload) for _ in range(count))
    )


async def test_100_concurrent_requests_against_a_balance_for_10_let_exactly_10_through(
    asgi_client, fake: Organization, api_key: tuple[Any, str]
) -> None:
    await sync_to_async(_prepaid)(fake, credit=10 * JSON_COST)
    responses = await _burst(asgi_client, api_key[1], 100, max_tokens=7)
    statuses = [response.status_code for response in responses]
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 90
    refused = next(response for response in responses if response.status_code == 429)
    assert refused.json()["error"] == {
        "message": refused.json()["error"]["message"], "type": "insufficient_quota", "param": None,
        "code": "insufficient_quota",
    }
    assert "x-ratelimit-remaining-requests" in refused.headers and "x-request-id" in refused.headers
    assert await _spend_counter(fake) == 10 * JSON_COST  # every hold released or charged: none left open
    ledger = await _ledger_of(fake)
    # The balance moved by exactly the sum of the ledger's costs, to the micro-USD.
    assert ledger["events"] == 10 and ledger["cost"] == 10 * JSON_COST == ledger["usage_total"]
    assert ledger["balance"] == 0


async def test_streams_are_reserved_and_charged_like_json(
    asgi_client, fake: Organization, api_key: tuple[Any, str]
) -> None:
    await sync_to_async(_prepaid)(fake, credit=3 * STREAM_COST + STREAM_COST // 2)
    responses = await _burst(asgi_client, api_key[1], 12, max_tokens=20, stream=True)
    assert [r.status_code for r in responses].count(200) == 3
    assert all(r.text.endswith("data: [DONE]\n\n") for r in responses if r.status_code == 200)
    assert await _spend_counter(fake) == 3 * STREAM_COST
    ledger = await _ledger_of(fake)
    assert ledger["cost"] == ledger["usage_total"] == 3 * STREAM_COST
    assert ledger["balance"] == STREAM_COST // 2


async def test_a_keys_monthly_cap_holds_under_100_concurrent_requests(
    asgi_client, fake: Organization
) -> None:
    _, raw_key = await sync_to_async(apikey_create)(
        organization=fake, name="capped", monthly_budget_micros=10 * JSON_COST
    )
    _, other_key = await sync_to_async(apikey_create)(organization=fake, name="uncapped")
    responses = await _burst(asgi_client, raw_key, 100, max_tokens=7)
    statuses = [response.status_code for response in responses]
    assert statuses.count(200) == 10, statuses
    codes = {response.json()["error"]["code"] for response in responses if response.status_code == 429}
    assert codes == {"key_budget_exceeded"}
    # The cap is the key's: another key of the organization is not held back.
    assert (await _burst(asgi_client, other_key, 1, max_tokens=7))[0].status_code == 200
    ledger = await _ledger_of(fake)
    assert ledger["cost"] == ledger["usage_total"] == 11 * JSON_COST


async def test_an_organizations_monthly_cap_is_seeded_from_this_months_ledger(
    asgi_client, fake: Organization, api_key: tuple[Any, str]
) -> None:
    for _ in range(2):
        assert (await _burst(asgi_client, api_key[1], 1, max_tokens=7))[0].status_code == 200
    await metering.flush()

    def cap() -> None:
        account = BillingAccount.objects.get(pk=fake.pk)
        account.monthly_budget_micros = 5 * JSON_COST
        account.save()

    await sync_to_async(cap)()
    forget_cached_terms(fake.pk)
    statuses = [r.status_code for r in await _burst(asgi_client, api_key[1], 10, max_tokens=7)]
    assert statuses.count(200) == 3  # 2 already spent this month + 3 = the cap of 5
    refused = [r for r in await _burst(asgi_client, api_key[1], 1, max_tokens=7)][0]
    assert refused.json()["error"]["code"] == "organization_budget_exceeded"


async def test_a_worst_case_that_does_not_fit_is_refused_even_if_the_real_cost_would(
    asgi_client, fake: Organization, api_key: tuple[Any, str]
) -> None:
    await sync_to_async(_prepaid)(fake, credit=JSON_COST)
    refused = (await _burst(asgi_client, api_key[1], 1, max_tokens=8))[0]
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert (await _burst(asgi_client, api_key[1], 1, max_tokens=7))[0].status_code == 200


async def test_an_upstream_that_breaks_mid_stream_is_charged_for_what_it_produced_and_holds_nothing(
    asgi_client, fake: Organization, api_key: tuple[Any, str]
) -> None:
    await sync_to_async(_prepaid)(fake, credit=10 * STREAM_COST)
    response = (await _burst(asgi_client, api_key[1], 1, model="stream-break", max_tokens=20, stream=True))[0]
    assert response.status_code == 200 and '"error"' in response.text
    ledger = await _ledger_of(fake)
    assert ledger["statuses"] == [UsageEvent.Status.INCOMPLETE]
    event = await sync_to_async(UsageEvent.objects.get)(organization=fake)
    # Two chunks of text came through; no usage was reported, so they were estimated (no tokenizer set).
    assert event.usage_source == UsageEvent.UsageSource.ESTIMATED
    assert 0 < event.completion_tokens < 20 and event.cost_micros == event.completion_tokens * 1000
    # No reservation is left open: the shared counter is exactly what the ledger charged.
    assert await _spend_counter(fake) == ledger["cost"] == ledger["usage_total"]


async def test_a_failed_call_releases_its_whole_hold_and_is_recorded_at_zero(
    asgi_client, fake: Organization, api_key: tuple[Any, str]
) -> None:
    await sync_to_async(_prepaid)(fake, credit=JSON_COST)
    failed = (await _burst(asgi_client, api_key[1], 1, model="http500", max_tokens=7))[0]
    assert failed.status_code == 502
    assert await _spend_counter(fake) == 0
    ok = (await _burst(asgi_client, api_key[1], 1, max_tokens=7))[0]
    assert ok.status_code == 200
    ledger = await _ledger_of(fake)
    assert ledger["statuses"] == [UsageEvent.Status.OK, UsageEvent.Status.ERROR]
    assert ledger["cost"] == JSON_COST


async def test_a_top_up_lets_a_refused_organization_through_at_once(
    asgi_client, fake: Organization, api_key: tuple[Any, str]
) -> None:
    await sync_to_async(_prepaid)(fake, credit=0)
    assert (await _burst(asgi_client, api_key[1], 1, max_tokens=7))[0].status_code == 429
    await sync_to_async(credit_add)(organization=fake, amount_micros=JSON_COST, reason="more", actor_label="t")
    assert (await _burst(asgi_client, api_key[1], 1, max_tokens=7))[0].status_code == 200


async def test_a_plan_multiplier_scales_the_charge(
    asgi_client, fake: Organization, api_key: tuple[Any, str]
) -> None:
    def plan() -> None:
        billing_plan_set(
            organization=fake,
            plan=Plan.objects.create(name="markup", billing_mode=Plan.Mode.POSTPAID, price_multiplier=Decimal("1.5")),
        )

    await sync_to_async(plan)()
    assert (await _burst(asgi_client, api_key[1], 1, max_tokens=7))[0].status_code == 200
    await metering.flush()
    event = await sync_to_async(UsageEvent.objects.get)(organization=fake)
    assert event.cost_micros == JSON_COST * 3 // 2
    assert (event.prompt_tokens, event.completion_tokens) == (9, 7)
    assert event.usage_source == UsageEvent.UsageSource.REPORTED and event.model == "ok"
    assert event.provider == "fake" and event.deployment_id is not None and event.latency_ms >= 0


async def test_embeddings_are_metered_with_reported_usage(
    asgi_client, fake: Organization, api_key: tuple[Any, str], upstream: tuple[int, Any]
) -> None:
    def setup() -> None:
        provider_upsert_openai_compatible(
            name="fake-emb", base_url=f"http://127.0.0.1:{upstream[0]}/v1", models=["emb"],
            capabilities=["embeddings"],
        )
        Price.objects.create(model="emb", input_per_million_micros=OUTPUT_PRICE)

    await sync_to_async(setup)()
    response = await asgi_client.post(
        "/v1/embeddings", headers=bearer(api_key[1]), json={"model": "emb", "input": ["a", "b"]}
    )
    assert response.status_code == 200
    await metering.flush()
    event = await sync_to_async(UsageEvent.objects.get)(organization=fake)
    assert event.endpoint == UsageEvent.Endpoint.EMBEDDINGS
    assert (event.prompt_tokens, event.completion_tokens, event.cost_micros) == (6, 0, 6000)


async def _dead_worker_admits(raw_key: str) -> tuple[counters._RedisCounters, metering.Meter]:
    """Another worker process takes a hold and then dies: its heartbeat is gone, the hold is not settled."""
    from apikeys.auth import authenticate_key

    key = await authenticate_key(raw_key)
    dead = counters._RedisCounters()
    with patch.object(counters, "store", return_value=dead):
        meter = await metering.admit(key=key, call_id="call-dead", request_id="req_dead", endpoint=1,
                                     models=["ok"], prompt_tokens=1, max_output_tokens=7)
    # It dies: its heartbeat stops, and its last heartbeat expires.
    assert dead.heartbeats is not None
    dead.heartbeats.cancel()
    await dead.client.delete(keys.alive(keys.shard_of(meter.key.organization_id), dead.worker))
    return dead, meter


@pytest.mark.skipif(not USES_REDIS, reason="leases exist only in the counters shared through Redis")
async def test_a_dead_workers_holds_are_given_back_by_a_live_workers_heartbeat(
    asgi_client, fake: Organization, api_key: tuple[Any, str]
) -> None:
    await sync_to_async(_prepaid)(fake, credit=JSON_COST)
    live = counters.store()
    await live.heartbeat()
    dead, _ = await _dead_worker_admits(api_key[1])
    assert (await _burst(asgi_client, api_key[1], 1, max_tokens=7))[0].status_code == 429  # held by the dead
    await live.heartbeat()
    assert (await _burst(asgi_client, api_key[1], 1, max_tokens=7))[0].status_code == 200
    assert await _spend_counter(fake) == JSON_COST
    assert not await dead.client.exists(dead.lease(keys.shard_of(fake.pk)))
    await dead.client.aclose()
    await dead.scripts.aclose()


@pytest.mark.skipif(not USES_REDIS, reason="leases exist only in the counters shared through Redis")
async def test_a_worker_reaped_while_still_running_settles_at_full_cost_without_releasing_twice(
    fake: Organization, api_key: tuple[Any, str]
) -> None:
    await sync_to_async(_prepaid)(fake, credit=10 * JSON_COST)
    dead, meter = await _dead_worker_admits(api_key[1])
    await counters.store().heartbeat()  # reaps the stalled worker: its hold goes back
    assert await _spend_counter(fake) == 0
    # The stalled worker wakes up and settles the request it was serving (2 tokens of the 7 reserved).
    meter.settle(model="ok", status=1, usage_source=1, prompt_tokens=9, completion_tokens=2)
    assert await _spend_counter(fake) == 2 * 1000
    # It continues under a new lease.
    assert (await dead.heartbeat()) is None and dead.lease(keys.shard_of(fake.pk)) != meter.lease
    await dead.close()


@pytest.mark.skipif(not USES_REDIS, reason="an ambiguous answer exists only with the counters in Redis")
async def test_a_settlement_sent_again_after_an_ambiguous_redis_error_is_applied_once(
    fake: Organization, api_key: tuple[Any, str]
) -> None:
    """Redis ran the settlement, then the answer was lost (a timeout): the batch is sent again on the next
    flush, and its id makes the second sending a no-op."""
    import redis.exceptions

    from apikeys.auth import authenticate_key

    await sync_to_async(_prepaid)(fake, credit=10 * JSON_COST)
    key = await authenticate_key(api_key[1])
    meter = await metering.admit(key=key, call_id="call-ambiguous", request_id="req_ambiguous", endpoint=1,
                                 models=["ok"], prompt_tokens=1, max_output_tokens=7)
    store = counters.store()
    real = store.settle_script

    async def ran_then_timed_out(**kwargs: Any) -> Any:
        await real(**kwargs)
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    with patch.object(store, "settle_script", ran_then_timed_out):
        meter.settle(model="ok", status=1, usage_source=1, prompt_tokens=9, completion_tokens=2)
        with pytest.raises(breaker.Unavailable):
            await counters.flush()
    breaker.redis.reset()  # the breaker's pause is over
    await counters.flush()  # the same batch again
    assert await _spend_counter(fake) == 2 * 1000
    await counters.flush()
    assert await _spend_counter(fake) == 2 * 1000


async def test_a_prepaid_balance_does_not_go_below_zero_when_the_prompt_costs_more_than_its_estimate(
    asgi_client, org: Organization, upstream: tuple[int, Any], api_key: tuple[Any, str]
) -> None:
    """The upstream counts a token per character of CJK text: ~1.3 times what the byte estimate expects. Held
    at the estimate, six of twenty concurrent calls fitted a balance that paid for four, and the balance
    ended 242,000 micro-USD below zero. Credit is held for the worst case the bytes allow, so the documented
    bound holds: the balance never goes below zero by what an estimate missed (README, Metering)."""
    port, _ = upstream

    def setup() -> None:
        provider_upsert_openai_compatible(name="fake", base_url=f"http://127.0.0.1:{port}/v1", models=["chars"])
        Price.objects.create(model="chars", input_per_million_micros=OUTPUT_PRICE,
                             output_per_million_micros=OUTPUT_PRICE)
        _prepaid(org, credit=1_000_000)

    await sync_to_async(setup)()
    prompt = [{"role": "user", "content": "語" * 200}]
    responses = await _burst(asgi_client, api_key[1], 20, model="chars", messages=prompt, max_tokens=7)
    statuses = [response.status_code for response in responses]
    assert statuses.count(200) >= 1 and statuses.count(200) + statuses.count(429) == 20
    charged = next(r for r in responses if r.status_code == 200).json()["usage"]
    assert charged["prompt_tokens"] == 200  # more than the ~151 the bytes estimate
    ledger = await _ledger_of(org)
    assert ledger["cost"] == statuses.count(200) * 207 * 1000
    assert ledger["balance"] >= 0, ledger


class _Unreachable:
    """A shared-counters store whose Redis does not answer (what the breaker raises)."""

    lease = ""

    async def admit(self, ask: counters.Ask) -> counters.Counted:
        raise breaker.Unavailable

    async def settle(self, *args: Any) -> None:
        raise breaker.Unavailable


@pytest.mark.parametrize("policy", ["closed", "open"])
async def test_without_redis_prepaid_credit_fails_closed_and_rate_limits_follow_the_setting(
    asgi_client, fake: Organization, other_org: Organization, api_key: tuple[Any, str], settings: Any, policy: str
) -> None:
    settings.KEYWAY_RATE_LIMITS_WITHOUT_REDIS = policy
    settings.KEYWAY_REDIS_RETRY_AFTER = 2.5
    await sync_to_async(_prepaid)(fake, credit=10 * JSON_COST)
    _, postpaid_key = await sync_to_async(apikey_create)(organization=other_org, name="postpaid", actor_label="t")
    with patch.object(counters, "store", return_value=_Unreachable()):
        prepaid = (await _burst(asgi_client, api_key[1], 1))[0]
        postpaid = (await _burst(asgi_client, postpaid_key, 1))[0]
    # Nobody overspends during an outage: prepaid credit (and any spend cap) is never admitted uncounted.
    assert prepaid.status_code == 503 and prepaid.headers["retry-after"] == "3"
    assert prepaid.json()["error"]["code"] == "billing_unavailable"
    assert prepaid.json()["error"]["type"] == "server_error"
    if policy == "closed":
        assert postpaid.status_code == 503
        assert postpaid.json()["error"]["code"] == "rate_limits_unavailable"
        assert await sync_to_async(UsageEvent.objects.filter(organization=other_org).count)() == 0
    else:
        # Served unlimited, and still metered: the ledger has it, whatever the counters missed.
        assert postpaid.status_code == 200, postpaid.text
        assert "x-ratelimit-limit-requests" not in postpaid.headers
        assert (await _ledger_of(other_org))["cost"] == JSON_COST
    assert (await _ledger_of(fake))["events"] == 0


@pytest.mark.skipif(not USES_REDIS, reason="an ambiguous answer exists only with the counters in Redis")
async def test_an_admission_that_ran_but_whose_answer_was_lost_leaves_no_hold(
    asgi_client, fake: Organization, api_key: tuple[Any, str]
) -> None:
    """Redis reserved the hold, then the answer was lost (a timeout): the request is refused, and the worker
    gives up that lease before its next admission, so the hold nobody will settle is given back."""
    import redis.exceptions

    await sync_to_async(_prepaid)(fake, credit=10 * JSON_COST)
    first = (await _burst(asgi_client, api_key[1], 1, max_tokens=7))[0]
    assert first.status_code == 200, first.text
    await counters.flush()  # the slice the first took goes back: the next admission goes to Redis
    store = counters.store()
    real, lease = store.admit_script, store.lease(keys.shard_of(fake.pk))

    async def ran_then_timed_out(**kwargs: Any) -> Any:
        await real(**kwargs)
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    with patch.object(store, "admit_script", ran_then_timed_out):
        refused = (await _burst(asgi_client, api_key[1], 1, max_tokens=7))[0]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "billing_unavailable"
    breaker.redis.reset()  # the breaker's pause is over
    assert await _spend_counter(fake) > JSON_COST  # the lost admission's hold, for now
    again = (await _burst(asgi_client, api_key[1], 1, max_tokens=7))[0]
    assert again.status_code == 200, (again.text, await _spend_counter(fake), store.retiring, lease)
    assert store.lease(keys.shard_of(fake.pk)) != lease and not await store.client.exists(lease)
    assert await _spend_counter(fake) == 2 * JSON_COST == (await _ledger_of(fake))["cost"]
