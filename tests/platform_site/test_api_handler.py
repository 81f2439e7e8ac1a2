"""The lean API handler's own parts (the requests through it are tested by every API test)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from django.urls import Resolver404, clear_url_caches

from platform_site.api_handler import _StaticRoutes


def test_only_literal_routes_are_kept_and_a_new_url_conf_starts_afresh() -> None:
    routes = _StaticRoutes()
    first = routes.resolve("/v1/chat/completions")
    assert first.url_name == "chat-completions"
    assert routes.resolve("/v1/chat/completions") is first  # kept
    for index in range(300):  # parameters and the catch-all are resolved each time, never kept
        assert routes.resolve(f"/v1/models/m-{index}").kwargs == {"model_id": f"m-{index}"}
        assert routes.resolve(f"/v1/nope-{index}").url_name == "unknown"
    assert routes.resolve("/v1/models/m-1") is not routes.resolve("/v1/models/m-1")
    assert list(routes._matches) == ["/v1/chat/completions"]
    with pytest.raises(Resolver404):
        routes.resolve("/not-under-the-api")
    assert len(routes._matches) == 1

    clear_url_caches()  # what a changed URL conf does (tests' override_settings(ROOT_URLCONF=…) among them)
    again = routes.resolve("/v1/chat/completions")
    assert again is not first and again.url_name == "chat-completions"


async def _call(scope_extra: dict[str, Any], body: bytes = b"") -> list[dict[str, Any]]:
    from platform_site.asgi import application

    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http", "root_path": "",
             "query_string": b"", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000), **scope_extra}
    scope["raw_path"] = scope["path"].encode()
    await application(scope, receive, send)
    return sent


@pytest.mark.django_db
async def test_a_whole_answer_has_its_length_in_one_message_and_a_204_has_none() -> None:
    """Without it, every JSON answer went out in chunked transfer encoding."""
    sent = await _call({"method": "GET", "path": "/v1/models",
                        "headers": [(b"host", b"127.0.0.1"), (b"authorization", b"Bearer sk-nope")]})
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    headers = {name.lower(): value for name, value in sent[0]["headers"]}
    assert sent[0]["status"] == 401 and int(headers[b"content-length"]) == len(sent[1]["body"]) > 0
    assert not sent[1].get("more_body") and orjson.loads(sent[1]["body"])["error"]["code"] == "invalid_api_key"

    sent = await _call({"method": "OPTIONS", "path": "/v1/chat/completions",
                        "headers": [(b"host", b"127.0.0.1"), (b"origin", b"https://app.example"),
                                    (b"access-control-request-method", b"POST")]})
    assert sent[0]["status"] == 204
    assert b"content-length" not in {name.lower() for name, _ in sent[0]["headers"]}
