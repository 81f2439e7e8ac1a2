"""A new user in a real browser (Debian's Chromium driven by Playwright) against a real server process:
sign up → verify the e-mail → create an organization → create a key → call the API with the official SDK →
rotate (the old secret works during the grace period) → revoke (both are refused).

Every page visited is saved as a screenshot under test-artifacts/browser/ (KEYWAY_TEST_ARTIFACTS overrides).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e import server

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = Path(os.environ.get("KEYWAY_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(os.environ.get("KEYWAY_TEST_ARTIFACTS", server.BASE_DIR / "test-artifacts")) / "browser"
PASSWORD = "correct-horse-battery-staple-42"
# Elements that stick out of the viewport on the right and that no scrolling box of theirs clips.
OVERFLOWING = """() => {
  const width = window.innerWidth, out = [];
  for (const element of document.querySelectorAll("body *")) {
    const right = element.getBoundingClientRect().right;
    if (right <= width + 1) continue;
    let clipped = false;
    for (let parent = element.parentElement; parent; parent = parent.parentElement) {
      if (getComputedStyle(parent).overflowX !== "visible") { clipped = true; break; }
    }
    if (!clipped) out.push(`${element.tagName}.${element.className} ${Math.round(right)}`);
  }
  const total = document.documentElement.scrollWidth;
  return total > width + 1 ? out.concat([`scrollWidth ${total}`]) : [];
}"""


# One text turn over the realtime WebSocket, as a web page would make it.
REALTIME_TURN = """([url, key]) => new Promise((resolve, reject) => {
  const socket = new WebSocket(url, ["realtime", "openai-insecure-api-key." + key]);
  const events = [];
  const timer = setTimeout(() => reject(new Error("no response.done after 60 s: " + events)), 60000);
  socket.onerror = () => reject(new Error("the socket failed: " + events));
  socket.onmessage = (message) => {
    const event = JSON.parse(message.data);
    events.push(event.type);
    if (event.type === "session.created") {
      socket.send(JSON.stringify({type: "conversation.item.create", item: {type: "message", role: "user",
        content: [{type: "input_text", text: "Say hello."}]}}));
      socket.send(JSON.stringify({type: "response.create", response: {max_output_tokens: 4}}));
    } else if (event.type === "error") {
      reject(new Error(JSON.stringify(event.error)));
    } else if (event.type === "response.done") {
      clearTimeout(timer);
      socket.close();
      resolve({protocol: socket.protocol, events, status: event.response.status});
    }
  };
})"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    var_dir = tmp_path_factory.mktemp("keyway-browser")
    mail_dir = var_dir / "mail"
    env, database = server.make_environment(var_dir)
    env["KEYWAY_EMAIL_FILE_PATH"] = str(mail_dir)
    process = None
    try:
        server.manage(env, "bootstrap")
        process, url = server.start_keyway(env, var_dir / "server.log")
        yield {"url": url, "mail_dir": mail_dir, "log": var_dir / "server.log"}
    finally:
        if process is not None:
            server.stop(process)
        server.drop_database(database)


class Shots:
    """Saves a full-page screenshot of every step, numbered in order."""

    def __init__(self, page: Any, folder: Path) -> None:
        self.page, self.folder, self.count = page, folder, 0
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()

    def __call__(self, name: str) -> None:
        self.count += 1
        self.page.screenshot(path=str(self.folder / f"{self.count:02d}-{name}.png"), full_page=True)


def _verification_link(mail_dir: Path, address: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for message in sorted(mail_dir.glob("*.log")) if mail_dir.exists() else []:
            text = message.read_text()
            if address in text:
                match = re.search(r"https?://\S+/accounts/confirm-email/\S+/", text)
                if match:
                    return match.group(0)
        time.sleep(0.2)
    raise AssertionError(f"no verification e-mail to {address} in {mail_dir}")


def _sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _chat(url: str, key: str) -> str:
    reply = _sdk(url, key).chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=4, seed=7
    )
    assert reply.choices[0].message.role == "assistant"
    return reply.id


def _refused_soon(url: str, key: str) -> None:
    deadline = time.monotonic() + 5
    while True:
        try:
            _sdk(url, key).models.list()
        except openai.AuthenticationError:
            return
        if time.monotonic() > deadline:
            raise AssertionError("the revoked key is still accepted after 5 s")
        time.sleep(0.2)


