"""The scopes an API key may hold. A key holds any subset, so read-only keys exist."""

from __future__ import annotations

MODELS_READ = "models:read"
CHAT = "chat"
EMBEDDINGS = "embeddings"
RESPONSES = "responses"
REALTIME = "realtime"
USAGE_READ = "usage:read"

ALL_SCOPES: tuple[str, ...] = (MODELS_READ, CHAT, EMBEDDINGS, RESPONSES, REALTIME, USAGE_READ)
SCOPE_CHOICES = [(scope, scope) for scope in ALL_SCOPES]
