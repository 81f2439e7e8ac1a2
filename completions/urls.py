"""Everything the completions app serves, for the root URLconf to include by name (platform_site.urls
includes it as a string, so the project's wiring imports no app above it)."""

from __future__ import annotations

from django.urls import include, path, re_path

from completions.api.http import unknown_route
from completions.api.status import status

urlpatterns = [
    path("v1/", include("completions.api.urls", namespace="v1")),
    path("api/v1/", include("completions.api.urls", namespace="api-v1")),
    re_path(r"^(?:api/)?v1$", unknown_route),
    path("status", status, name="status"),
]
