"""GET /health: is this process able to serve? Checks the database and the cache."""

from __future__ import annotations

import time

from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, JsonResponse

from platform_site.kernel.orm import orm


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def _check_cache() -> None:
    probe = f"health:{time.monotonic_ns()}"
    cache.set(probe, "ok", timeout=5)
    if cache.get(probe) != "ok":
        raise RuntimeError("cache read-back failed")
    cache.delete(probe)


async def health(request: HttpRequest) -> JsonResponse:
    checks: dict[str, str] = {}
    for name, check in (("database", _check_database), ("cache", _check_cache)):
        try:
            await orm(check)
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure of a dependency is what this endpoint reports
            checks[name] = f"error: {type(exc).__name__}"
    healthy = all(value == "ok" for value in checks.values())
    body = {"status": "ok" if healthy else "unavailable", "checks": checks}
    return JsonResponse(body, status=200 if healthy else 503)
