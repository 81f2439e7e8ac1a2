"""Webhook ingress, the synchronous part: which hook a signed request is for, the session of its sender, and
the record of each delivery. The surface (completions/api/hooks.py) runs the turn and the callback.

A hook's name is unique in its project, not across the platform, so one tenant's names are no obstacle to
another's: a request is matched to the hook of that name whose secret signed it. An unknown name and a bad
signature are answered alike, so a name reveals nothing about who has it.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

import orjson
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from agents.connectors import sign, verify
from agents.models import Hook, HookDelivery
from agents.runtime import AgentSpec, agent_spec
from apikeys.auth import AuthenticatedKey, key_for_service
from platform_site.crypto import decrypt_secret
from platform_site.kernel.errors import ApiError

# The most hooks of one name a request is checked against (one per project that chose the name).
_MAX_CANDIDATES = 50
SIGNATURE_TOLERANCE = 300


@dataclass(frozen=True, slots=True)
class HookTarget:
    # The request's signature (the HMAC the header carried): what makes a repeat of it a replay.
    signature: str
    id: int
    public_id: str
    name: str
    organization_id: int
    project_id: int
    mode: str
    callback_url: str
    secret: str
    key: AuthenticatedKey
    agent: AgentSpec


def hook_for_request(*, name: str, signature: str | None, body: bytes) -> HookTarget | None:
    """The hook of this name whose secret signed `body` within the last five minutes, or None."""
    if not signature or len(signature) > 512:
        return None
    now = time.time()
    hooks = Hook.objects.filter(name=name).select_related("agent", "api_key").order_by("pk")[:_MAX_CANDIDATES]
    for hook in hooks:
        secret = decrypt_secret(hook.secret_encrypted)
        if verify(secret, signature, body, now=now, tolerance=SIGNATURE_TOLERANCE):
            signed_at = int(next(part for part in signature.split(",") if part.strip().startswith("t="))
                            .strip()[2:])
            return HookTarget(
                signature=sign(secret, signed_at, body).rpartition("v1=")[2], id=hook.pk,
                public_id=hook.public_id, name=hook.name, organization_id=hook.organization_id,
                project_id=hook.project_id, mode=hook.mode, callback_url=hook.callback_url, secret=secret,
                key=key_for_service(hook.api_key.public_id), agent=agent_spec(hook.agent),
            )
    return None


class Replayed(ApiError):
    status = 409
    code = "replayed_request"


def delivery_start(*, hook: HookTarget, sender: str) -> str:
    """Record an accepted request, refusing one whose signature was seen before (a replay)."""
    try:
        with transaction.atomic():
            delivery = HookDelivery.objects.create(
                hook_id=hook.id, organization_id=hook.organization_id, sender=sender[:200],
                signature=hook.signature, status=HookDelivery.Status.RUNNING, created_at=timezone.now(),
            )
    except IntegrityError:
        raise Replayed("This signed request was already received; sign each request anew.") from None
    return delivery.public_id


def delivery_session(*, delivery_id: str, session_id: str) -> None:
    HookDelivery.objects.filter(public_id=delivery_id).update(session_id=session_id)


def delivery_answered(*, delivery_id: str) -> None:
    HookDelivery.objects.filter(public_id=delivery_id).update(status=HookDelivery.Status.ANSWERED,
                                                              finished_at=timezone.now())


def delivery_failed(*, delivery_id: str, error: str) -> None:
    HookDelivery.objects.filter(public_id=delivery_id).update(status=HookDelivery.Status.FAILED,
                                                              last_error=error[:300], finished_at=timezone.now())


def delivery_pending(*, delivery_id: str, reply: dict[str, object], next_attempt_at: dt.datetime) -> None:
    """The turn has answered; its reply waits for the callback receiver."""
    HookDelivery.objects.filter(public_id=delivery_id).update(
        status=HookDelivery.Status.PENDING, reply_json=orjson.dumps(reply).decode(), next_attempt_at=next_attempt_at,
    )


def delivery_attempted(
    *, delivery_id: str, delivered: bool, status_code: int | None, error: str, next_attempt_at: dt.datetime | None
) -> None:
    """One callback attempt: delivered (the reply is dropped), to be retried at `next_attempt_at`, or given up
    (`next_attempt_at` None)."""
    fields: dict[str, object] = {"last_status_code": status_code, "last_error": error[:300],
                                 "attempts": F("attempts") + 1}
    if delivered:
        fields.update(status=HookDelivery.Status.DELIVERED, reply_json="", next_attempt_at=None,
                      finished_at=timezone.now())
    elif next_attempt_at is None:
        fields.update(status=HookDelivery.Status.FAILED, next_attempt_at=None, finished_at=timezone.now())
    else:
        fields.update(next_attempt_at=next_attempt_at)
    HookDelivery.objects.filter(public_id=delivery_id).update(**fields)


# A pending delivery whose next attempt is this late has lost the process that was to make it.
LEFT_BEHIND_AFTER = dt.timedelta(minutes=2)


@dataclass(frozen=True, slots=True)
class LeftBehind:
    delivery_id: str
    url: str
    secret: str
    reply: dict[str, Any]
    attempts: int


def deliveries_left_behind(*, limit: int = 500) -> list[LeftBehind]:
    """Callback deliveries still pending long after their next attempt was due, with what retrying needs."""
    rows = (
        HookDelivery.objects.filter(status=HookDelivery.Status.PENDING,
                                    next_attempt_at__lt=timezone.now() - LEFT_BEHIND_AFTER)
        .select_related("hook").order_by("next_attempt_at")[:limit]
    )
    return [
        LeftBehind(delivery_id=row.public_id, url=row.hook.callback_url,
                   secret=decrypt_secret(row.hook.secret_encrypted), reply=orjson.loads(row.reply_json or "{}"),
                   attempts=row.attempts)
        for row in rows
    ]
