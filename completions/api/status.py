"""GET /status: version and uptime for a valid API key; for staff also the loaded models, open streams (this
worker) and realtime sockets (every worker, where there is Redis)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse

from apikeys.auth import authenticate_header
from apikeys.exceptions import ApiKeyError
from billing.sessions import open_session_count
from platform_site.kernel import process
from platform_site.kernel.errors import ApiError, error_response
from platform_site.middleware import new_request_id


def _version() -> str:
    try:
        return version("keyway")
    except PackageNotFoundError:
        return "0.1.0"


def _is_staff(request: HttpRequest) -> bool:
    user = request.user
    return bool(user.is_authenticated and user.is_staff)


async def status(request: HttpRequest) -> HttpResponse:
    """A key learns that the service is up and which version it runs; the figures of the whole deployment
    (what is loaded, what is open on every worker) are for staff, not for any tenant holding a key."""
    request_id = getattr(request, "request_id", None) or new_request_id()
    staff = False
    if request.headers.get("Authorization"):
        try:
            await authenticate_header(request.headers.get("Authorization"))
        except ApiKeyError as exc:
            return error_response(exc, request_id=request_id)
    else:
        staff = await sync_to_async(_is_staff)(request)  # Django's request cycle: its connection, closed by it
        if not staff:
            error = ApiError("Send an API key, or log in as staff, to read the status.", status=401,
                             code="invalid_api_key")
            return error_response(error, request_id=request_id)
    body: dict[str, object] = {"status": "ok", "version": _version(), "uptime_seconds": process.uptime_seconds()}
    if staff:
        body.update(
            loaded_models=process.loaded_models(),
            open_streams=process.counters().get("open_streams", 0),
            open_websockets=await open_session_count(),
        )
    return JsonResponse(body)
