"""The models page and the playground in a real browser (Debian's Chromium driven by Playwright) against a real
server process serving the embedded Gemma 3 270M: sign in → the models page → a message in the playground,
its answer streamed into the page token by token with the usage line after it → a second message on the
same key → an error object from /v1 shown readably → a phone's width.

Gemma 3 270M is a small base model whose answers mean nothing: only their shape is checked. Screenshots go
to test-artifacts/browser/playground/ (KEYWAY_TEST_ARTIFACTS overrides).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e import server
from tests.e2e.test_dashboard_browser import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS, OVERFLOWING, Shots

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

# Clicks Stop as soon as the first token of the next answer is in the page.
STOP_AT_FIRST_TOKEN = """() => {
  const observer = new MutationObserver(() => {
    const answer = document.querySelector("#pg-transcript .turn-assistant.streaming .turn-text");
    if (answer && answer.textContent) { observer.disconnect(); document.getElementById("pg-stop").click(); }
  });
  observer.observe(document.getElementById("pg-transcript"), {subtree: true, childList: true, characterData: true});
}"""
# Records the length of the answer's text each time the page changes it, to tell a stream from one write.
WATCH_ANSWER = """() => {
  window.answerLengths = [];
  new MutationObserver(() => {
    const answer = document.querySelector("#pg-transcript .turn-assistant:last-child .turn-text");
    if (answer) window.answerLengths.push(answer.textContent.length);
  }).observe(document.getElementById("pg-transcript"), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    var_dir = tmp_path_factory.mktemp("keyway-playground")
    env, database = server.make_environment(var_dir)
    process = None
    try:
        printed = server.manage(env, "bootstrap")
        password = re.search(r"password: (\S+)", printed)
        assert password is not None, "bootstrap printed no password for the demo user"
        process, url = server.start_keyway(env, var_dir / "server.log")
        yield {"url": url, "password": password.group(1), "log": var_dir / "server.log"}
    finally:
        if process is not None:
            server.stop(process)
        server.drop_database(database)


def test_a_member_chats_in_the_playground_with_the_answer_streamed_and_its_usage_shown(site: dict[str, Any]) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing; `make test` installs Debian's chromium")
    from playwright.sync_api import expect, sync_playwright

    url = site["url"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.grant_permissions(["clipboard-read", "clipboard-write"])
        page = context.new_page()
        console_errors: list[str] = []
        page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
        shot = Shots(page, ARTIFACTS / "playground")

        page.goto(url + "/accounts/login/")
        page.get_by_label("Email").fill("demo@keyway.localhost")
        page.get_by_label(re.compile(r"^Password:?$")).fill(site["password"])
        page.get_by_role("button", name="Sign In").click()
        page.wait_for_url(url + "/")
        shot("signed-in")

        # The models page: the embedded models, their prices, and an example to copy.
        page.get_by_role("navigation", name="Dashboard").get_by_role("link", name="Models", exact=True).click()
        gemma = page.get_by_role("region", name="gemma-3-270m")
        expect(gemma.get_by_text("Chat", exact=True)).to_be_visible()
        minilm = page.get_by_role("region", name="all-minilm-l6-v2")
        expect(minilm.get_by_text("Embeddings", exact=True)).to_be_visible()
        gemma.get_by_text("Call it (chat completions)").click()
        gemma.get_by_role("button", name="Copy the Python example for gemma-3-270m").click()
        copied = page.evaluate("navigator.clipboard.readText()")
        assert f'base_url="{url}/v1"' in copied and 'model="gemma-3-270m"' in copied and "sk-kw-" not in copied
        shot("models")

        # The playground: one message, its answer streamed into the page, then the usage line.
        page.get_by_role("navigation", name="Dashboard").get_by_role("link", name="Playground", exact=True).click()
        shot("playground-empty")
        page.get_by_label("System prompt").fill("You are terse.")
        page.get_by_label("Max tokens").fill("12")
        page.get_by_label("Message").fill("Say hello in French.")
        page.evaluate(WATCH_ANSWER)
        page.get_by_role("button", name="Send").click()
        usage = page.locator("#pg-usage")
        expect(usage).to_contain_text("completion", timeout=60_000)
        answer = page.locator("#pg-transcript .turn-assistant .turn-text").last
        assert answer.inner_text().strip()
        lengths = page.evaluate("window.answerLengths")
        assert len(set(lengths)) > 1, f"the answer arrived in one piece, not streamed: {lengths}"
        assert re.search(r"\d+ prompt \+ \d+ completion = \d+ tokens · first token after [\d.]+ s · [\d.]+ s in all"
                         r" · gemma-3-270m", usage.inner_text()), usage.inner_text()
        key_status = page.locator("#pg-key-status").inner_text()
        assert re.search(r"sk-kw-[a-z0-9]{12}-…", key_status), key_status
        expect(page.get_by_role("button", name="Stop")).to_be_disabled()
        shot("playground-answer")

        # A second message reuses the page's key, and the conversation grows.
        page.get_by_label("Message").fill("And in German?")
        page.get_by_role("button", name="Send").click()
        expect(page.locator("#pg-transcript .turn-assistant")).to_have_count(2, timeout=60_000)
        expect(usage).to_contain_text("completion", timeout=60_000)
        assert page.locator("#pg-key-status").inner_text() == key_status

        # Stop ends an answer mid-stream: what came is kept, and the page says it is billed.
        page.get_by_label("Max tokens").fill("16")
        page.get_by_label("Message").fill("Count to twenty.")
        page.evaluate(STOP_AT_FIRST_TOKEN)
        page.get_by_role("button", name="Send").click()
        expect(usage).to_contain_text("Stopped after", timeout=60_000)
        expect(page.locator("#pg-transcript .turn-assistant")).to_have_count(3)
        assert page.locator("#pg-transcript .turn-assistant .turn-text").last.inner_text().strip()
        expect(page.get_by_role("button", name="Send")).to_be_enabled()
        shot("playground-stopped")

        # An error object from /v1 is shown as a sentence, and the conversation is left as it was.
        page.get_by_label("Temperature").fill("7")
        page.get_by_label("Message").fill("Too hot.")
        page.get_by_role("button", name="Send").click()
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("'temperature' must be between 0 and 2", timeout=30_000)
        expect(page.locator("#pg-transcript .turn-assistant")).to_have_count(3)
        expect(page.get_by_label("Message")).to_have_value("Too hot.")
        shot("playground-error")

        # One playground key was made for all of it, listed under the member's keys with its expiry.
        page.get_by_role("navigation", name="Dashboard").get_by_role("link", name="API keys", exact=True).click()
        rows = page.get_by_role("row").filter(has_text="Playground · demo@keyway.localhost")
        expect(rows).to_have_count(1)
        assert "Restricted" in rows.inner_text() and "Expires" in rows.inner_text()
        shot("api-keys")

        # A phone's width: the playground stacks, and nothing sticks out of the page.
        page.set_viewport_size({"width": 390, "height": 844})
        page.goto(url + "/playground")
        page.wait_for_load_state("load")
        shot("playground-phone")
        assert page.evaluate(OVERFLOWING) == []
        page.goto(url + "/models")
        page.wait_for_load_state("load")
        shot("models-phone")
        assert page.evaluate(OVERFLOWING) == []

        # The browser reports the deliberate 400 above as a failed resource; nothing else may fail.
        assert [error for error in console_errors if "status of 400" not in error] == [], console_errors
        context.close()
        browser.close()
    log = site["log"].read_text()
    assert "sk-kw-" not in log and "Say hello" not in log
