"""The usage page in a real browser (Debian's Chromium through Playwright) against a real server process:
a month of usage is drawn as charts by the vendored Chart.js under the page's Content-Security-Policy, the
filters and breakdowns work, nothing sticks out of a phone's screen, and the CSV export downloads.

Screenshots are saved under test-artifacts/browser/usage/ (KEYWAY_TEST_ARTIFACTS overrides)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e import server
from tests.e2e.test_dashboard_browser import ARTIFACTS, OVERFLOWING, Shots

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

SEED = """
import random
from datetime import UTC, datetime, timedelta
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.sessions.backends.db import SessionStore
from allauth.account.models import EmailAddress
from apikeys.services import apikey_create
from billing.models import UsageEvent
from billing.services import SettledUsage, usage_events_write
from platform_site.services import organization_create

user = get_user_model().objects.create_user(username="owner", email="owner@example.com", password="x" * 20)
EmailAddress.objects.create(user=user, email=user.email, verified=True, primary=True)
org = organization_create(name="Acme Robotics", owner=user)
keys = [apikey_create(organization=org, name=name, actor_label="seed")[0]
        for name in ("web app", "batch jobs", "eval")]
chance = random.Random(7)
now = datetime.now(UTC)
events = []
for n in range(3000):
    key = chance.choice(keys)
    model = chance.choice(["gemma-3-270m", "gpt-4o-mini", "gpt-4o-mini", "all-minilm-l6-v2"])
    endpoint = UsageEvent.Endpoint.EMBEDDINGS if model == "all-minilm-l6-v2" else UsageEvent.Endpoint.CHAT
    prompt = chance.randrange(50, 3000)
    completion = 0 if endpoint == UsageEvent.Endpoint.EMBEDDINGS else chance.randrange(5, 600)
    events.append(SettledUsage(
        call_id=f"seed-{n}", request_id=f"seed-{n}", session_id="", organization_id=org.pk, api_key_id=key.pk,
        endpoint=endpoint, model=model, deployment_id=None, provider="seed", prompt_tokens=prompt, cached_tokens=0,
        completion_tokens=completion, cost_micros=prompt * 3 + completion * 12,
        status=2 if chance.random() < .02 else 1,
        usage_source=1, latency_ms=int(chance.lognormvariate(5.5, .8)), ttft_ms=None,
        created_at=(now - timedelta(days=chance.randrange(0, 28), seconds=chance.randrange(0, 86400))).timestamp(),
        project_id=key.project_id))
usage_events_write(events)
session = SessionStore()
session[SESSION_KEY] = str(user.pk)
session[BACKEND_SESSION_KEY] = "allauth.account.auth_backends.AuthenticationBackend"
session[HASH_SESSION_KEY] = user.get_session_auth_hash()
session.create()
print(session.session_key)
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    var_dir = tmp_path_factory.mktemp("keyway-usage-browser")
    env, database = server.make_environment(var_dir)
    process = None
    try:
        session = server.django_shell(env, SEED).strip().splitlines()[-1]
        process, url = server.start_keyway(env, var_dir / "server.log")
        yield {"url": url, "session": session}
    finally:
        if process is not None:
            server.stop(process)
        server.drop_database(database)


SPEND_LEGEND = "() => Chart.getChart(document.getElementById('chart-spend')).data.datasets.map(d => d.label)"
DRAWN = "() => typeof Chart !== 'undefined' && Chart.getChart(document.getElementById('%s'))"


def _charts_drawn(page: Any) -> int:
    return int(page.evaluate("() => [...document.querySelectorAll('canvas')].filter(c => Chart.getChart(c)).length"))


def test_a_month_of_usage_is_drawn_filtered_broken_down_and_exported(site: dict[str, Any], browser: Any) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.add_cookies([{"name": "sessionid", "value": site["session"], "url": site["url"]}])
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    shot = Shots(page, ARTIFACTS / "usage")

    start = page.evaluate(
        "() => { const d = new Date(); d.setUTCDate(d.getUTCDate() - 29); return d.toISOString().slice(0, 10); }"
    )
    page.goto(f"{site['url']}/usage?start={start}")
    page.wait_for_function("() => typeof Chart !== 'undefined'")
    assert _charts_drawn(page) == 5
    assert page.get_by_role("link", name="Usage").get_attribute("aria-current") == "page"
    assert page.locator(".stat dd").first.inner_text().startswith("$")
    legend = page.evaluate(SPEND_LEGEND)
    assert set(legend) == {"gemma-3-270m", "gpt-4o-mini", "all-minilm-l6-v2"}
    shot("by-model")

    page.select_option("#id_breakdown", "key")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_function(DRAWN % "chart-spend")
    legend = page.evaluate(SPEND_LEGEND)
    assert set(legend) == {"web app", "batch jobs", "eval"}
    shot("by-key")

    page.select_option("#id_model", "all-minilm-l6-v2")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_function(DRAWN % "chart-tokens")
    outputs = page.evaluate("() => Chart.getChart(document.getElementById('chart-tokens')).data.datasets[1].data")
    assert sum(outputs) == 0  # embeddings produce no output tokens
    shot("embeddings-only")

    with page.expect_download() as download:
        page.get_by_role("link", name="Export CSV (per day)").click()
    rows = list(csv.DictReader(io.StringIO(open(download.value.path(), encoding="utf-8").read())))
    assert rows and {row["model"] for row in rows} == {"all-minilm-l6-v2"}

    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{site['url']}/usage")
    page.wait_for_function("() => typeof Chart !== 'undefined'")
    assert page.evaluate(OVERFLOWING) == []
    shot("phone")
    assert problems == []
    context.close()
