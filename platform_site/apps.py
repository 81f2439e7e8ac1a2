from __future__ import annotations

from django.apps import AppConfig


class PlatformSiteConfig(AppConfig):
    name = "platform_site"
    verbose_name = "Tenancy"

    def ready(self) -> None:
        # Wired here, not at import (platform_site.kernel.process).
        import atexit

        from platform_site.kernel import breaker, metrics, process
        from platform_site.kernel.singleflight import SingleFlight

        process.resettable(SingleFlight.invalidate_all)
        process.resettable(breaker.redis.reset)
        process.resettable(breaker.database.reset)
        # A worker that ends stops counting in the live gauges (daphne has no lifespan: atexit too).
        atexit.register(metrics.process_ended)
