from __future__ import annotations

from django.apps import AppConfig


class BillingConfig(AppConfig):
    """Prices, the usage ledger, credits, budgets and rate limits (issue 4 builds them here)."""

    name = "billing"
