"""What the completions app serves beside the API itself (completions.api.urls): the bare /v1 and /api/v1,
and /status. The root URLconf includes both by module name, so the project's wiring imports no app above
it."""

from __future__ import annotations

from django.urls import path, re_path

from completions.api.hooks import hook_ingress
from completions.api.http import unknown_route
from completions.api.status import status

urlpatterns = [
    re_path(r"^(?:api/)?v1$", unknown_route),
    path("status", status, name="status"),
    # Webhook ingress: signed by the hook's secret, not by an API key; served by the lean API handler.
    path("hooks/<str:name>", hook_ingress, name="hook-ingress"),
]
