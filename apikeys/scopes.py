"""The scopes an API key may hold. A key holds any subset, so read-only keys exist."""

from __future__ import annotations

MODELS_READ = "models:read"
CHAT = "chat"
EMBEDDINGS = "embeddings"
RESPONSES = "responses"
REALTIME = "realtime"
USAGE_READ = "usage:read"
# Server-side chat sessions: list, read and delete them (continuing one by `session_id` needs only `chat`).
SESSIONS = "sessions"
# Run the connectors (server-side tools) an agent calls: only those the key was given, one by one. Never
# part of "All": a connector reaches into the organization's own systems (seed 000's warning).
CONNECTORS = "connectors"
# The management API (/v1/organization/…). Held by admin keys alone: an admin key calls no model, and a
# project key manages nothing.
ADMIN = "admin"

# The "All" permission: every model endpoint. Reading the organization's usage and billing is not a model
# endpoint, so a key gets it only where it is asked for (a backend's key that leaks must not show the
# organization's spend).
ALL_SCOPES: tuple[str, ...] = (MODELS_READ, CHAT, EMBEDDINGS, RESPONSES, REALTIME, SESSIONS)
# What a key that is not an admin key may hold.
KEY_SCOPES: tuple[str, ...] = (*ALL_SCOPES, USAGE_READ, CONNECTORS)
KNOWN_SCOPES: tuple[str, ...] = (*KEY_SCOPES, ADMIN)
READ_ONLY_SCOPES: tuple[str, ...] = (MODELS_READ, USAGE_READ)
SCOPE_CHOICES = [(scope, scope) for scope in KEY_SCOPES]
# What each scope opens, for the dashboard's "Restricted" permission picker.
SCOPE_LABELS: dict[str, str] = {
    MODELS_READ: "Models (list and retrieve)",
    CHAT: "Chat completions",
    EMBEDDINGS: "Embeddings",
    RESPONSES: "Responses",
    REALTIME: "Realtime",
    SESSIONS: "Sessions (list, read, delete)",
    USAGE_READ: "Usage (read)",
    CONNECTORS: "Connectors (agents' server-side tools, as given to the key)",
}


def permissions_label(scopes: list[str] | frozenset[str] | tuple[str, ...]) -> str:
    """How the dashboard names a key's scopes: All, All + usage, Read only, Admin, or Restricted."""
    chosen = set(scopes)
    if chosen == {ADMIN}:
        return "Admin"
    if chosen == set(ALL_SCOPES):
        return "All"
    if chosen == {*ALL_SCOPES, USAGE_READ}:
        return "All + usage"
    if chosen and chosen <= set(READ_ONLY_SCOPES):
        return "Read only"
    return "Restricted"
