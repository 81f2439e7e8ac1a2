"""Conversation state a tenant asked Keyway to keep: stored responses (`/v1/responses` with `store`) and
conversations (`/v1/conversations`) with their items.

Its own app because it is its own kind of data: tenant-owned, kept for a retention period and purged, read by
every surface that continues a conversation (the REST API now, agents later), and never needed to call a
model. It imports nothing above tenancy and keys.

Items and response bodies are JSON kept as text (orjson in, orjson out) rather than in JSONField: PostgreSQL's
jsonb refuses a `\\u0000` escape that a prompt may well contain, and the text is written and read whole anyway.
"""

from __future__ import annotations

from django.db import models

from apikeys.models import ApiKey
from platform_site.models import Organization, Project


class Conversation(models.Model):
    id = models.CharField(primary_key=True, max_length=64)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    metadata_json = models.TextField(default="{}")
    # Items and their bytes, kept with the row so that a full conversation is refused without a count.
    item_count = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["organization", "created_at"])]

    def __str__(self) -> str:
        return self.id


class ConversationItem(models.Model):
    """One item of a conversation. The auto-increment key is the conversation's order."""

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="items")
    item_id = models.CharField(max_length=64)
    body_json = models.TextField()
    size = models.PositiveIntegerField()
    created_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["conversation", "item_id"], name="conversation_item_id_unique")
        ]

    def __str__(self) -> str:
        return self.item_id


class StoredResponse(models.Model):
    """A Responses API response: its Response object as last rendered, its own input items, and the log of
    how its output arrived (which replays its stream, with the same sequence numbers, to a client resuming it).

    A background response is written when it is admitted and updated as it runs; any other stored response is
    written once, before its client is told it completed."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        IN_PROGRESS = "in_progress"
        COMPLETED = "completed"
        INCOMPLETE = "incomplete"
        FAILED = "failed"
        CANCELLED = "cancelled"

    id = models.CharField(primary_key=True, max_length=64)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # Not a foreign key: a predecessor may be deleted, which ends the chain there.
    previous_response_id = models.CharField(max_length=64, blank=True, default="")
    conversation = models.ForeignKey(Conversation, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices)
    background = models.BooleanField(default=False)
    body_json = models.TextField()
    input_json = models.TextField(default="[]")
    log_json = models.TextField(default="[]")
    # Bytes of its input items and its body (which holds its output): what continuing from it reads.
    size = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField()
    # Moved by a background response's runner at least every few seconds while it runs: one left behind by
    # a worker that died is recognised by it.
    updated_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["organization", "created_at"]), models.Index(fields=["created_at"])]

    def __str__(self) -> str:
        return self.id
