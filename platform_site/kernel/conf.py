"""Django's settings, read faster: for the modules that read them on every proxied request.

`django.conf.settings` is a lazy object whose `__getattribute__` is Python code: each read costs about 300 ns,
ten times a plain attribute's. A proxied JSON chat read settings 32 times (auth, admission, pricing, the
catalog, the upstream gate, the API handler): about 2 % of its CPU. `settings` here is read the same way,
`settings.NAME`, and keeps each value it read in its own instance dictionary, so that the next read is a plain
attribute's. Whatever changes a setting (`override_settings`, pytest-django's `settings` fixture) sends
Django's `setting_changed` signal, which forgets every kept value. Read-only: nothing on the request path
writes a setting.
"""

from __future__ import annotations

import threading
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed

# Held while a value is read and kept, and while they are forgotten: a value read from the settings an override
# replaced is forgotten after it was kept, never kept after it was forgotten (the worker's threads read too).
_lock = threading.Lock()


class _Settings:
    def __getattr__(self, name: str) -> Any:
        # Only for a name not kept yet: Python looks in the instance dictionary first.
        with _lock:
            value = getattr(django_settings, name)
            self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("platform_site.kernel.conf.settings is read-only; change django.conf.settings")


settings: Any = _Settings()


def _forget(**kwargs: Any) -> None:
    with _lock:
        settings.__dict__.clear()


setting_changed.connect(_forget, dispatch_uid="platform_site.kernel.conf")
