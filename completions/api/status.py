"""GET /status: version and uptime, active chat sessions and agents' recent tool runs, for a valid API key
(its organization's); for staff the whole platform's, and also the loaded models, open streams (this worker)
and realtime sockets (every worker, where there is Redis)."""

from __future__ import annotations

import datetime as dt
from importlib.metadata import PackageNotFoundError, version

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse

from agents.runtime import recent_runs
from agents.sessions import active_session_count
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


# A session with a turn this recent counts as active; tool runs are counted over the last hour.
ACTIVE_WITHIN = dt.timedelta(minutes=15)
RUNS_WITHIN = dt.timedelta(hours=1)


def _activity(organization_id: int | None) -> dict[str, object]:
    """Sessions and agents' tool runs: the caller's organization's, or (staff) everyone's."""
    runs = recent_runs(within=RUNS_WITHIN, organization_id=organization_id)
    return {
        "active_sessions": active_session_count(within=ACTIVE_WITHIN, organization_id=organization_id),
        "agent_tool_runs_last_hour": {"total": sum(runs.values()), **runs},
    }


def _is_staff(request: HttpRequest) -> bool:
    user = request.user
    return bool(user.is_authenticated and user.is_staff)


async def status(request: HttpRequest) -> HttpResponse:
    """A key learns that the service is up and which version it runs; the figures of the whole deployment
    (what is loaded, what is open on every worker) are for staff, not for any tenant holding a key."""
    request_id = getattr(request, "request_id", None) or new_request_id()
    staff = False
    organization_id: int | None = None
    if request.headers.get("Authorization"):
        try:
            organization_id = (await authenticate_header(request.headers.get("Authorization"))).organization_id
        except ApiKeyError as exc:
            return error_response(exc, request_id=request_id)
    else:
        staff = await sync_to_async(_is_staff)(request)  # Django's request cycle: its connection, closed by it
        if not staff:
            error = ApiError("Send an API key, or log in as staff, to read the status.", status=401,
                             code="invalid_api_key")
            return error_response(error, request_id=request_id)
    body: dict[str, object] = {"status": "ok", "version": _version(), "uptime_seconds": process.uptime_seconds()}
    body.update(await sync_to_async(_activity)(organization_id))
    if staff:
        body.update(
            loaded_models=process.loaded_models(),
            open_streams=process.counters().get("open_streams", 0),
            open_websockets=await open_session_count(),
        )
    return JsonResponse(body)
