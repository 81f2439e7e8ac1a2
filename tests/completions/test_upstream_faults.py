"""What a client sees, and what it is charged, when an upstream fails, each fault made by a real HTTP server on
loopback (bench/fake_upstream.py) or by a port nobody listens on. The table in the README (Upstream faults)
is this file's: every row a status or SSE error event, a ledger status, what was charged, and no hold left
behind (the shared spend counter equals what the ledger charged, to the micro-USD)."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.db.models import Sum

from billing import counters, metering
from billing.models import Plan, Price, UsageEvent
from billing.services import billing_plan_set, credit_add
from completions.models import Provider
from completions.services import provider_upsert_openai_compatible
from platform_site.models import Organization
from tests.conftest import bearer
from tests.e2e.server import free_port

pytestmark = pytest.mark.django_db(transaction=True)

FAULTS = ["slow", "badjson", "http429", "http500", "stream-break", "stream-garbage", "stream-stall", "stream-huge",
          "trickle", "stream-framing", "stream-burst", "burst-garbage"]
OUTPUT_PRICE = 1_000_000_000  # 1,000 micro-USD an output token
INPUT_PRICE = 1_000_000  # 1 micro-USD an input token: a charged prompt shows in the cost


@pytest.fixture
async def faulty(org: Organization, upstream: tuple[int, Any]) -> Organization:
    port, _ = upstream

    def setup() -> None:
        provider_upsert_openai_compatible(name="fake", base_url=f"http://127.0.0.1:{port}/v1", models=FAULTS)
        # Nothing listens on this port: connections are refused.
        provider_upsert_openai_compatible(name="closed", base_url=f"http://127.0.0.1:{free_port()}/v1",
                                          models=["refused"])
        Provider.objects.update(timeout_seconds=1.0)
        for model in [*FAULTS, "refused"]:
            Price.objects.create(model=model, input_per_million_micros=INPUT_PRICE,
                                 output_per_million_micros=OUTPUT_PRICE)
        billing_plan_set(organization=org, plan=Plan.objects.create(name="prepaid", billing_mode="prepaid"),
                         actor_label="test")
        credit_add(organization=org, amount_micros=10**9, reason="test", actor_label="test")

    await sync_to_async(setup)()
    return org


async def _charged(org: Organization) -> tuple[UsageEvent, int]:
    """(the one usage event, the shared spend counter)."""
    await metering.flush()
    event = await sync_to_async(UsageEvent.objects.get)(organization=org)
    total = await sync_to_async(lambda: UsageEvent.objects.aggregate(total=Sum("cost_micros"))["total"])()
    spent = await counters.store().read(
        counters.names(organization_id=org.pk, key_public_id="-", key_id=0, project_id=None, model="-", now=0)[2]
    )
    assert event.cost_micros == total
    return event, spent or 0


def _events(text: str) -> list[Any]:
    return [orjson.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in text.splitlines() if line.startswith("data: ")]


# model, stream: status, error code (None: the answer is whole), ledger status, whether output is charged
CASES = [
    ("refused", False, 502, "upstream_error", UsageEvent.Status.ERROR, False),
    ("refused", True, 502, "upstream_error", UsageEvent.Status.ERROR, False),
    ("slow", False, 504, "upstream_timeout", UsageEvent.Status.ERROR, False),
    ("slow", True, 504, "upstream_timeout", UsageEvent.Status.ERROR, False),
    ("badjson", False, 502, "upstream_error", UsageEvent.Status.ERROR, False),
    ("http429", False, 429, "fake_429", UsageEvent.Status.ERROR, False),
    ("http429", True, 429, "fake_429", UsageEvent.Status.ERROR, False),
    ("http500", False, 502, "upstream_error", UsageEvent.Status.ERROR, False),
    ("http500", True, 502, "upstream_error", UsageEvent.Status.ERROR, False),
    ("stream-break", True, 200, "upstream_error", UsageEvent.Status.INCOMPLETE, True),
    ("stream-garbage", True, 200, "upstream_error", UsageEvent.Status.INCOMPLETE, True),
    ("stream-stall", True, 200, "upstream_timeout", UsageEvent.Status.INCOMPLETE, True),
    ("stream-huge", True, 200, "upstream_error", UsageEvent.Status.INCOMPLETE, True),
    ("stream-framing", True, 200, None, UsageEvent.Status.OK, True),
    ("stream-burst", True, 200, None, UsageEvent.Status.OK, True),
    ("burst-garbage", True, 200, "upstream_error", UsageEvent.Status.INCOMPLETE, True),
    ("trickle", False, 200, None, UsageEvent.Status.OK, True),
    ("trickle", True, 200, None, UsageEvent.Status.OK, True),
]


@pytest.mark.parametrize(("model", "stream", "status", "code", "ledger_status", "output_charged"), CASES)
async def test_each_upstream_fault_gets_its_documented_answer_charges_what_was_made_and_holds_nothing(
    asgi_client: Any, faulty: Organization, api_key: tuple[Any, str], model: str, stream: bool, status: int,
    code: str | None, ledger_status: int, output_charged: bool,
) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": stream}
    started = time.monotonic()
    answer = await asgi_client.post("/v1/chat/completions", json=body, headers=bearer(api_key[1]))
    # Nothing hangs past the deployment's timeout (1 s) by much.
    assert time.monotonic() - started < 5
    assert answer.status_code == status, answer.text
    if status != 200:
        assert answer.json()["error"]["code"] == code
    elif stream:
        events = _events(answer.text)
        assert events[-1] == "[DONE]"
        errors = [event for event in events[:-1] if "error" in event]
        assert [error["error"]["code"] for error in errors] == ([code] if code else [])
        if code is None:  # whole, however the upstream cut and framed its bytes
            text = "".join(event["choices"][0]["delta"].get("content") or "" for event in events[:-1]
                           if event.get("choices"))
            assert text == "".join(f"t{index} " for index in range(20))
    else:
        assert answer.json()["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    if model == "http429":
        assert answer.headers["retry-after"] == "7"  # the upstream's, passed on

    event, spent = await _charged(faulty)
    assert event.status == ledger_status
    assert (event.completion_tokens > 0) == output_charged
    # A prompt the upstream was reading (it timed out, or produced something) is charged; a refusal is not.
    assert (event.prompt_tokens > 0) == (output_charged or model == "slow")
    # No hold is left open: the shared counter moved by exactly what the ledger charged.
    assert spent == event.cost_micros


async def test_a_request_the_server_stops_before_answering_gets_a_503_to_retry_and_is_settled(
    faulty: Organization, api_key: tuple[Any, str]
) -> None:
    """A graceful shutdown's deadline cancels the requests still running (tests/e2e/test_drain.py shows the
    streams); one that had not answered yet is told to retry, not cut off."""
    import asyncio

    from bench.hotpath_bench import asgi_call
    from platform_site.asgi import application

    sent: list[dict[str, Any]] = []
    body = orjson.dumps({"model": "slow", "messages": [{"role": "user", "content": "hi"}]})
    task = asyncio.get_running_loop().create_task(asgi_call(application, api_key[1], body, messages=sent))
    await asyncio.sleep(0.3)
    task.cancel()  # as uvicorn does when its graceful-shutdown deadline passes
    await task
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 503
    assert (b"retry-after", b"1") in [(name.lower(), value) for name, value in sent[0]["headers"]]
    assert orjson.loads(sent[1]["body"])["error"]["code"] == "server_shutting_down"
    # The cancelled call settles as its task unwinds, a moment after the answer went out.
    for _ in range(50):
        await metering.flush()
        if await sync_to_async(UsageEvent.objects.exists)():
            break
        await asyncio.sleep(0.02)
    event, spent = await _charged(faulty)
    assert event.status == UsageEvent.Status.CLIENT_DISCONNECTED and spent == event.cost_micros


async def test_events_that_arrive_together_leave_together_and_a_failure_among_them_loses_none(
    faulty: Organization, api_key: tuple[Any, str]
) -> None:
    """A fast upstream's events reach the gateway in one read; they are relayed in one write, not one each. Those
    read together with a broken event still reach the client, before the error event, and are charged."""
    from bench.hotpath_bench import asgi_call
    from platform_site.asgi import application

    def request(model: str) -> bytes:
        return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
                             "stream": True, "stream_options": {"include_usage": True}})

    sent: list[dict[str, Any]] = []
    assert await asgi_call(application, api_key[1], request("stream-burst"), messages=sent) == 200
    parts = [message["body"] for message in sent if message["type"] == "http.response.body" and message.get("body")]
    events = _events(b"".join(parts).decode())
    assert len(events) == 24  # the role, 20 chunks, the finish, usage, [DONE]
    assert "".join(event["choices"][0]["delta"].get("content") or "" for event in events[:22]) == "".join(
        f"t{index} " for index in range(20))
    assert events[-2]["usage"]["completion_tokens"] == 20 and events[-1] == "[DONE]"
    # One read: the 22 chunks in one write; the usage and [DONE], which follow the settlement, in another.
    assert len(parts) == 2, [part[:40] for part in parts]

    # A Responses stream the same way: its opening events, the output's (one write), the closing and the end.
    sent.clear()
    body = orjson.dumps({"model": "stream-burst", "input": "hi", "stream": True, "store": False})
    assert await asgi_call(application, api_key[1], body, path="/v1/responses", messages=sent) == 200
    parts = [message["body"] for message in sent if message["type"] == "http.response.body" and message.get("body")]
    names = [line[7:] for line in b"".join(parts).decode().splitlines() if line.startswith("event: ")]
    assert names.count("response.output_text.delta") == 20 and names[-1] == "response.completed"
    assert len(parts) == 4, [part[:60] for part in parts]

    sent.clear()
    assert await asgi_call(application, api_key[1], request("burst-garbage"), messages=sent) == 200
    parts = [message["body"] for message in sent if message["type"] == "http.response.body" and message.get("body")]
    events = _events(b"".join(parts).decode())
    assert [event["choices"][0]["delta"].get("content") for event in events[:3]] == ["", "t0 ", "t1 "]
    assert events[3]["error"]["code"] == "upstream_error" and events[4] == "[DONE]" and len(events) == 5
    await metering.flush()
    status, output = await sync_to_async(lambda: UsageEvent.objects.order_by("created_at").values_list(
        "status", "completion_tokens").last())()
    assert status == UsageEvent.Status.INCOMPLETE and output > 0
