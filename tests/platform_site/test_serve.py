"""`make run`'s server command (platform_site.serve): daphne on uvloop, with Twisted's Content-Type parsing
remembered and without Twisted's access log line. The e2e tests run every daphne process through it; these
check what they cannot see."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.web import http

from platform_site import serve

BASE_DIR = Path(__file__).resolve().parents[2]


def test_daphne_runs_on_uvloop_when_the_command_sets_it_up() -> None:
    """daphne makes its loop when daphne.server is imported: the policy must be set before, as main() does."""
    code = (
        "from platform_site import serve\n"
        "assert serve.use_uvloop()\n"
        "import daphne.server\n"
        "from twisted.internet import reactor\n"
        "print(type(daphne.server.twisted_loop).__module__, type(reactor._asyncioEventloop).__module__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=BASE_DIR, capture_output=True, text=True, timeout=60,
                            check=True)
    assert result.stdout.split() == ["uvloop", "uvloop"]


def test_remembered_content_types_answer_as_twisted_does_and_stay_bounded() -> None:
    parse = http._parseContentType
    if hasattr(parse, "__wrapped__"):  # this process wrapped it already
        parse = parse.__wrapped__
    cached = serve.cached_content_types(parse)
    samples = [b"application/json", b"Application/JSON; charset=utf-8", b"multipart/form-data; boundary=xyz",
               b"application/x-www-form-urlencoded", b"text/plain;;;", b"", b"\xff\xfe garbage"]
    for line in samples * 2:
        assert cached(line) == parse(line)
    assert cached.cache_info().hits == len(samples)  # type: ignore[attr-defined]
    for index in range(500):
        cached(f"application/x-{index}".encode())
    assert cached.cache_info().currsize == 64  # type: ignore[attr-defined]
    long = b"multipart/form-data; boundary=" + b"x" * 500
    assert cached(long) == parse(long) == b"multipart/form-data"
    assert cached.cache_info().currsize == 64  # a long value is parsed each time, never kept  # type: ignore[attr-defined]


def test_the_cache_wraps_twisted_once() -> None:
    original = http._parseContentType
    try:
        http._parseContentType = getattr(original, "__wrapped__", original)  # as Twisted ships it
        assert serve.cache_content_types() is True
        wrapped = http._parseContentType
        assert hasattr(wrapped, "cache_info")
        assert serve.cache_content_types() is False
        assert http._parseContentType is wrapped
    finally:
        http._parseContentType = original


def test_daphne_keeps_its_own_access_log_and_formats_no_twisted_one(tmp_path: Path) -> None:
    """At verbosity 2 daphne routes Twisted's log to Python's logging, where Twisted's combined-log line for each
    request would show; the command drops that line (it was formatted for every request, and discarded at the
    verbosity `make run` uses), and daphne's own access log still has the request."""
    from tests.e2e.server import free_port, stop, wait_for

    port = free_port()
    access = tmp_path / "access.log"
    command = serve.command(port, quiet=False)
    command[-1:-1] = ["-v", "2", "--access-log", str(access)]
    output = tmp_path / "daphne.out"
    process = subprocess.Popen(command, cwd=BASE_DIR, stdout=output.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", process=process)
    finally:
        stop(process)
    assert '"GET /health' in access.read_text()
    assert '"GET /health HTTP/1.1"' not in output.read_text()  # Twisted's combined-log format
