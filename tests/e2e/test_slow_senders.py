"""Identity before body, against a real uvicorn process (which hands the request to the application as soon
as its headers arrive): a client without a valid key is answered before it sends any body, and a client
with one has a deadline for its body."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e import server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    var_dir = tmp_path_factory.mktemp("keyway-slow")
    env, database = server.make_environment(var_dir)
    env["KEYWAY_BODY_READ_TIMEOUT"] = "2"
    process = None
    try:
        server.manage(env, "bootstrap")
        key = server.manage(env, "createapikey", "demo", "--name", "slow").strip()
        process, url = server.start_keyway(env, var_dir / "server.log", uvicorn=True)
        host, port = url.removeprefix("http://").split(":")
        yield {"address": (host, int(port)), "key": key}
    finally:
        if process is not None:
            server.stop(process)
        server.drop_database(database)


def _headers_only(stack: dict[str, Any], authorization: str | None, length: int) -> socket.socket:
    """A POST whose headers promise `length` bytes of body, none of which is sent yet."""
    connection = socket.create_connection(stack["address"], timeout=10)
    lines = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {length}"]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return connection


def _status(connection: socket.socket) -> tuple[int, bytes]:
    answer = b""
    # The status line and headers, then the error object (its JSON ends with "}}").
    while b"\r\n\r\n" not in answer or (b" 200 " not in answer[:16] and b"}}" not in answer):
        piece = connection.recv(65536)
        if not piece:
            break
        answer += piece
    return int(answer.split(b" ", 2)[1]), answer


@pytest.mark.parametrize("authorization", [None, "Bearer sk-kw-not-a-real-key-at-all", "Basic abc"])
def test_a_client_without_a_valid_key_is_answered_before_it_sends_its_body(
    stack: dict[str, Any], authorization: str | None
) -> None:
    connection = _headers_only(stack, authorization, 50_000_000)
    began = time.monotonic()
    status, answer = _status(connection)
    connection.close()
    assert status == 401 and b"invalid_api_key" in answer
    assert time.monotonic() - began < 1.5  # not the body deadline: no body was waited for


def test_a_client_with_a_key_that_sends_its_body_too_slowly_gets_408(stack: dict[str, Any]) -> None:
    connection = _headers_only(stack, f"Bearer {stack['key']}", 100)
    connection.sendall(b'{"model": ')
    began = time.monotonic()
    status, answer = _status(connection)
    connection.close()
    assert status == 408 and b"request_timeout" in answer
    assert 1.5 < time.monotonic() - began < 10


def test_a_client_with_a_key_and_its_whole_body_is_served(stack: dict[str, Any]) -> None:
    body = b'{"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}'
    connection = _headers_only(stack, f"Bearer {stack['key']}", len(body))
    connection.sendall(body)
    status, _ = _status(connection)
    connection.close()
    assert status == 200
