from __future__ import annotations

from django.contrib import admin
from django.urls import include, path, re_path

from completions.status import status
from completions.views import unknown_route
from platform_site.health import health

urlpatterns = [
    path("v1/", include("completions.urls", namespace="v1")),
    path("api/v1/", include("completions.urls", namespace="api-v1")),
    # Not under /v1 or /api/v1: those prefixes go to the lean API handler, which has no sessions, and the
    # billing API serves logged-in members as well as keys (platform_site.asgi).
    path("api/billing/", include("billing.urls", namespace="billing")),
    re_path(r"^(?:api/)?v1$", unknown_route),
    path("health", health, name="health"),
    path("status", status, name="status"),
    path("admin/", admin.site.urls),
]
