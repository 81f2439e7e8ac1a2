"""Errors of metering and limits; the API layer maps them to OpenAI error objects."""

from __future__ import annotations


class RateLimitExceeded(Exception):
    """429 rate_limit_exceeded; `kind` is "requests" or "tokens", as OpenAI's error type says."""

    def __init__(self, *, kind: str, limit: int, retry_after: int, headers: dict[str, str]) -> None:
        unit = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
        super().__init__(f"Rate limit reached on {unit}: Limit {limit}. Please try again in {retry_after}s.")
        self.message = str(self)
        self.kind = kind
        self.retry_after = retry_after
        self.headers = headers
