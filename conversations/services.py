"""Writes of stored responses and conversations. Each is one transaction; callers on the async API path run
them through platform_site.kernel.orm.orm."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from conversations.exceptions import ConversationFull, DuplicateItemId
from conversations.models import Conversation, ConversationItem, StoredResponse
from conversations.selectors import retention_cutoff

Status = StoredResponse.Status
RUNNING = (Status.QUEUED, Status.IN_PROGRESS)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _append_items(conversation_id: str, items: list[dict[str, Any]], *, param: str | None) -> None:
    """Add items at the end of a conversation (inside the caller's transaction), refusing a duplicate id
    or more items than a conversation may hold. The row is locked so that two writers keep the count true."""
    if not items:
        return
    conversation = Conversation.objects.select_for_update().filter(id=conversation_id).first()
    if conversation is None:
        return  # deleted meanwhile: nothing left to add to
    if conversation.item_count + len(items) > settings.KEYWAY_CONVERSATION_MAX_ITEMS:
        raise ConversationFull(
            f"The conversation would hold more than {settings.KEYWAY_CONVERSATION_MAX_ITEMS} items; delete some "
            "or start a new conversation.", param=param,
        )
    ids = [item["id"] for item in items]
    taken = set(conversation.items.filter(item_id__in=ids).values_list("item_id", flat=True))
    if taken or len(set(ids)) != len(ids):
        shown = next(iter(taken)) if taken else next(i for i in ids if ids.count(i) > 1)
        raise DuplicateItemId(f"An item with id '{shown}' already exists in the conversation.", param=param)
    now = timezone.now()
    rows = []
    for item in items:
        body = _dumps(item)
        rows.append(ConversationItem(conversation_id=conversation_id, item_id=item["id"], body_json=body,
                                     size=len(body), created_at=now))
    ConversationItem.objects.bulk_create(rows)
    Conversation.objects.filter(id=conversation_id).update(item_count=F("item_count") + len(items))


def conversation_create(
    *, conversation_id: str, organization_id: int, project_id: int | None, metadata: dict[str, str],
    items: list[dict[str, Any]],
) -> Conversation:
    with transaction.atomic():
        conversation = Conversation.objects.create(
            id=conversation_id, organization_id=organization_id, project_id=project_id,
            metadata_json=_dumps(metadata), created_at=timezone.now(),
        )
        _append_items(conversation.id, items, param="items")
    return conversation


def conversation_set_metadata(*, conversation: Conversation, metadata: dict[str, str]) -> Conversation:
    conversation.metadata_json = _dumps(metadata)
    conversation.save(update_fields=["metadata_json"])
    return conversation


def conversation_delete(*, conversation: Conversation) -> None:
    conversation.delete()


def conversation_items_add(*, conversation: Conversation, items: list[dict[str, Any]]) -> None:
    with transaction.atomic():
        _append_items(conversation.id, items, param="items")


def conversation_item_delete(*, conversation: Conversation, item_id: str) -> bool:
    with transaction.atomic():
        deleted, _ = conversation.items.filter(item_id=item_id).delete()
        if deleted:
            Conversation.objects.filter(id=conversation.id).update(item_count=F("item_count") - deleted)
    return bool(deleted)


@dataclass(slots=True)
class ResponseRecord:
    """What is stored of a response."""

    response_id: str
    organization_id: int
    project_id: int | None
    api_key_id: int | None
    previous_response_id: str
    conversation_id: str | None
    background: bool
    body: dict[str, Any]
    input_items: list[dict[str, Any]]
    log: list[Any]


def _fields(record: ResponseRecord, now: dt.datetime) -> dict[str, Any]:
    input_json = _dumps(record.input_items)
    body_json = _dumps(record.body)
    # What continuing from it reads: its input and its output, which the body holds (with a little more).
    return {
        "status": record.body["status"], "body_json": body_json, "log_json": _dumps(record.log),
        "input_json": input_json, "size": len(input_json) + len(body_json), "updated_at": now,
    }


def _row(record: ResponseRecord, *, status: str, now: dt.datetime) -> StoredResponse:
    fields = _fields(record, now)
    fields["status"] = status
    return StoredResponse(
        id=record.response_id, organization_id=record.organization_id, project_id=record.project_id,
        api_key_id=record.api_key_id, previous_response_id=record.previous_response_id,
        conversation_id=record.conversation_id, background=record.background,
        created_at=dt.datetime.fromtimestamp(record.body["created_at"], tz=dt.UTC), **fields,
    )


def _insert(record: ResponseRecord, *, status: str, now: dt.datetime) -> None:
    _row(record, status=status, now=now).save(force_insert=True)


def responses_insert(records: list[ResponseRecord]) -> None:
    """Write finished responses that add nothing to a conversation, in one INSERT (the group commit of the
    API path: completions.api.responses)."""
    now = timezone.now()
    StoredResponse.objects.bulk_create([_row(record, status=record.body["status"], now=now) for record in records])


def response_save(record: ResponseRecord, *, conversation_items: list[dict[str, Any]] | None = None) -> bool:
    """Write a response (a new one, or the last state of a background one) and add `conversation_items` to its
    conversation, in one transaction. A background response cancelled meanwhile stays cancelled (with the
    output it made); one deleted meanwhile, or already failed as lost, is not written: returns False."""
    now = timezone.now()
    if not record.background and not (record.conversation_id and conversation_items):
        # The common case, on the hot path: one INSERT, committed by itself (one round trip, no transaction).
        _insert(record, status=record.body["status"], now=now)
        return True
    with transaction.atomic():
        if record.background:
            row = StoredResponse.objects.select_for_update().filter(id=record.response_id).first()
            if row is None or row.status not in (*RUNNING, Status.CANCELLED):
                return False
            if row.status == Status.CANCELLED:
                record.body["status"] = Status.CANCELLED
        if record.background:
            StoredResponse.objects.filter(id=record.response_id).update(**_fields(record, now))
        else:
            _insert(record, status=record.body["status"], now=now)
        if record.conversation_id and conversation_items:
            _append_items(record.conversation_id, conversation_items, param="input")
    return True


def conversation_append(*, conversation_id: str, items: list[dict[str, Any]]) -> None:
    """Add a response's items to its conversation when the response itself is not stored."""
    with transaction.atomic():
        _append_items(conversation_id, items, param="input")


def response_start_background(record: ResponseRecord) -> None:
    """The first write of a background response: queued, before its client is told so."""
    _insert(record, status=record.body["status"], now=timezone.now())


def response_progress(*, response_id: str, status: str, log: list[Any] | None) -> bool:
    """A running background response's progress (and heartbeat). False: it was cancelled or deleted."""
    fields: dict[str, Any] = {"status": status, "updated_at": timezone.now()}
    if log is not None:
        fields["log_json"] = _dumps(log)
    return bool(StoredResponse.objects.filter(id=response_id, status__in=RUNNING).update(**fields))


def _with_status(row: StoredResponse, status: str, **changes: Any) -> None:
    body = orjson.loads(row.body_json)
    body.update(status=status, **changes)
    row.status = status
    row.body_json = _dumps(body)
    row.updated_at = timezone.now()


def response_cancel(*, row: StoredResponse) -> StoredResponse:
    """Mark a running background response cancelled; its runner sees it at its next write, stops, and
    settles what was produced. A finished one is returned as it is."""
    with transaction.atomic():
        locked = StoredResponse.objects.select_for_update().get(pk=row.pk)
        if locked.status in RUNNING:
            _with_status(locked, Status.CANCELLED)
            locked.save(update_fields=["status", "body_json", "updated_at"])
    return locked


def response_fail_if_stale(*, row: StoredResponse) -> StoredResponse:
    """A running response whose runner stopped writing (its worker died) is failed, once."""
    stale_before = timezone.now() - dt.timedelta(seconds=settings.KEYWAY_RESPONSES_STALE_SECONDS)
    if row.status not in RUNNING or row.updated_at >= stale_before:
        return row
    with transaction.atomic():
        locked = StoredResponse.objects.select_for_update().get(pk=row.pk)
        if locked.status in RUNNING and locked.updated_at < stale_before:
            _with_status(locked, Status.FAILED, error={
                "code": "server_error", "message": "The server running this response stopped before it finished.",
            })
            locked.save(update_fields=["status", "body_json", "updated_at"])
    return locked


def response_delete(*, row: StoredResponse) -> None:
    row.delete()


def responses_purge(*, batch: int = 1000) -> int:
    """Delete stored responses past their retention period, a batch at a time. Returns how many."""
    cutoff = retention_cutoff()
    total = 0
    while True:
        ids = list(StoredResponse.objects.filter(created_at__lt=cutoff).values_list("id", flat=True)[:batch])
        if not ids:
            return total
        total += StoredResponse.objects.filter(id__in=ids).delete()[0]
