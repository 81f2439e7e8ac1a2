"""The lean API handler's own parts (the requests through it are tested by every API test)."""

from __future__ import annotations

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
