"""Webhook ingress, POST /hooks/<name>: signed turns of an agent in a session per sender, answered in the
response or POSTed to a callback URL with retries; the scripted model and the callback receiver are real HTTP
servers on loopback."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.core.management import call_command
from django.db import connections
from django.utils import timezone

from agents.connectors import sign, verify
from agents.models import Agent, ChatSession, HookDelivery
from agents.services import hook_create
from billing import metering
from billing.models import UsageEvent
from completions.services import provider_upsert_openai_compatible
from platform_site.access import system_actor
from platform_site.models import Organization
from tests.agents import scripted_model
from tests.agents.test_turns import _raw_client

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
async def model() -> AsyncIterator[Any]:
    runner, port, app = await scripted_model.start()
    await sync_to_async(provider_upsert_openai_compatible)(
        name="scripted", base_url=f"http://127.0.0.1:{port}/v1", models=["scripted"]
    )
    yield app
    await runner.cleanup()


def _hook(org: Organization, name: str = "orders", **fields: Any) -> tuple[Any, str]:
    project = org.projects.first()
    agent = Agent.objects.filter(organization=org).first() or Agent.objects.create(
        organization=org, project=project, slug="desk", name="Desk", model="scripted")
    return hook_create(by=system_actor(org), project=project, name=name, agent=agent, mode=fields.pop("mode", "sync"),
                       **fields)


def _signed(secret: str, payload: dict[str, Any], *, at: int | None = None) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(payload)
    return body, {"X-Keyway-Signature": sign(secret, at if at is not None else int(time.time()), body),
                  "Content-Type": "application/json"}


async def test_a_signed_message_is_answered_in_a_session_kept_per_sender(model: Any, org: Organization) -> None:
    _, secret = await sync_to_async(_hook)(org)
    async with _raw_client() as client:
        replies = []
        for sender, text in (("alice", "hello"), ("alice", "again"), ("bob", "hi")):
            body, headers = _signed(secret, {"text": text, "from": sender, "action": "chat"})
            answer = await client.post("/hooks/orders", content=body, headers=headers)
            assert answer.status_code == 200, answer.text
            replies.append(answer.json())
    assert [reply["reply"] for reply in replies] == ["echo 1: hello", "echo 3: again", "echo 1: hi"]
    # Each step has an output limit, which a webhook's sender cannot set.
    assert {seen["max_tokens"] for seen in model[scripted_model.SEEN]} == {1024}
    assert replies[0]["session_id"] == replies[1]["session_id"] != replies[2]["session_id"]
    sessions = await sync_to_async(lambda: sorted(ChatSession.objects.values_list("external_id", "message_count")))()
    assert sessions == [("alice", 4), ("bob", 2)]
    statuses = await sync_to_async(lambda: list(HookDelivery.objects.values_list("status", flat=True)))()
    assert statuses == ["answered"] * 3
    # Metered under the hook's own key, in the sender's session.
    await metering.flush()
    events = await sync_to_async(lambda: list(UsageEvent.objects.values_list("session_id", flat=True)))()
    assert sorted(events) == sorted(reply["session_id"] for reply in replies)


async def test_a_bad_signature_a_stale_one_a_replay_and_an_unknown_name_are_refused(
    model: Any, org: Organization
) -> None:
    _, secret = await sync_to_async(_hook)(org)
    message = {"text": "hello", "from": "mallory", "action": "chat"}
    async with _raw_client() as client:
        body, headers = _signed("whsec_wrong", message)
        assert (await client.post("/hooks/orders", content=body, headers=headers)).status_code == 401
        body, headers = _signed(secret, message, at=int(time.time()) - 301)
        stale = await client.post("/hooks/orders", content=body, headers=headers)
        assert stale.status_code == 401 and stale.json()["error"]["code"] == "invalid_signature"
        body, headers = _signed(secret, message)
        assert (await client.post("/hooks/orders", content=body, headers=headers)).status_code == 200
        replayed = await client.post("/hooks/orders", content=body, headers=headers)
        assert replayed.status_code == 409 and replayed.json()["error"]["code"] == "replayed_request"
        tampered = body.replace(b"hello", b"HELLO")
        assert (await client.post("/hooks/orders", content=tampered, headers=headers)).status_code == 401
        unknown = await client.post("/hooks/nobody", content=body, headers=headers)
        assert unknown.status_code == 401 and unknown.json()["error"]["code"] == "invalid_signature"
        assert (await client.post("/hooks/orders", content=body)).status_code == 401
        body, headers = _signed(secret, {"text": "", "from": "x"})
        bad = await client.post("/hooks/orders", content=body, headers=headers)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "text"
        body, headers = _signed(secret, {"text": "x", "from": "x", "action": "delete"})
        bad = await client.post("/hooks/orders", content=body, headers=headers)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "action"
    assert len(model[scripted_model.SEEN]) == 1


async def test_two_tenants_may_name_a_hook_alike_and_each_signature_finds_its_own(
    model: Any, org: Organization, other_org: Organization
) -> None:
    (_, mine), (_, theirs) = await sync_to_async(_hook)(org), await sync_to_async(_hook)(other_org)
    async with _raw_client() as client:
        for secret in (mine, theirs):
            body, headers = _signed(secret, {"text": "hi", "from": "same-sender", "action": "chat"})
            assert (await client.post("/hooks/orders", content=body, headers=headers)).status_code == 200
    owners = await sync_to_async(lambda: sorted(ChatSession.objects.values_list("organization__slug", flat=True)))()
    assert owners == ["acme", "globex"]


async def test_a_callback_is_retried_after_the_receiver_failed_once(
    model: Any, tool_server: Any, org: Organization, settings: Any
) -> None:
    settings.KEYWAY_FETCH_ALLOW_PRIVATE = True
    settings.KEYWAY_HOOK_CALLBACK_BACKOFF = 0.05
    hook, secret = await sync_to_async(_hook)(org, mode="callback", callback_url=tool_server.url("/flaky"))
    body, headers = _signed(secret, {"text": "ship it", "from": "carol", "action": "chat"})
    async with _raw_client() as client:
        accepted = await client.post("/hooks/orders", content=body, headers=headers)
    assert accepted.status_code == 202
    delivery_id = accepted.json()["id"]
    for _ in range(100):
        delivery = await sync_to_async(HookDelivery.objects.get)(public_id=delivery_id)
        if delivery.status in ("delivered", "failed"):
            break
        await asyncio.sleep(0.05)
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("delivered", 2, 200)
    assert delivery.reply_json == ""  # dropped once delivered
    first, second = tool_server.requests
    assert first.body == second.body
    reply = orjson.loads(second.body)
    assert reply["reply"] == "echo 1: ship it" and reply["id"] == delivery_id and reply["from"] == "carol"
    assert verify(secret, second.headers["X-Keyway-Signature"], second.body, now=time.time())


async def test_a_reply_left_behind_by_a_stopped_process_is_delivered_by_the_command(
    tool_server: Any, org: Organization, settings: Any
) -> None:
    settings.KEYWAY_FETCH_ALLOW_PRIVATE = True
    settings.KEYWAY_HOOK_CALLBACK_BACKOFF = 0.05
    hook, secret = await sync_to_async(_hook)(org, mode="callback", callback_url=tool_server.url("/flaky"))

    def left_behind() -> str:
        delivery = HookDelivery.objects.create(
            hook=hook, organization=org, sender="dave", session_id="sess_x", status="pending", attempts=2,
            signature="s",
            reply_json=orjson.dumps({"object": "hook.reply", "arguments": {}}).decode(),
            next_attempt_at=timezone.now() - dt.timedelta(minutes=10), created_at=timezone.now(),
        )
        return delivery.public_id

    delivery_id = await sync_to_async(left_behind)()
    def deliver() -> None:
        try:
            call_command("deliver_hooks", stdout=io.StringIO())
        finally:
            connections.close_all()  # this thread's, which nothing else would close

    await asyncio.to_thread(deliver)
    delivery = await sync_to_async(HookDelivery.objects.get)(public_id=delivery_id)
    # Two attempts were made before the process stopped; the command made the third (refused) and the fourth.
    assert (delivery.status, delivery.attempts, delivery.reply_json) == ("delivered", 4, "")
    refused, received = tool_server.requests
    assert verify(secret, received.headers["X-Keyway-Signature"], received.body, now=time.time())


def test_sessions_idle_past_their_retention_are_purged(org: Organization, settings: Any) -> None:
    settings.KEYWAY_SESSIONS_RETENTION_DAYS = 30
    project = org.projects.first()
    now = timezone.now()
    old = ChatSession.objects.create(organization=org, project=project, created_at=now - dt.timedelta(days=40),
                                     updated_at=now - dt.timedelta(days=31))
    kept = ChatSession.objects.create(organization=org, project=project, created_at=now - dt.timedelta(days=40),
                                      updated_at=now - dt.timedelta(days=29))
    call_command("purge_sessions", stdout=io.StringIO())
    assert list(ChatSession.objects.values_list("id", flat=True)) == [kept.id]
    assert not ChatSession.objects.filter(id=old.id).exists()


async def test_a_sender_that_hangs_up_before_the_reply_fails_its_delivery(model: Any, org: Organization) -> None:
    from platform_site.asgi import application

    _, secret = await sync_to_async(_hook)(org)
    body, headers = _signed(secret, {"text": "slow down", "from": "erin", "action": "chat"})
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive() -> dict[str, Any]:
        message = next(messages, None)
        if message is not None:
            return message
        await asyncio.sleep(0.3)  # the sender gives up while the model is still thinking
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/hooks/orders", "raw_path": b"/hooks/orders", "query_string": b"", "root_path": "",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5000),
             "headers": [(b"host", b"127.0.0.1"), *((k.lower().encode(), v.encode()) for k, v in headers.items())]}
    await application(scope, receive, send)
    assert sent == []  # nothing was answered to a sender who left
    delivery = await sync_to_async(HookDelivery.objects.get)()
    assert (delivery.status, delivery.last_error) == ("failed", "the sender went away")
