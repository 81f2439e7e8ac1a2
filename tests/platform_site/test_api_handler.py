"""The lean API handler's own parts (the requests through it are tested by every API test)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from django.urls import Resolver404, clear_url_caches

from platform_site.api_handler import _ServedHosts, _StaticRoutes


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


def test_only_hosts_found_valid_are_kept_and_new_allowed_hosts_start_afresh(settings: Any) -> None:
    settings.ALLOWED_HOSTS = ["api.example.com", ".tenant.example"]
    hosts = _ServedHosts()
    for host in ("api.example.com", "api.example.com:443", "a.tenant.example", "API.EXAMPLE.COM"):
        assert hosts.serves(host), host
        assert hosts.serves(host), host  # kept
    assert hosts._valid == {"api.example.com", "api.example.com:443", "a.tenant.example", "API.EXAMPLE.COM"}
    for host in ("evil.example.com", "", "api.example.com:bad", "api.example.com\x00", "[::1"):
        assert not hosts.serves(host), host
        assert not hosts.serves(host), host  # refused each time, never kept
    for index in range(200):  # made-up hosts that are valid fill it only up to its limit
        assert hosts.serves(f"x{index}.tenant.example")
    assert len(hosts._valid) == _ServedHosts.LIMIT
    assert hosts.serves("x199.tenant.example")  # still answered right when not kept

    settings.ALLOWED_HOSTS = ["other.example.com"]  # a new setting: what was valid is checked again
    assert not hosts.serves("api.example.com")
    assert hosts.serves("other.example.com") and hosts._valid == {"other.example.com"}


@pytest.mark.django_db
async def test_a_whole_answer_has_its_length_in_one_message_and_a_204_has_none() -> None:
    """Without it, every JSON answer went out in chunked transfer encoding."""
    from bench.hotpath_bench import asgi_call
    from platform_site.asgi import application

    sent: list[dict[str, Any]] = []
    await asgi_call(application, "sk-nope", b"", "/v1/models", sent, method="GET")
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    headers = {name.lower(): value for name, value in sent[0]["headers"]}
    assert sent[0]["status"] == 401 and int(headers[b"content-length"]) == len(sent[1]["body"]) > 0
    assert not sent[1].get("more_body") and orjson.loads(sent[1]["body"])["error"]["code"] == "invalid_api_key"

    sent.clear()
    await asgi_call(application, "", b"", "/v1/chat/completions", sent, method="OPTIONS",
                    headers=[(b"host", b"127.0.0.1"), (b"origin", b"https://app.example"),
                             (b"access-control-request-method", b"POST")])
    assert sent[0]["status"] == 204
    assert b"content-length" not in {name.lower() for name, _ in sent[0]["headers"]}
