"""Routes of the billing REST API, mounted at /api/billing/ (on Django's full stack, with sessions)."""

from __future__ import annotations

from django.urls import path, re_path

from billing import api, schema
from billing.errors import OpenApiDocumentView, unknown_route

app_name = "billing"

urlpatterns = [
    path("usage", api.UsageListApi.as_view(), name="usage-list"),
    path("usage.csv", api.UsageExportApi.as_view(), name="usage-export"),
    path("balance", api.BalanceRetrieveApi.as_view(), name="balance-retrieve"),
    path("credits", api.CreditListApi.as_view(), name="credit-list"),
    path("statements/<str:month>", api.StatementRetrieveApi.as_view(), name="statement-retrieve"),
    # The OpenAPI document of this API (drf-spectacular's, described in billing/schema.py).
    path("openapi.json", OpenApiDocumentView.as_view(
        urlconf="billing.schema_urls", custom_settings=schema.SETTINGS, authentication_classes=[],
        permission_classes=[]), name="openapi"),
    # [\s\S], not `.`: a path may hold a newline (%0A), which `.` does not match (then Django's HTML 404).
    re_path(r"^(?P<rest>[\s\S]*)$", unknown_route, name="unknown"),
]