def test_a_new_user_signs_up_makes_a_key_calls_the_api_rotates_and_revokes_it(
    site: dict[str, Any], browser: Any
) -> None:
    url = site["url"]
    email = "grace@example.com"
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
    shot = Shots(page, ARTIFACTS)

    # The front door says what Keyway is, and leads to sign-up.
    response = page.goto(url + "/")
    assert response is not None and response.status == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
    shot("landing")
    page.get_by_role("link", name="Sign up").first.click()
    page.get_by_label("Email").fill(email)
    page.get_by_label(re.compile(r"^Password:?$")).fill(PASSWORD)
    page.get_by_label("Password (again)").fill(PASSWORD)
    shot("signup")
    page.get_by_role("button", name="Sign Up").click()
    page.wait_for_url("**/accounts/confirm-email/")
    shot("verify-email-sent")

    # The verification link from the e-mail signs the new user in.
    page.goto(_verification_link(site["mail_dir"], email))
    shot("confirm-email")
    page.get_by_role("button", name="Confirm").click()
    page.wait_for_url("**/organizations/new")
    shot("organization-new")
    page.get_by_label("Organization name").fill("Grace Labs")
    page.get_by_role("button", name="Create organization").click()
    page.wait_for_url("**/settings/api-keys")
    shot("api-keys-empty")

    # Create a key: the secret is shown once, read-only, with a copy button and a snippet.
    page.get_by_role("link", name="API keys").click()
    page.get_by_role("button", name="Create new secret key").click()
    page.get_by_label("Name").fill("backend")
    shot("api-key-create")
    page.get_by_role("button", name="Create secret key").click()
    secret_field = page.get_by_label("Secret key")
    raw_key = secret_field.input_value()
    assert re.fullmatch(r"sk-kw-[a-z0-9]{12}-[A-Za-z0-9]{44}", raw_key)
    assert secret_field.get_attribute("readonly") is not None
    assert raw_key in page.locator("pre").first.inner_text()
    page.get_by_role("button", name="Copy").click()
    page.get_by_role("button", name="Copied").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == raw_key
    shot("api-key-secret")
    _chat(url, raw_key)

    # The list shows the key by its public part only; the secret is on no other page.
    page.get_by_role("link", name="API keys").click()
    row = page.get_by_role("row").filter(has_text="backend")
    assert raw_key not in page.content()
    assert raw_key.rsplit("-", 1)[0] in row.inner_text()
    shot("api-keys-list")

    # Rotate with a one-hour grace period: both secrets work, and the page says until when.
    row.get_by_role("button", name="Rotate").click()
    page.get_by_label("Keep the current secret working for").select_option("3600")
    shot("api-key-rotate")
    page.get_by_role("button", name="Rotate key").click()
    new_key = page.get_by_label("Secret key").input_value()
    assert new_key != raw_key and new_key.rsplit("-", 1)[0] == raw_key.rsplit("-", 1)[0]
    assert "previous secret keeps working until" in page.content()
    shot("api-key-rotated")
    _chat(url, raw_key)
    _chat(url, new_key)

    # A browser page talks to the realtime API itself, with the key in its WebSocket subprotocols.
    realtime = page.evaluate(REALTIME_TURN, [url.replace("http://", "ws://") + "/v1/realtime?model=gemma-3-270m",
                                             new_key])
    assert realtime["protocol"] == "realtime" and realtime["status"] in ("completed", "incomplete"), realtime
    assert realtime["events"][0] == "session.created" and "response.output_text.delta" in realtime["events"]

    # A project's rate limit on a model holds for every key of the project, at once.
    page.get_by_role("navigation", name="Dashboard").get_by_role("link", name="Projects", exact=True).click()
    page.get_by_role("link", name="Default project", exact=True).click()
    page.get_by_label("Requests per minute for gemma-3-270m").fill("1")
    page.get_by_role("button", name="Save rate limits").click()
    page.get_by_text("Rate limits saved").wait_for()
    shot("project-limits")
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(2):  # the calls above may have been counted in the minute before this one
            _chat(url, new_key)
    assert "in project proj_" in str(caught.value)
    page.get_by_label("Requests per minute for gemma-3-270m").fill("")
    page.get_by_role("button", name="Save rate limits").click()
    page.get_by_text("Rate limits saved").wait_for()
    _chat(url, new_key)

    # Revoke, after confirming: both secrets are refused.
    page.get_by_role("link", name="API keys").click()
    assert "Old secret until" in page.get_by_role("row").filter(has_text="backend").inner_text()
    page.get_by_role("row").filter(has_text="backend").get_by_role("button", name="Revoke").click()
    shot("api-key-revoke-confirm")
    page.get_by_role("button", name="Revoke key").click()
    page.wait_for_url("**/settings/api-keys")
    assert "Revoked" in page.get_by_role("row").filter(has_text="backend").inner_text()
    shot("api-keys-revoked")
    _refused_soon(url, new_key)
    _refused_soon(url, raw_key)

    # Every other page of part 1, for the record (and for a person to look at).
    for name, link in [
        ("overview", "Overview"), ("projects", "Projects"), ("members", "Members"), ("admin-keys", "Admin keys"),
        ("organization", "Organization"), ("audit-log", "Audit log"), ("two-factor", "Two-factor authentication"),
    ]:
        page.get_by_role("navigation", name="Dashboard").get_by_role("link", name=link, exact=True).click()
        page.wait_for_load_state()
        shot(name)
        if name == "audit-log":
            audit = page.get_by_role("table").inner_text()
    for event in ("api_key.created", "api_key.updated", "api_key.deleted", "organization.created"):
        assert event in audit

    # A phone's width: the same list, without a horizontal scroll of the page itself.
    page.set_viewport_size({"width": 390, "height": 844})
    page.get_by_role("link", name="API keys").click()
    page.wait_for_url("**/settings/api-keys")
    page.wait_for_load_state("load")
    shot("api-keys-phone")
    overflowing = page.evaluate(OVERFLOWING)
    assert overflowing == [], overflowing

    assert raw_key not in site["log"].read_text() and new_key not in site["log"].read_text()
    assert console_errors == []
    context.close()
