"""Operability against a real uvicorn server with two worker processes: /metrics reports every worker's
figures whichever worker answers the scrape, and the logs are JSON lines that carry the request id."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from tests.e2e import server

pytestmark = pytest.mark.e2e

TOKEN = "scraper-secret-token"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    var_dir = tmp_path_factory.mktemp("keyway-ops")
    env, database = server.make_environment(var_dir)
    env.update(LOG_FORMAT="json", KEYWAY_METRICS_TOKEN=TOKEN)
    process = upstream = None
    log = var_dir / "server.log"
    try:
        upstream, upstream_url = server.start_fake_upstream(var_dir / "upstream.log")
        env.update(KEYWAY_UPSTREAM_BASE_URL=f"{upstream_url}/v1", KEYWAY_UPSTREAM_MODELS="ok,http500",
                   KEYWAY_UPSTREAM_NAME="fake")
        server.manage(env, "bootstrap")
        key = server.manage(env, "createapikey", "demo", "--name", "ops").strip()
        process, url = server.start_keyway(env, log, uvicorn=True, workers=2)
        yield {"url": url, "key": key, "log": log, "process": process, "var_dir": var_dir}
    finally:
        for running in (process, upstream):
            if running is not None:
                server.stop(running)
        server.drop_database(database)


def _sample(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_add_up_over_both_workers_and_logs_are_json_with_the_request_id(stack: dict[str, Any]) -> None:
    auth = {"Authorization": f"Bearer {stack['key']}"}
    body = {"model": "ok", "messages": [{"role": "user", "content": "a prompt that must never be logged"}]}
    # A fresh connection per request, so that both workers serve some.
    for _ in range(20):
        assert httpx2.post(f"{stack['url']}/v1/chat/completions", json=body, headers=auth, timeout=30).is_success
    failed = httpx2.post(f"{stack['url']}/v1/chat/completions", json={**body, "model": "http500"}, headers=auth,
                         timeout=30)
    assert failed.status_code == 502
    scrapes = [httpx2.get(f"{stack['url']}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
               for _ in range(6)]
    for scrape in scrapes:
        assert scrape.status_code == 200
        assert _sample(scrape.text, "keyway_requests_total", 'endpoint="chat_completions",status="200"') == 20
        assert _sample(scrape.text, "keyway_tokens_total", 'kind="prompt",model="ok"') == 20 * 9
    assert httpx2.get(f"{stack['url']}/metrics", timeout=30).status_code == 401
    # Both workers served (and so wrote) some of it: the sums above are over processes.
    assert len(list((stack["var_dir"] / "metrics").glob("run-*/counter_*.db"))) == 2

    server.stop(stack["process"])
    lines = stack["log"].read_text().splitlines()
    ours = [json.loads(line) for line in lines if line.startswith("{")]
    failure = [entry for entry in ours if entry["logger"] == "completions.engine.routing"]
    assert failure and failure[0]["request_id"] == failed.headers["x-request-id"]
    assert failure[0]["level"] == "WARNING" and "fake" in failure[0]["message"]
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in ours)
    assert not any("must never be logged" in line or stack["key"] in line for line in lines)
