"""The error value every API of Keyway answers with: OpenAI's error object and its HTTP status.

Each surface maps its own exceptions to it (completions.errors for the OpenAI-compatible API, billing.errors
for the billing API); the value itself lives here, below both, so there is one definition of the shape.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error the API answers with: status plus the four fields of OpenAI's error object."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = headers or {}

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
