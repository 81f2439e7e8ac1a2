"""Server-side chat sessions: what a turn reads (the messages so far) and what it writes (its own messages
and the answer). Every read takes the organization and the project: a session id from another tenant, or
from another project of the same one, finds nothing, which looks exactly like an id that never existed.

Synchronous, as services are; the API path calls them through `orm()`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
from django.conf import settings
from django.db import transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from agents.exceptions import SessionFull, SessionNotFound
from agents.models import ChatSession, SessionMessage, new_session_id


def _cutoff() -> dt.datetime:
    return timezone.now() - dt.timedelta(days=settings.KEYWAY_SESSIONS_RETENTION_DAYS)


def sessions_of(*, organization_id: int, project_id: int) -> QuerySet[ChatSession]:
    """The project's sessions still within their retention period."""
    return ChatSession.objects.filter(organization_id=organization_id, project_id=project_id,
                                      updated_at__gte=_cutoff())


def session_get(*, organization_id: int, project_id: int, session_id: str) -> ChatSession:
    session = sessions_of(organization_id=organization_id, project_id=project_id).filter(id=session_id).first()
    if session is None:
        raise SessionNotFound(f"No session found with id '{session_id}'.", param="session_id")
    return session


def session_messages(*, session: ChatSession) -> list[dict[str, Any]]:
    """The session's messages, oldest first, as the model reads them."""
    bodies = SessionMessage.objects.filter(session=session).order_by("pk").values_list("body_json", flat=True)
    return [orjson.loads(body) for body in bodies]


def session_open(
    *, organization_id: int, project_id: int, api_key_id: int | None, agent_slug: str = "",
    hook_id: int | None = None, external_id: str = "", session_id: str | None = None,
) -> ChatSession:
    now = timezone.now()
    return ChatSession.objects.create(
        id=session_id or new_session_id(), organization_id=organization_id, project_id=project_id,
        api_key_id=api_key_id, agent_slug=agent_slug,
        hook_id=hook_id, external_id=external_id, created_at=now, updated_at=now,
    )


def session_for_sender(
    *, organization_id: int, project_id: int, api_key_id: int, agent_slug: str, hook_id: int, sender: str
) -> ChatSession:
    """The session a webhook's sender talks in: theirs if it is still kept, else a new one (a session past
    its retention is deleted first, so the sender starts afresh rather than where they left off long ago)."""
    with transaction.atomic():
        existing = ChatSession.objects.select_for_update().filter(hook_id=hook_id, external_id=sender).first()
        if existing is not None:
            if existing.updated_at >= _cutoff():
                return existing
            existing.delete()
        return session_open(organization_id=organization_id, project_id=project_id, api_key_id=api_key_id,
                            agent_slug=agent_slug, hook_id=hook_id, external_id=sender)


def session_check_room(*, session: ChatSession, adding: int) -> None:
    """Refuse a turn, before any model is called, whose own messages would take the session past its size."""
    if session.size + adding > settings.KEYWAY_SESSION_MAX_BYTES:
        raise SessionFull(
            f"The session would hold more than {settings.KEYWAY_SESSION_MAX_BYTES} bytes of messages; delete it or "
            "start a new one.", param="session_id",
        )


def session_append(*, session_id: str, messages: list[dict[str, Any]]) -> None:
    """Add a turn's messages at the end of the session (if it still exists: a session deleted while its turn
    ran stays deleted)."""
    if not messages:
        return
    now = timezone.now()
    rows = []
    for message in messages:
        body = orjson.dumps(message).decode()
        rows.append(SessionMessage(session_id=session_id, body_json=body, size=len(body), created_at=now))
    with transaction.atomic():
        updated = ChatSession.objects.filter(id=session_id).update(
            message_count=F("message_count") + len(rows), size=F("size") + sum(row.size for row in rows),
            updated_at=now,
        )
        if updated:
            SessionMessage.objects.bulk_create(rows)


def session_delete(*, session: ChatSession) -> None:
    session.delete()


def sessions_purge(*, batch: int = 1000) -> int:
    """Delete sessions idle past their retention period, a batch at a time. Returns how many."""
    cutoff = _cutoff()
    deleted = 0
    while True:
        ids = list(ChatSession.objects.filter(updated_at__lt=cutoff).values_list("id", flat=True)[:batch])
        if not ids:
            return deleted
        ChatSession.objects.filter(id__in=ids).delete()
        deleted += len(ids)


def active_session_count(*, within: dt.timedelta, organization_id: int | None = None) -> int:
    """Sessions with a turn in the last `within` (every organization's, or one's)."""
    query = Q(updated_at__gte=timezone.now() - within)
    if organization_id is not None:
        query &= Q(organization_id=organization_id)
    return ChatSession.objects.filter(query).count()


def session_save_turn(
    *, session_id: str, new: bool, organization_id: int, project_id: int, api_key_id: int | None,
    agent_slug: str, messages: list[dict[str, Any]],
) -> None:
    """Keep a finished turn: a session the turn opened is created with it (so a turn that failed leaves no
    empty session behind); an existing one is added to."""
    with transaction.atomic():
        if new:
            session_open(organization_id=organization_id, project_id=project_id, api_key_id=api_key_id,
                         agent_slug=agent_slug, session_id=session_id)
        session_append(session_id=session_id, messages=messages)


def sessions_page(
    *, organization_id: int, project_id: int, limit: int, ascending: bool, after: str | None
) -> tuple[list[ChatSession], bool] | None:
    """A page of the project's sessions by creation time (None: `after` is not one of them)."""
    sessions = sessions_of(organization_id=organization_id, project_id=project_id)
    ordering = ("created_at", "id") if ascending else ("-created_at", "-id")
    sessions = sessions.order_by(*ordering)
    if after:
        cursor = sessions.filter(id=after).values("created_at", "id").first()
        if cursor is None:
            return None
        created, pk = cursor["created_at"], cursor["id"]
        if ascending:
            sessions = sessions.filter(Q(created_at__gt=created) | Q(created_at=created, id__gt=pk))
        else:
            sessions = sessions.filter(Q(created_at__lt=created) | Q(created_at=created, id__lt=pk))
    rows = list(sessions[: limit + 1])
    return rows[:limit], len(rows) > limit
