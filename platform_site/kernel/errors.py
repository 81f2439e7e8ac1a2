"""The one error type of Keyway's APIs, and the one mapping from any exception to OpenAI's error object.

Every domain exception (a bad key, a missing scope, a rate limit, an exhausted credit, an upstream failure,
a bad request body) is an `ApiError`: it carries its HTTP status and the four fields of OpenAI's error
object — message, type, param, code — as class defaults its subclasses set, overridable per instance.
`to_api_error` turns anything raised into one of them, and each surface only renders the value: the JSON
path (`error_response`), the SSE error frame, the WebSocket `error` event and the DRF APIs all show the same
object for the same failure. Anything unanticipated becomes a 500 that names the request id and nothing
else: never a traceback, never a message that could carry a secret or prompt text.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.db import DataError, InterfaceError, OperationalError
from django.http import Http404, HttpResponse
from rest_framework import exceptions as drf

logger = logging.getLogger("keyway.errors")


class ApiError(Exception):
    """An error the API answers with: status plus the four fields of OpenAI's error object."""

    status: int = 400
    error_type: str = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers) if headers else {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


def server_error(*, request_id: str) -> ApiError:
    """The 500 for a failure nobody anticipated: it names the request id and nothing else (never a traceback)."""
    return ApiError(
        f"The server had an error while processing your request. Quote request id {request_id} if you ask "
        "for help.",
        status=500,
        error_type="server_error",
        code="server_error",
    )


def _drf_code(exc: drf.APIException, default: str | None) -> str | None:
    code = getattr(exc.detail, "code", None)
    return code if isinstance(code, str) and code != exc.default_code else default


def _first_message(detail: Any) -> tuple[str | None, str]:
    """(param, message) of a DRF ValidationError's detail, which may be a dict, a list or a string."""
    if isinstance(detail, dict):
        param, value = next(iter(detail.items()))
        return str(param), _first_message(value)[1]
    if isinstance(detail, list) and detail:
        return _first_message(detail[0])
    return None, str(detail)


def _from_drf(exc: drf.APIException) -> ApiError:
    if isinstance(exc, drf.NotAuthenticated):
        return ApiError(
            "You didn't provide an API key. Provide it in the Authorization header as 'Bearer YOUR_KEY', or "
            "sign in to the dashboard.",
            status=401,
            code="invalid_api_key",
        )
    if isinstance(exc, drf.AuthenticationFailed):
        return ApiError(str(exc.detail), status=401, code=_drf_code(exc, "invalid_api_key"))
    if isinstance(exc, drf.PermissionDenied):
        return ApiError(str(exc.detail), status=403, error_type="permission_error", code=_drf_code(exc, None))
    if isinstance(exc, drf.NotFound):
        return ApiError(str(exc.detail), status=404, code=_drf_code(exc, "not_found"))
    if isinstance(exc, drf.MethodNotAllowed):
        return ApiError(str(exc.detail), status=405, code="method_not_allowed")
    if isinstance(exc, drf.ValidationError | drf.ParseError):
        param, message = _first_message(exc.detail)
        return ApiError(message, param=param, code="invalid_value")
    return ApiError(str(exc.detail), status=exc.status_code, code=_drf_code(exc, exc.default_code))


def to_api_error(exc: BaseException, *, request_id: str) -> ApiError:
    """Classify any exception. Unknown ones are logged (with the request id the client is given) and become
    a 500 that names that request id and nothing else."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, drf.APIException):
        return _from_drf(exc)
    if isinstance(exc, DataError):
        # A value the database cannot hold (a number past its column, a string it refuses): the input's
        # fault, whichever check missed it. Logged, so the missing check gets written.
        logger.warning("A request value did not fit the database (request %s): %s", request_id, type(exc).__name__)
        return ApiError("A value in the request is out of range or not allowed.", code="invalid_value")
    if isinstance(exc, OperationalError | InterfaceError):
        # The database is unreachable (down, restarting, or its pool exhausted): the request may succeed if
        # retried, and the client is told so. The error's class only: a message may quote the server.
        logger.warning("The database is unavailable (request %s): %s", request_id, type(exc).__name__)
        return ApiError("The service is temporarily unavailable (its database cannot be reached). Please retry "
                        "shortly.", status=503, error_type="server_error", code="service_unavailable",
                        headers={"Retry-After": "1"})
    if isinstance(exc, RequestDataTooBig):
        return ApiError("The request body is too large.", status=413, code="request_too_large")
    if isinstance(exc, PermissionDenied):
        return ApiError("Permission denied.", status=403, error_type="permission_error")
    if isinstance(exc, Http404):
        return ApiError("Not found.", status=404, code="not_found")
    logger.error("Unhandled error in request %s", request_id, exc_info=exc)
    return server_error(request_id=request_id)


def error_response(error: ApiError, *, request_id: str) -> HttpResponse:
    """The JSON rendering: the error object with its status and headers, and the request id."""
    response = HttpResponse(orjson.dumps(error.body()), status=error.status, content_type="application/json")
    for name, value in error.headers.items():
        response[name] = value
    response["x-request-id"] = request_id
    return response
