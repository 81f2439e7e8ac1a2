"""GET /metrics: what a call adds to the Prometheus metrics, and who may read them. Across worker processes:
tests/e2e/test_operability.py."""

from __future__ import annotations

import re
from typing import Any

import httpx2 as httpx
import openai
import pytest
from asgiref.sync import sync_to_async

from completions.services import provider_upsert_openai_compatible

pytestmark = pytest.mark.django_db(transaction=True)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus' text format (0 when it is not there yet)."""
    wanted = ",".join(f'{label}="{value}"' for label, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


async def scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics", headers={"Authorization": "Bearer scrape-token"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_calls_are_counted_with_their_tokens_and_only_the_token_holder_reads_them(
    sdk: openai.AsyncOpenAI, asgi_client: httpx.AsyncClient, upstream: tuple[int, Any], settings: Any
) -> None:
    settings.KEYWAY_METRICS_TOKEN = "scrape-token"
    port, _ = upstream
    await sync_to_async(provider_upsert_openai_compatible)(
        name="fake", base_url=f"http://127.0.0.1:{port}/v1", models=["ok", "http500"]
    )
    before = await scrape(asgi_client)
    for _ in range(3):
        await sdk.chat.completions.create(model="ok", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.APIStatusError):
        await sdk.chat.completions.create(model="http500", messages=[{"role": "user", "content": "hi"}])
    after = await scrape(asgi_client)

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("keyway_requests_total", endpoint="chat_completions", status="200") == 3
    assert grew("keyway_requests_total", endpoint="chat_completions", status="502") == 1
    assert grew("keyway_request_duration_seconds_count", endpoint="chat_completions") == 4
    assert grew("keyway_tokens_total", model="ok", kind="prompt") == 3 * 9
    assert grew("keyway_tokens_total", model="ok", kind="completion") == 3 * 7
    assert grew("keyway_calls_total", model="ok", outcome="ok") == 3
    assert grew("keyway_upstream_errors_total", provider="fake", kind="unavailable") == 1
    # Labels name endpoints, models and providers: never a key.
    assert "sk-kw-" not in after

    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = await asgi_client.get("/metrics", headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    settings.KEYWAY_METRICS_TOKEN = ""
    assert (await asgi_client.get("/metrics", headers={"Authorization": "Bearer "})).status_code == 401


async def test_metrics_answer_bad_requests_with_error_objects(asgi_client: httpx.AsyncClient, settings: Any) -> None:
    settings.KEYWAY_METRICS_TOKEN = "scrape-token"
    for method in ("POST", "PUT", "DELETE"):
        response = await asgi_client.request(method, "/metrics", headers={"Authorization": "Bearer scrape-token"})
        assert response.status_code == 405, (method, response.status_code)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    for header in (b"Bearer " + b"x" * 100_000, b"Bearer scrape-token-and-more", b"scrape-token", b"Bearer",
                   "Bearer scène".encode()):
        response = await asgi_client.get("/metrics", headers={"Authorization": header})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", header[:40]
