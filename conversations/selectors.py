"""Reads of stored responses and conversations. Every read takes the organization: an id from a request
finds nothing of another tenant's, which then looks exactly like an id that never existed."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings
from django.db import connection
from django.utils import timezone

from conversations.models import Conversation, ConversationItem, StoredResponse


def retention_cutoff() -> dt.datetime:
    return timezone.now() - dt.timedelta(days=settings.KEYWAY_RESPONSES_RETENTION_DAYS)


def response_get(*, organization_id: int, response_id: str) -> StoredResponse | None:
    """A stored response within its retention period, or None."""
    return (
        StoredResponse.objects.filter(organization_id=organization_id, id=response_id,
                                      created_at__gte=retention_cutoff())
        .first()
    )


@dataclass(slots=True)
class Context:
    """Earlier items a new response reads, oldest first. `complete` is False when the byte budget cut off
    older ones (or the chain was longer than KEYWAY_RESPONSES_MAX_CHAIN)."""

    items: list[dict[str, Any]]
    complete: bool


# The chain of predecessors, newest first, found in one query on SQLite and PostgreSQL alike. Each step stays
# within the organization, so a chain can never cross into another tenant's responses.
_CHAIN_SQL = """
WITH RECURSIVE chain(id, previous_response_id, size, depth) AS (
    SELECT id, previous_response_id, size, 0 FROM {table}
    WHERE id = %s AND organization_id = %s AND created_at >= %s
    UNION ALL
    SELECT r.id, r.previous_response_id, r.size, chain.depth + 1 FROM {table} r
    JOIN chain ON r.id = chain.previous_response_id
    WHERE r.organization_id = %s AND r.created_at >= %s AND chain.depth + 1 < %s
)
SELECT id, size FROM chain ORDER BY depth
"""


def response_chain_context(*, organization_id: int, response_id: str, max_bytes: int) -> Context:
    """The input and output items of `response_id` and of its predecessors, as far back as `max_bytes` of
    them go."""
    cutoff = retention_cutoff()
    limit = settings.KEYWAY_RESPONSES_MAX_CHAIN
    with connection.cursor() as cursor:
        cursor.execute(_CHAIN_SQL.format(table=StoredResponse._meta.db_table),
                       [response_id, organization_id, cutoff, organization_id, cutoff, limit])
        chain = cursor.fetchall()
    chosen: list[str] = []
    total = 0
    complete = len(chain) < limit
    for row_id, size in chain:
        if total + size > max_bytes:
            complete = False
            break
        total += size
        chosen.append(row_id)
    found = StoredResponse.objects.filter(id__in=chosen, organization_id=organization_id)
    rows = {row_id: (input_json, body_json)
            for row_id, input_json, body_json in found.values_list("id", "input_json", "body_json")}
    items: list[dict[str, Any]] = []
    for row_id in reversed(chosen):
        if row_id not in rows:
            continue  # deleted a moment ago
        input_json, body_json = rows[row_id]
        items.extend(orjson.loads(input_json))
        items.extend(orjson.loads(body_json).get("output") or [])
    return Context(items=items, complete=complete)


def conversation_get(*, organization_id: int, conversation_id: str) -> Conversation | None:
    return Conversation.objects.filter(organization_id=organization_id, id=conversation_id).first()


def conversation_context(*, conversation: Conversation, max_bytes: int) -> Context:
    """The conversation's latest items, oldest first, as far back as `max_bytes` of them go."""
    chosen: list[int] = []
    total = 0
    complete = True
    for pk, size in conversation.items.order_by("-pk").values_list("pk", "size").iterator(chunk_size=2000):
        if total + size > max_bytes:
            complete = False
            break
        total += size
        chosen.append(pk)
    bodies = dict(ConversationItem.objects.filter(pk__in=chosen).values_list("pk", "body_json"))
    return Context(items=[orjson.loads(bodies[pk]) for pk in sorted(bodies)], complete=complete)


def conversation_item_get(*, conversation: Conversation, item_id: str) -> dict[str, Any] | None:
    body = conversation.items.filter(item_id=item_id).values_list("body_json", flat=True).first()
    return orjson.loads(body) if body is not None else None


def conversation_items_page(
    *, conversation: Conversation, limit: int, ascending: bool, after: str | None
) -> tuple[list[dict[str, Any]], bool] | None:
    """(a page of items, whether more follow); None when `after` names no item of the conversation."""
    rows = conversation.items.all()
    if after is not None:
        anchor = conversation.items.filter(item_id=after).values_list("pk", flat=True).first()
        if anchor is None:
            return None
        rows = rows.filter(pk__gt=anchor) if ascending else rows.filter(pk__lt=anchor)
    bodies = list(rows.order_by("pk" if ascending else "-pk").values_list("body_json", flat=True)[: limit + 1])
    return [orjson.loads(body) for body in bodies[:limit]], len(bodies) > limit
