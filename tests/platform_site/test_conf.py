"""platform_site.kernel.conf: Django's settings, read faster, never staler than Django's own."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings as django_settings
from django.test import override_settings

from platform_site.kernel.conf import settings as fast


def test_a_setting_reads_as_djangos_and_is_kept() -> None:
    assert fast.KEYWAY_ADMISSION_SLICE == django_settings.KEYWAY_ADMISSION_SLICE
    assert "KEYWAY_ADMISSION_SLICE" in vars(fast)


def test_an_override_is_seen_at_once_and_forgotten_after(settings: Any) -> None:
    before = fast.KEYWAY_ADMISSION_SLICE
    with override_settings(KEYWAY_ADMISSION_SLICE=before + 7):
        assert fast.KEYWAY_ADMISSION_SLICE == before + 7
    assert fast.KEYWAY_ADMISSION_SLICE == before
    settings.KEYWAY_ADMISSION_SLICE = before + 3  # pytest-django's fixture
    assert fast.KEYWAY_ADMISSION_SLICE == before + 3


def test_an_unknown_setting_raises_as_djangos_does_and_nothing_is_written() -> None:
    with pytest.raises(AttributeError):
        _ = fast.KEYWAY_NO_SUCH_SETTING
    with pytest.raises(AttributeError):
        fast.KEYWAY_ADMISSION_SLICE = 1
