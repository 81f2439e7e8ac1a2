"""GET /health: is this process able to serve? Checks the database and the cache."""

from __future__ import annotations

import hmac
import time

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from platform_site.kernel import metrics
from platform_site.kernel.errors import ApiError, error_response
from platform_site.kernel.orm import orm
from platform_site.middleware import new_request_id


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


# Read-only: any other method gets its 405 as an error object, not the CSRF page.
@csrf_exempt
def metrics_view(request: HttpRequest) -> HttpResponse:
    """GET /metrics: every worker's Prometheus metrics. For a scraper holding KEYWAY_METRICS_TOKEN (as a bearer
    token), or a logged-in staff member; nobody else."""
    request_id = getattr(request, "request_id", "") or new_request_id()
    if request.method not in ("GET", "HEAD"):
        error = ApiError(f"Method {request.method} is not allowed on /metrics. Allowed: GET.", status=405,
                         code="method_not_allowed", headers={"Allow": "GET, HEAD"})
        return error_response(error, request_id=request_id)
    token = settings.KEYWAY_METRICS_TOKEN
    sent = request.headers.get("Authorization", "")
    allowed = bool(token) and hmac.compare_digest(sent.encode(), f"Bearer {token}".encode())
    if not allowed and not (request.user.is_authenticated and request.user.is_staff):
        error = ApiError("Send the metrics token as a bearer token, or log in as staff, to read the metrics.",
                         status=401, code="invalid_api_key")
        return error_response(error, request_id=request_id)
    body, content_type = metrics.exposition()
    response = HttpResponse(body, content_type=content_type)
    response["Cache-Control"] = "no-store"
    return response


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
