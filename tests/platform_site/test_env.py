from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from platform_site.env import env_bool, env_int, env_list, env_secret


def test_env_bool_accepts_common_spellings_and_rejects_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_FLAG", "yes")
    assert env_bool("X_FLAG", False) is True
    monkeypatch.setenv("X_FLAG", "0")
    assert env_bool("X_FLAG", True) is False
    monkeypatch.setenv("X_FLAG", "maybe")
    with pytest.raises(ImproperlyConfigured):
        env_bool("X_FLAG", True)


def test_env_int_fails_loudly_on_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_INT", "abc")
    with pytest.raises(ImproperlyConfigured):
        env_int("X_INT", 1)
    monkeypatch.setenv("X_INT", "0")
    with pytest.raises(ImproperlyConfigured):
        env_int("X_INT", 1, minimum=1)


def test_env_list_splits_on_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_LIST", "a, b,,c")
    assert env_list("X_LIST", []) == ["a", "b", "c"]


def test_secret_is_generated_once_in_debug_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("X_SECRET", raising=False)
    first = env_secret("X_SECRET", debug=True, var_dir=tmp_path)
    second = env_secret("X_SECRET", debug=True, var_dir=tmp_path)
    assert first == second and len(first) >= 48
    assert (tmp_path / "x_secret.secret").stat().st_mode & 0o077 == 0


def test_production_refuses_to_start_without_its_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("X_SECRET", raising=False)
    with pytest.raises(ImproperlyConfigured):
        env_secret("X_SECRET", debug=False, var_dir=tmp_path)


@pytest.mark.skipif(not __import__("django.conf").conf.settings.REDIS_URL, reason="needs REDIS_URL")
def test_redis_cache_shares_one_client_across_backend_instances() -> None:
    # Under ASGI every request context gets its own cache backend object; they must not each open
    # connections of their own.
    from django.core.cache import caches

    first = caches.create_connection("default")
    second = caches.create_connection("default")
    assert first is not second
    assert first._cache.get_client(write=True) is second._cache.get_client(write=True)  # type: ignore[attr-defined]
    first.set("shared-client-probe", 1)
    assert second.get("shared-client-probe") == 1


def _settings_in_a_fresh_process(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {name: value for name, value in os.environ.items()
            if name not in ("DEBUG", "SECRET_KEY", "KEYWAY_KEY_PEPPER", "KEYWAY_ENCRYPTION_KEY")}
    return subprocess.run(
        [sys.executable, "-c", "from django.conf import settings; print(settings.DEBUG, settings.SESSION_COOKIE_SECURE,"
         " settings.SECURE_HSTS_SECONDS, settings.ALLOWED_HOSTS)"],
        env={**base, "DJANGO_SETTINGS_MODULE": "platform_site.settings", "KEYWAY_VAR_DIR": str(tmp_path), **env},
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=60,
    )


def test_debug_is_off_unless_asked_for_and_then_production_needs_its_secrets(tmp_path: Path) -> None:
    refused = _settings_in_a_fresh_process(tmp_path)
    assert refused.returncode != 0 and "SECRET_KEY is required when DEBUG is off" in refused.stderr
    production = _settings_in_a_fresh_process(
        tmp_path, SECRET_KEY="s" * 50, KEYWAY_KEY_PEPPER="p" * 50, KEYWAY_ENCRYPTION_KEY="e" * 50,
        ALLOWED_HOSTS="api.example.com",
    )
    assert production.stdout.split() == ["False", "True", "31536000", "['api.example.com']"], production.stderr
    development = _settings_in_a_fresh_process(tmp_path, DEBUG="1")
    assert development.stdout.split()[:3] == ["True", "False", "0"], development.stderr
