"""The agents pages in a real browser (Debian's Chromium driven by Playwright) against a real server process:
sign in → add an HTTP connector (its signing secret shown once) → create an agent that uses it → create a
callback hook (its secret shown once, with its URL) → POST a request signed with that secret to the hook →
the delivery is on the hook's page. The pages at a phone's width do not scroll sideways.

Every page visited is saved as a screenshot under test-artifacts/browser/agents/, and the key pages also as
/tmp/agents-*.png for a person to look at.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

from tests.e2e import server
from tests.e2e.test_dashboard_browser import ARTIFACTS, OVERFLOWING, Shots

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

EMAIL = "ada@example.com"
PASSWORD = "correct-horse-battery-staple-42"
SETUP = f"""
from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model
from completions.services import catalog_ensure_default
from platform_site.services import organization_create

catalog_ensure_default()
user = get_user_model().objects.create_user(username="ada", email="{EMAIL}", password="{PASSWORD}")
EmailAddress.objects.create(user=user, email=user.email, verified=True, primary=True)
organization_create(name="Lovelace Analytical Engines", owner=user)
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    var_dir = tmp_path_factory.mktemp("keyway-agents-browser")
    env, database = server.make_environment(var_dir)
    process = None
    try:
        server.django_shell(env, SETUP)
        process, url = server.start_keyway(env, var_dir / "server.log")
        yield {"url": url}
    finally:
        if process is not None:
            server.stop(process)
        server.drop_database(database)


def _sign_in(page: Any, url: str) -> None:
    page.goto(url + "/accounts/login/")
    page.get_by_label("Email").fill(EMAIL)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign In").click()
    page.wait_for_url(re.compile(r".*/(settings/api-keys)?$"))


def _text(locator: Any) -> str:
    return " ".join(locator.inner_text().split())


def _keep(shot: Shots, name: str) -> None:
    """The step's screenshot, also as /tmp/agents-<name>.png."""
    shot(name)
    latest = max(shot.folder.glob("*.png"), key=lambda path: path.stat().st_mtime_ns)
    shutil.copy(latest, Path("/tmp") / f"agents-{name}.png")  # noqa: S108 - where the brief asks for them


def _signed_post(url: str, secret: str, payload: dict[str, Any]) -> httpx2.Response:
    body = orjson.dumps(payload)
    stamp = int(time.time())
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return httpx2.post(url, content=body, timeout=30,
                       headers={"Content-Type": "application/json", "X-Keyway-Signature": f"t={stamp},v1={digest}"})


