"""The root URLconf. Apps are included by module name, so this wiring imports nothing above platform_site."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from platform_site.health import health, metrics_view

urlpatterns = [
    # The management API (OpenAI's Admin API paths), on Django's full stack: dashboard sessions use it too.
    path("v1/organization/", include("dashboard.admin_api.urls", namespace="admin-api")),
    # The OpenAI-compatible API, served by the lean API handler (platform_site.asgi); first, because every
    # proxied request resolves its path through this list.
    path("v1/", include("completions.api.urls", namespace="v1")),
    path("api/v1/", include("completions.api.urls", namespace="api-v1")),
    # The bare /v1 and /api/v1 (a JSON 404), and /status.
    path("", include("completions.urls")),
    # Not under /v1 or /api/v1: those prefixes go to the lean API handler, which has no sessions, and the
    # billing API serves logged-in members as well as keys.
    path("api/billing/", include("billing.urls", namespace="billing")),
    path("health", health, name="health"),
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("accounts/", include("allauth.urls")),
    # The web dashboard: the front door at /, the organization's pages under /settings/.
    path("", include("dashboard.urls")),
]
