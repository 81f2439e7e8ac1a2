"""Routes of the billing REST API, mounted at /api/billing/ (on Django's full stack, with sessions)."""

from __future__ import annotations

from django.urls import path, re_path

from billing import api
from billing.errors import unknown_route

app_name = "billing"

urlpatterns = [
    path("usage", api.UsageListApi.as_view(), name="usage-list"),
    path("usage.csv", api.UsageExportApi.as_view(), name="usage-export"),
    path("balance", api.BalanceRetrieveApi.as_view(), name="balance-retrieve"),
    path("credits", api.CreditListApi.as_view(), name="credit-list"),
    path("statements/<str:month>", api.StatementRetrieveApi.as_view(), name="statement-retrieve"),
    re_path(r"^(?P<rest>.*)$", unknown_route, name="unknown"),
]
