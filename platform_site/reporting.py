"""What Django's error reports (the DEBUG page, error e-mails) may show of the settings.

Django hides settings whose names look secret (KEY, TOKEN, PASS…), but not connection URLs, which carry
credentials here (`REDIS_URL=redis://:password@host`, and the cache and channel layer built from it). Those
are hidden too: any setting or nested key named like a URL, a location or a host list.
"""

from __future__ import annotations

import re

from django.views.debug import SafeExceptionReporterFilter


class KeywayExceptionReporterFilter(SafeExceptionReporterFilter):
    hidden_settings = re.compile(
        "API|AUTH|TOKEN|KEY|SECRET|PASS|SIGNATURE|HTTP_COOKIE|URL|LOCATION|HOSTS|ADDRESS|DSN", flags=re.IGNORECASE
    )
