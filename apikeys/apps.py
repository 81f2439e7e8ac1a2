from __future__ import annotations

from django.apps import AppConfig


class ApikeysConfig(AppConfig):
    name = "apikeys"
    verbose_name = "API keys"

    def ready(self) -> None:
        # Wired here, not at import (platform_site.kernel.process).
        from apikeys import auth, throttle
        from platform_site.kernel import process

        process.resettable(auth.forget_last_touches)
        process.resettable(throttle.reset)
