"""A check over every end-to-end test: no Keyway server ever logged an API key, the key pepper, the
encryption key, a provider's key or a prompt the tests sent."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import server

_API_KEY = re.compile(r"sk-kw-[a-z0-9]{12}-[A-Za-z0-9]{44}")
# Provider keys and prompt texts the end-to-end tests send.
NEVER_LOGGED = ("sk-upstream", "Say hello", "Weather in Paris", "Tell a long story", "what is this?", "call shop__")


def leaks_in(log: Path, var_dir: Path) -> list[str]:
    """Lines of a server's log that hold an API key, one of the server's generated secrets (its var
    directory's *.secret files) or one of NEVER_LOGGED."""
    secrets = [path.read_text().strip() for path in var_dir.glob("*.secret")]
    leaks = []
    for number, line in enumerate(log.read_text(errors="replace").splitlines(), start=1):
        found = []
        if _API_KEY.search(line):
            found.append("an API key")
        found += [repr(needle) for needle in NEVER_LOGGED if needle in line]
        found += ["a server secret" for secret in secrets if secret and secret in line]
        if found:
            leaks.append(f"{log.name}:{number}: {', '.join(found)}")
    return leaks


@pytest.fixture(scope="session", autouse=True)
def _no_secret_or_prompt_in_any_server_log() -> Iterator[None]:
    yield
    leaks = [leak for log, var_dir in server.SERVER_LOGS if log.exists() for leak in leaks_in(log, var_dir)]
    assert not leaks, "secrets or prompt text in server logs:\n" + "\n".join(leaks[:20])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (a test tool's own browser download cannot work here)."""
    from tests.e2e.test_dashboard_browser import CHROMIUM, CHROMIUM_FLAGS

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing; `make test` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield instance
        instance.close()
