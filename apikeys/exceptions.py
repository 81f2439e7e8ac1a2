"""Errors of key authentication and authorization; the API layer maps them to OpenAI error objects."""

from __future__ import annotations


class ApiKeyError(Exception):
    """Base class; `message` is safe to show to the caller and never contains a secret."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidApiKey(ApiKeyError):
    """Missing, malformed, unknown, revoked, expired or rotated-out key: 401 invalid_api_key."""


class MissingScope(ApiKeyError):
    def __init__(self, scope: str) -> None:
        super().__init__(f"This API key does not have the '{scope}' scope required for this endpoint.")
        self.scope = scope


class ModelNotAllowed(ApiKeyError):
    def __init__(self, model: str) -> None:
        super().__init__(f"This API key is not allowed to use the model '{model}'.")
        self.model = model
