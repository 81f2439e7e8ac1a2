"""A project's ceilings on the hot path: per-model RPM, TPM and requests per day shared by all of its keys, and
its monthly budget, through the real ASGI app against a real fake upstream on loopback.

On PostgreSQL + Redis (CI's second leg) the counters are the Redis Lua script shared by all workers; on the
embedded default they are its in-process twin.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from asgiref.sync import sync_to_async

from apikeys.services import apikey_create
from billing import metering
from billing.models import Price, UsageEvent
from billing.services import project_budget_set, project_rate_limit_set
from completions.services import provider_upsert_openai_compatible
from platform_site.access import system_actor
from platform_site.models import Organization, Project
from platform_site.selectors import default_project
from platform_site.services import project_create
from tests.conftest import bearer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_rate_window")]
MESSAGES = [{"role": "user", "content": "hi"}]
JSON_COST = 7 * 1000  # the fake upstream's JSON answer: 7 completion tokens at 1,000 micro-USD each


@pytest.fixture
async def projects(org: Organization, upstream: tuple[int, Any]) -> dict[str, Any]:
    """Keys a and b in the default project (main), c in a second project (side); each key's own limits far above the
    project's, so only the project's can refuse."""
    port, _ = upstream

    def setup() -> dict[str, Any]:
        provider_upsert_openai_compatible(name="fake", base_url=f"http://127.0.0.1:{port}/v1", models=["ok", "ok2"])
        Price.objects.create(model="ok", output_per_million_micros=1_000_000_000)
        actor = system_actor(org, "test")
        main = default_project(organization=org)
        side = project_create(by=actor, name="Side")
        keys = {
            name: apikey_create(organization=org, project=project, name=name, rpm_limit=1000, tpm_limit=10**6)[1]
            for name, project in (("a", main), ("b", main), ("c", side))
        }
        return {"actor": actor, "main": main, "side": side, **keys}

    return await sync_to_async(setup)()


async def _call(asgi_client: Any, raw_key: str, model: str = "ok", **body: Any) -> Any:
    return await asgi_client.post(
        "/v1/chat/completions", headers=bearer(raw_key), json={"model": model, "messages": MESSAGES, **body}
    )


async def _set_limit(projects: dict[str, Any], model: str, **changes: int | None) -> None:
    await sync_to_async(project_rate_limit_set)(
        by=projects["actor"], project=projects["main"], model=model, changes=changes
    )


async def test_a_projects_rpm_is_shared_by_its_keys_and_only_for_that_model(
    asgi_client, projects: dict[str, Any]
) -> None:
    await _set_limit(projects, "ok", max_requests_per_1_minute=3)
    statuses = [(await _call(asgi_client, projects[name])).status_code for name in ("a", "b", "a")]
    assert statuses == [200, 200, 200]
    refused = await _call(asgi_client, projects["b"])
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert f"for ok in project {projects['main'].public_id}" in error["message"]
    assert "requests per min (RPM): Limit 3" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # The tighter window is the project's: the headers say so, not the key's 1,000.
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # Another model of the same project, and the same model in another project, are not held back.
    assert (await _call(asgi_client, projects["a"], model="ok2")).status_code == 200
    assert (await _call(asgi_client, projects["c"])).status_code == 200


async def test_the_headers_show_whichever_window_is_tighter(asgi_client, projects: dict[str, Any]) -> None:
    await _set_limit(projects, "ok", max_requests_per_1_minute=5)
    first = await _call(asgi_client, projects["a"])
    assert (first.headers["x-ratelimit-limit-requests"], first.headers["x-ratelimit-remaining-requests"]) == ("5", "4")
    # Tokens: the key's 1,000,000 is tighter than the project's default.
    assert first.headers["x-ratelimit-limit-tokens"] == "1000000"


async def test_a_projects_tpm_counts_the_tokens_of_all_its_keys(asgi_client, projects: dict[str, Any]) -> None:
    await _set_limit(projects, "ok", max_tokens_per_1_minute=50)
    statuses = []
    for name in ("a", "b", "a", "b"):
        statuses.append((await _call(asgi_client, projects[name], max_tokens=7)).status_code)
        await metering.flush()  # the estimates are replaced by the real counts after the response
    # Each call is admitted with its estimate (prompt and max_tokens, about 17) and settles at the 16 tokens
    # the fake upstream reports: the fourth call would pass 50.
    assert statuses == [200, 200, 200, 429]
    refused = await _call(asgi_client, projects["a"], max_tokens=7)
    assert refused.json()["error"]["type"] == "tokens"
    assert "tokens per min (TPM): Limit 50" in refused.json()["error"]["message"]


async def test_a_daily_request_limit_is_refused_until_the_next_utc_day(
    asgi_client, projects: dict[str, Any]
) -> None:
    await _set_limit(projects, "ok", max_requests_per_1_day=2)
    assert [(await _call(asgi_client, projects[n])).status_code for n in ("a", "b")] == [200, 200]
    refused = await _call(asgi_client, projects["a"])
    assert refused.status_code == 429
    assert "requests per day (RPD): Limit 2" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 24 * 3600


async def test_a_limit_reset_to_the_default_stops_refusing(asgi_client, projects: dict[str, Any]) -> None:
    await _set_limit(projects, "ok", max_requests_per_1_minute=1)
    assert [(await _call(asgi_client, projects["a"])).status_code for _ in range(2)] == [200, 429]
    await _set_limit(projects, "ok", max_requests_per_1_minute=None)
    assert (await _call(asgi_client, projects["a"])).status_code == 200


async def test_100_concurrent_requests_from_two_keys_under_a_project_budget_for_10_let_10_through(
    asgi_client, projects: dict[str, Any], org: Organization
) -> None:
    await sync_to_async(project_budget_set)(
        by=projects["actor"], project=projects["main"], monthly_budget_micros=10 * JSON_COST
    )
    responses = await asyncio.gather(
        *(_call(asgi_client, projects["a" if i % 2 else "b"], max_tokens=7) for i in range(100))
    )
    statuses = [response.status_code for response in responses]
    assert statuses.count(200) == 10, statuses
    codes = {r.json()["error"]["code"] for r in responses if r.status_code == 429}
    assert codes == {"project_budget_exceeded"}
    # The budget is the project's: a key of another project is not held back.
    assert (await _call(asgi_client, projects["c"], max_tokens=7)).status_code == 200
    await metering.flush()

    def charged() -> dict[int | None, int]:
        rows = UsageEvent.objects.filter(organization=org).values_list("project_id", "cost_micros")
        totals: dict[int | None, int] = {}
        for project_id, cost in rows:
            totals[project_id] = totals.get(project_id, 0) + cost
        return totals

    # Every usage event names its key's project.
    assert await sync_to_async(charged)() == {projects["main"].pk: 10 * JSON_COST, projects["side"].pk: JSON_COST}


async def test_a_project_budget_is_seeded_from_this_months_ledger(asgi_client, projects: dict[str, Any]) -> None:
    for _ in range(2):
        assert (await _call(asgi_client, projects["a"], max_tokens=7)).status_code == 200
    await metering.flush()
    await sync_to_async(project_budget_set)(
        by=projects["actor"], project=projects["main"], monthly_budget_micros=5 * JSON_COST
    )
    statuses = [(await _call(asgi_client, projects["b"], max_tokens=7)).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]  # 2 already spent this month + 3 = the budget of 5


async def test_the_sdk_sees_a_project_limit_as_a_rate_limit_error(
    sdk: openai.AsyncOpenAI, projects: dict[str, Any]
) -> None:
    await _set_limit(projects, "ok", max_requests_per_1_minute=1)
    client = sdk.with_options(api_key=projects["a"], max_retries=0)
    await client.chat.completions.create(model="ok", messages=MESSAGES)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="ok", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.code == "rate_limit_exceeded"


async def test_limits_of_an_archived_project_cannot_be_changed(projects: dict[str, Any]) -> None:
    from apikeys.services import project_archive
    from platform_site.exceptions import Conflict

    side: Project = projects["side"]
    await sync_to_async(project_archive)(by=projects["actor"], project=side)
    with pytest.raises(Conflict):
        await sync_to_async(project_rate_limit_set)(
            by=projects["actor"], project=side, model="ok", changes={"max_requests_per_1_minute": 5}
        )
