"""The ASGI handler of the API path: Django's ASGIHandler with no middleware and JSON-only failures."""

from __future__ import annotations

import logging

import orjson
from django.core.exceptions import RequestDataTooBig
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpResponse

from platform_site.middleware import new_request_id

logger = logging.getLogger(__name__)


def _json_error(status: int, message: str, error_type: str, code: str) -> HttpResponse:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    response = HttpResponse(orjson.dumps(body), status=status, content_type="application/json")
    response["x-request-id"] = new_request_id()
    return response


class ApiHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        # What BaseHandler.load_middleware builds for an empty MIDDLEWARE list.
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        self._middleware_chain = convert_exception_to_response(self._get_response_async)

    def create_request(self, scope, body_file):  # type: ignore[no-untyped-def]
        try:
            return self.request_class(scope, body_file), None
        except UnicodeDecodeError:
            return None, _json_error(400, "The request could not be decoded.", "invalid_request_error", "bad_request")
        except RequestDataTooBig:
            return None, _json_error(413, "The request body is too large.", "invalid_request_error",
                                     "request_too_large")

    def handle_uncaught_exception(self, request, resolver, exc_info):  # type: ignore[no-untyped-def]
        # Views map their own errors; this is the last resort for failures outside them. Never a traceback.
        logger.error("Unhandled error on the API path", exc_info=exc_info)
        return _json_error(500, "The server had an error while processing your request.", "server_error",
                           "server_error")
