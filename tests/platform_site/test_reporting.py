"""Django's error reports never show a connection URL: they carry credentials."""

from __future__ import annotations

from typing import Any

from django.views.debug import get_default_exception_reporter_filter


def test_settings_in_error_reports_hide_urls_with_credentials(settings: Any) -> None:
    url = "redis://:hunter2-password@10.0.0.5:6379/0"
    settings.REDIS_URL = url
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": url}}
    settings.CHANNEL_LAYERS = {"default": {"CONFIG": {"hosts": [{"address": url}]}}}
    settings.KEYWAY_UPSTREAM_BASE_URL = "https://user:pw@upstream.example/v1"
    shown = repr(get_default_exception_reporter_filter().get_safe_settings())
    assert "hunter2" not in shown and "user:pw" not in shown
    assert "ROOT_URLCONF" in shown  # the rest is still there to debug with
