"""The end-to-end suite's log check finds what it looks for (tests/e2e/conftest.py)."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import leaks_in


def test_the_log_check_finds_keys_secrets_and_prompts(tmp_path: Path) -> None:
    (tmp_path / "keyway_key_pepper.secret").write_text("pepper-value-123")
    log = tmp_path / "server.log"
    log.write_text(
        "GET /v1/models 200\n"
        "auth failed for sk-kw-abcdefghijkl-" + "A" * 44 + "\n"
        "config pepper-value-123 loaded\n"
        "prompt: Say hello.\n"
        "POST /v1/chat/completions 200\n"
    )
    assert leaks_in(log, tmp_path) == [
        "server.log:2: an API key", "server.log:3: a server secret", "server.log:4: 'Say hello'",
    ]
