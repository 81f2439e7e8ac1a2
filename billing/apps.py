from __future__ import annotations

import atexit

from django.apps import AppConfig


class BillingConfig(AppConfig):
    """Prices, the usage ledger, credits, budgets and rate limits."""

    name = "billing"

    def ready(self) -> None:
        # Wired here, not at import (platform_site.kernel.process).
        from billing import counters, ledger, metering, sessions
        from billing.pricing import forget_cached_terms
        from billing.services import on_credit_change
        from platform_site.kernel import process

        # A credit change made in this process is seen by its next request; other processes see it within
        # KEYWAY_BILLING_LOCAL_TTL (every admission carries the credit total it knows, and the shared
        # counter keeps the newest).
        on_credit_change(lambda organization_id, total, version: forget_cached_terms(organization_id))
        process.register_startup_hook(ledger.recover_at_start)
        process.register_shutdown_hook(ledger.flush_at_shutdown)
        process.register_shutdown_hook(counters.flush_at_shutdown)
        process.register_shutdown_hook(ledger.verify_at_shutdown)
        process.resettable(counters.reset)
        process.resettable(metering.reset)
        process.resettable(sessions.reset)
        # daphne does not speak lifespan, so its workers end without the shutdown hooks: write what is
        # buffered while the process can still reach the database.
        atexit.register(ledger.flush_at_exit)
