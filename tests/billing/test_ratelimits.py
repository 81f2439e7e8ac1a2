"""Per-key RPM and TPM limits, their 429s and the x-ratelimit-* headers (in-process; see tests/e2e for the
proof across worker processes)."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from asgiref.sync import sync_to_async

from apikeys.services import apikey_create
from billing import metering, ratelimits
from completions.services import provider_upsert_openai_compatible
from platform_site.models import Organization
from tests.conftest import bearer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_rate_window")]
MESSAGES = [{"role": "user", "content": "hi"}]
HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
           "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.85, "850ms"), (0.0001, "1ms"), (1, "1s"), (9.8121, "9.813s"), (59.9, "59.9s"), (360, "6m0s"), (61, "1m1s"),
     (61.25, "1m1.25s")],
)
def test_reset_durations_are_written_like_openai_and_never_early(seconds: float, text: str) -> None:
    assert ratelimits.duration(seconds) == text


@pytest.fixture
async def limited(org: Organization, upstream: tuple[int, Any]) -> dict[str, Any]:
    port, _ = upstream

    def setup() -> dict[str, Any]:
        provider_upsert_openai_compatible(name="fake", base_url=f"http://127.0.0.1:{port}/v1",
                                          models=["ok", "http500", "drip"])
        _, rpm_key = apikey_create(organization=org, name="rpm", rpm_limit=3)
        _, tpm_key = apikey_create(organization=org, name="tpm", tpm_limit=50)
        return {"rpm": rpm_key, "tpm": tpm_key}

    return await sync_to_async(setup)()


async def test_requests_over_the_rpm_limit_get_429_with_retry_after(asgi_client, limited: dict[str, Any]) -> None:
    remaining = []
    for _ in range(3):
        response = await asgi_client.post("/v1/chat/completions", headers=bearer(limited["rpm"]),
                                          json={"model": "ok", "messages": MESSAGES})
        assert response.status_code == 200
        assert all(name in response.headers for name in HEADERS)
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [2, 1, 0]
    refused = await asgi_client.post("/v1/chat/completions", headers=bearer(limited["rpm"]),
                                     json={"model": "ok", "messages": MESSAGES})
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


async def test_tokens_over_the_tpm_limit_get_429_of_type_tokens(asgi_client, limited: dict[str, Any]) -> None:
    statuses = []
    for _ in range(5):
        response = await asgi_client.post("/v1/chat/completions", headers=bearer(limited["tpm"]),
                                          json={"model": "ok", "messages": MESSAGES, "max_tokens": 7})
        statuses.append(response.status_code)
        await metering.flush()  # the estimates are replaced by the real counts after the response
    # Each call is admitted with its estimate (prompt and max_tokens) and settles at the 16 tokens the fake
    # upstream reports: the fourth call would pass 50.
    assert statuses == [200, 200, 200, 429, 429]
    assert response.json()["error"]["type"] == "tokens"
    assert int(response.headers["x-ratelimit-remaining-tokens"]) == 50 - 48


async def test_rate_headers_are_on_error_responses_after_counting(asgi_client, limited: dict[str, Any]) -> None:
    response = await asgi_client.post("/v1/chat/completions", headers=bearer(limited["rpm"]),
                                      json={"model": "http500", "messages": MESSAGES})
    assert response.status_code == 502
    assert response.headers["x-ratelimit-remaining-requests"] == "2"


async def test_the_sdk_sees_a_rate_limit_error(sdk: openai.AsyncOpenAI, limited: dict[str, Any]) -> None:
    client = sdk.with_options(api_key=limited["rpm"], max_retries=0)
    for _ in range(3):
        await client.chat.completions.create(model="ok", messages=MESSAGES)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="ok", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.code == "rate_limit_exceeded"


async def test_concurrent_requests_reserve_their_output_limit_against_the_tpm(
    asgi_client, org: Organization, limited: dict[str, Any], fresh_rate_window: None
) -> None:
    """A key with TPM 1,000 and 20 concurrent requests of max_tokens 200 admits at most 5: each reserves
    its prompt and its output limit when admitted, not only what it used when it ends."""
    _, raw = await sync_to_async(apikey_create)(organization=org, name="tpm", actor_label="test", tpm_limit=1000)
    responses = await asyncio.gather(*(
        asgi_client.post("/v1/chat/completions", headers=bearer(raw),
                         json={"model": "drip", "messages": MESSAGES, "max_tokens": 200, "stream": True})
        for _ in range(20)
    ))
    statuses = [response.status_code for response in responses]
    assert 1 <= statuses.count(200) <= 5 and statuses.count(429) == 20 - statuses.count(200), statuses


async def test_the_tpm_hold_counts_tools_and_the_response_schema_not_only_the_messages(
    asgi_client, org: Organization, limited: dict[str, Any], fresh_rate_window: None
) -> None:
    """Tools and a response_format schema are read by the model: a request whose messages are short but whose
    tools are long is held (and refused) for what it really sends."""
    _, raw = await sync_to_async(apikey_create)(organization=org, name="tools", actor_label="test", tpm_limit=2000)
    properties = {f"field_{n}": {"type": "string", "description": "x" * 60} for n in range(200)}
    tools = [{"type": "function", "function": {"name": "fill", "parameters": {"type": "object",
                                                                                "properties": properties}}}]
    schema = {"type": "json_schema", "json_schema": {"name": "big", "schema": {"type": "object",
                                                                              "properties": properties}}}
    for extra in ({"tools": tools}, {"response_format": schema}):
        refused = await asgi_client.post("/v1/chat/completions", headers=bearer(raw),
                                         json={"model": "ok", "messages": MESSAGES, "max_tokens": 7, **extra})
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens", refused.text
    allowed = await asgi_client.post("/v1/chat/completions", headers=bearer(raw),
                                     json={"model": "ok", "messages": MESSAGES, "max_tokens": 7})
    assert allowed.status_code == 200
