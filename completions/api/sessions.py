"""The sessions API: `/v1/sessions` and `/v1/sessions/{id}` (scope `sessions`). A session belongs to a
project: a key reads and deletes its own project's, and another project's or tenant's id is a 404 like an id
that never existed. Continuing a session is done on /v1/chat/completions with `session_id`."""

from __future__ import annotations

from typing import Any

from django.http import HttpResponseBase

from agents import sessions
from agents.models import ChatSession
from apikeys.scopes import SESSIONS
from completions.api.http import ApiRequest, api_endpoint, json_body, json_response
from completions.api.responses import item_list, list_params
from platform_site.kernel.errors import ApiError
from platform_site.kernel.orm import orm


def _object(session: ChatSession, messages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": session.id,
        "object": "chat.session",
        "created_at": int(session.created_at.timestamp()),
        "updated_at": int(session.updated_at.timestamp()),
        "model": f"agent:{session.agent_slug}" if session.agent_slug else None,
        "message_count": session.message_count,
        "bytes": session.size,
    }
    if messages is not None:
        body["messages"] = messages
    return body


def _project_id(request: ApiRequest) -> int:
    project_id = request.api_key.project_id
    if project_id is None:
        raise ApiError("Sessions belong to a project; use a project key.", status=403, code="permission_denied")
    return project_id


@api_endpoint(methods=("GET", "POST"), scope=SESSIONS)
async def sessions_list(request: ApiRequest) -> HttpResponseBase:
    key = request.api_key
    project_id = _project_id(request)
    if request.method == "POST":
        # An empty session, for a client that wants the id before its first turn (a plain model's turn
        # continues a session only when it names one).
        body = json_body(request)
        for name in body:
            raise ApiError(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")
        session = await orm(sessions.session_open, organization_id=key.organization_id, project_id=project_id,
                            api_key_id=key.id)
        return json_response(_object(session))
    limit, ascending, after = list_params(request)
    page = await orm(sessions.sessions_page, organization_id=key.organization_id, project_id=project_id,
                     limit=limit, ascending=ascending, after=after)
    if page is None:
        raise ApiError(f"No session found with id '{(after or '')[:64]}'.", status=404, param="after",
                       code="not_found")
    rows, has_more = page
    return json_response(item_list([_object(session) for session in rows], has_more=has_more))


@api_endpoint(methods=("GET", "DELETE"), scope=SESSIONS)
async def session_detail(request: ApiRequest, session_id: str) -> HttpResponseBase:
    key = request.api_key
    session = await orm(sessions.session_get, organization_id=key.organization_id,
                        project_id=_project_id(request), session_id=session_id[:64])
    if request.method == "DELETE":
        deleted_id = session.id  # the model forgets its key once deleted
        await orm(sessions.session_delete, session=session)
        return json_response({"id": deleted_id, "object": "chat.session.deleted", "deleted": True})
    messages = await orm(sessions.session_messages, session=session)
    return json_response(_object(session, messages))