def test_an_owner_wires_a_connector_an_agent_and_a_hook_and_sees_each_secret_once(
    site: dict[str, Any], browser: Any
) -> None:
    url = site["url"]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
    shot = Shots(page, ARTIFACTS / "agents")
    _sign_in(page, url)

    # The sidebar leads to the agents pages; connectors first, as an agent is given them.
    page.get_by_role("link", name="Agents", exact=True).first.click()
    page.wait_for_url("**/agents")
    page.get_by_role("link", name="Connectors").click()
    page.wait_for_url("**/agents/connectors?project=*")
    page.get_by_label("Name:", exact=True).fill("weather")
    page.get_by_label("URL:", exact=True).fill("https://tools.example.com/weather")
    page.get_by_label("Description").fill("The weather at a place, now.")
    page.get_by_label("Parameters (JSON schema)").fill(
        '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}'
    )
    page.get_by_role("button", name="Add connector").click()
    page.get_by_role("heading", name="Save the connector's secret").wait_for()
    connector_secret = page.locator("#connector-secret").input_value()
    assert connector_secret.startswith("whsec_") and "will not be shown again" in _text(page.get_by_role("note"))
    _keep(shot, "connector-secret")
    page.get_by_role("link", name="Done").click()
    listing = page.content()
    assert "weather" in listing and connector_secret not in listing
    _keep(shot, "connectors")

    # An agent on the catalog's model, given the connector.
    page.get_by_role("link", name="Agents", exact=True).last.click()
    page.get_by_label("Slug").fill("forecaster")
    page.get_by_label("Name:", exact=True).fill("Forecaster")
    page.get_by_label("Model").select_option("gemma-3-270m")
    page.get_by_label("Instructions").fill("Answer with the forecast in one sentence.")
    page.get_by_label("weather (HTTP)").check()
    page.get_by_label("Max iterations").fill("4")
    page.get_by_role("button", name="Create agent").click()
    page.get_by_text("Agent agent:forecaster created.").wait_for()
    row = _text(page.locator("tr[data-agent]"))
    assert "agent:forecaster" in row and "gemma-3-270m" in row and "weather" in row and "4" in row
    _keep(shot, "agents")
    page.get_by_role("button", name="Edit").click()
    page.get_by_label("Max iterations").fill("6")
    _keep(shot, "agent-edit")
    page.get_by_role("button", name="Save agent").click()
    page.get_by_text("Agent agent:forecaster saved.").wait_for()
    assert "6" in _text(page.locator("tr[data-agent] td.num"))

    # A hook that answers by callback: its secret once, its absolute URL, and how to sign.
    page.get_by_role("link", name="Hooks").click()
    page.get_by_label("Name:", exact=True).fill("pager")
    page.get_by_label("Agent:", exact=True).select_option(label="agent:forecaster")
    page.get_by_label("POSTed to a callback URL").check()
    page.get_by_label("Callback URL:", exact=True).fill("https://receiver.invalid/keyway")
    page.get_by_role("button", name="Create hook").click()
    page.get_by_role("heading", name="Save the hook's secret").wait_for()
    hook_secret = page.locator("#hook-secret").input_value()
    hook_url = page.locator("#hook-url").input_value()
    assert hook_secret.startswith("whsec_") and hook_url == f"{url}/hooks/pager"
    assert "X-Keyway-Signature: t=" in _text(page.locator("main"))
    _keep(shot, "hook-secret")
    page.get_by_role("link", name="Done").click()
    listing = page.content()
    assert hook_secret not in listing and connector_secret not in listing and f"{url}/hooks/pager" in listing
    _keep(shot, "hooks")

    # A request signed as the page says is accepted, and is a delivery on the hook's page.
    accepted = _signed_post(hook_url, hook_secret, {"text": "Weather in Paris?", "from": "pager-duty-7"})
    assert accepted.status_code == 202, accepted.text
    assert _signed_post(hook_url, "whsec_wrong", {"text": "Hi", "from": "mallory"}).status_code == 401
    page.get_by_role("link", name="pager").click()
    page.wait_for_url("**/agents/hooks/hook_*")
    deliveries = _text(page.get_by_role("table"))
    assert "pager-duty-7" in deliveries and accepted.json()["id"] in deliveries and "mallory" not in deliveries
    assert hook_secret not in page.content()
    _keep(shot, "hook-deliveries")

    # A key given the connector: chosen among the restricted key's endpoints.
    page.goto(url + "/settings/api-keys/new")
    page.get_by_label("Name:", exact=True).fill("forecast tools")
    page.get_by_label("Restricted").check()
    page.get_by_label("Chat completions").check()
    page.get_by_label("Connectors (agents' server-side tools, as given to the key)").check()
    page.get_by_label("weather (HTTP)").check()
    _keep(shot, "key-connectors")
    page.get_by_role("button", name="Create secret key").click()
    page.get_by_role("heading", name="Save your key").wait_for()
    assert "connectors" in _text(page.locator("main dl"))

    # A phone's width: no page scrolls sideways.
    page.set_viewport_size({"width": 390, "height": 844})
    overflowing = {}
    for name in ("agents", "connectors", "hooks"):
        page.goto(f"{url}/agents/{name}" if name != "agents" else f"{url}/agents")
        _keep(shot, f"{name}-phone")
        overflowing[name] = page.evaluate(OVERFLOWING)
    assert overflowing == {"agents": [], "connectors": [], "hooks": []}
    assert console_errors == []
    context.close()
