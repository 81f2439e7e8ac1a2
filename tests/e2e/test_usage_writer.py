"""Ledger writing off the gateway: a server with KEYWAY_USAGE_STREAM_WRITER=0 leaves its usage events in the
Redis usage stream, and `manage.py usage_writer`, a process of its own, writes them to the ledger until SIGTERM.

The stack: tests/e2e/server.py's usual one: the fake upstream, Keyway on uvicorn, a database and a Redis key prefix
of its own. Needs REDIS_URL: without Redis there is no stream, and each worker writes its own journal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx2
import pytest

from tests.e2e import server

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="the usage stream lives in Redis (REDIS_URL)"),
]



def _ledger_rows(env: dict[str, str]) -> int:
    output = server.django_shell(env, "from billing.models import UsageEvent; print(UsageEvent.objects.count())")
    return int(output.strip().splitlines()[-1])


def test_a_usage_writer_process_writes_what_gateways_without_a_writer_leave_in_the_stream(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    var_dir = tmp_path_factory.mktemp("keyway-usage-writer")
    with server.keyway_stack(var_dir, upstream_models="ok", env_extra={"KEYWAY_USAGE_STREAM_WRITER": "0"}) as gateway:
        env = gateway["env"]
        with httpx2.Client(base_url=gateway["url"], headers={"Authorization": f"Bearer {gateway['key']}"},
                           timeout=30) as client:
            for _ in range(12):
                answer = client.post("/v1/chat/completions",
                                     json={"model": "ok", "messages": [{"role": "user", "content": "hi"}]})
                assert answer.status_code == 200, answer.text
        time.sleep(1)  # four of the gateway's flush intervals: it writes nothing
        assert _ledger_rows(env) == 0

        writer = subprocess.Popen([server.PYTHON, "manage.py", "usage_writer"], cwd=server.BASE_DIR, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 30
            while _ledger_rows(env) != 12 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert _ledger_rows(env) == 12
            writer.send_signal(signal.SIGTERM)
            output, _ = writer.communicate(timeout=30)
        finally:
            server.stop(writer)  # type: ignore[arg-type]
        assert writer.returncode == 0, output
        assert "12 usage event(s) written from the usage stream." in output
