from __future__ import annotations

from django.apps import AppConfig


class PlatformSiteConfig(AppConfig):
    name = "platform_site"
    verbose_name = "Tenancy"

    def ready(self) -> None:
        # Wired here, not at import (platform_site.kernel.process).
        from platform_site.kernel import process
        from platform_site.kernel.singleflight import SingleFlight

        process.resettable(SingleFlight.invalidate_all)
