"""POST /hooks/<name>: webhook ingress (seed 003). A signed `{"text", "from", "action": "chat"}` is a turn of
the hook's agent, in a session kept per sender; the reply comes back in the response (a `sync` hook), or is
POSTed, signed, to the hook's callback URL with retries and backoff (a `callback` hook, answered 202 at once).
Every request a hook accepts is a delivery, visible in the dashboard with its attempts.

The signature is the only credential: `X-Keyway-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<raw body>">` under the hook's secret. One older than five minutes, or one already used, is refused.
The turn is made, and metered, under the key that was created with the hook.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from typing import Any

import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponseBase
from django.utils import timezone

from agents.callbacks import SIGNATURE_HEADER, post_callback
from agents.hooks import (
    SIGNATURE_TOLERANCE,
    HookTarget,
    delivery_answered,
    delivery_attempted,
    delivery_failed,
    delivery_pending,
    delivery_session,
    delivery_start,
    hook_for_request,
)
from agents.sessions import session_for_sender, session_messages
from apikeys import throttle
from apikeys.exceptions import TooManyFailedAuthentications
from completions.agent.loop import Turn
from completions.agent.tools import server_tools
from completions.api.http import json_response
from completions.api.requests import parse_chat
from completions.api.turns import Saver, run_slots
from completions.engine.calls import Caller
from platform_site.kernel import jsonbody
from platform_site.kernel.errors import ApiError, error_response, to_api_error
from platform_site.kernel.orm import orm
from platform_site.middleware import new_request_id

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
MAX_TEXT_CHARS = 32_768
MAX_SENDER_CHARS = 200
# Callback deliveries running in this process; kept so that they are not collected mid-way.
_deliveries: set[asyncio.Task[None]] = set()


async def hook_ingress(request: HttpRequest, name: str) -> HttpResponseBase:
    request_id = new_request_id()
    try:
        response = await _ingress(request, name, request_id)
    except Exception as exc:  # noqa: BLE001 - the one mapping from exceptions to error objects
        response = error_response(to_api_error(exc, request_id=request_id), request_id=request_id)
    response["x-request-id"] = request_id
    return response


# Signed by the hook's secret, never authenticated by a cookie: there is no cross-site request to forge.
hook_ingress.csrf_exempt = True  # type: ignore[attr-defined]


def _refused() -> ApiError:
    return ApiError(
        f"The request is not signed by this hook's secret, or its signature is older than "
        f"{SIGNATURE_TOLERANCE // 60} minutes. Send {SIGNATURE_HEADER}: t=<unix seconds>,v1=<hex HMAC-SHA256 of "
        "\"<t>.<raw body>\">.", status=401, error_type="invalid_request_error", code="invalid_signature",
    )


def _message(body: bytes) -> tuple[str, str]:
    try:
        payload = jsonbody.loads(body)
    except (jsonbody.TooDeep, orjson.JSONDecodeError):
        raise ApiError("The body must be a JSON object.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError("The body must be a JSON object.", code="invalid_json")
    action = payload.get("action", "chat")
    if action != "chat":
        raise ApiError(f"Unsupported action {str(action)[:32]!r}: the only action is 'chat'.", param="action",
                       code="invalid_value")
    for name, limit in (("text", MAX_TEXT_CHARS), ("from", MAX_SENDER_CHARS)):
        value = payload.get(name)
        if not isinstance(value, str) or not value.strip():
            raise ApiError(f"'{name}' must be a non-empty string.", param=name, code="invalid_value")
        if len(value) > limit:
            raise ApiError(f"'{name}' may hold at most {limit} characters.", param=name, code="invalid_value")
    return payload["text"], payload["from"]


async def _ingress(request: HttpRequest, name: str, request_id: str) -> HttpResponseBase:
    if request.method != "POST":
        raise ApiError("Webhooks are POSTed.", status=405, code="method_not_allowed", headers={"Allow": "POST"})
    body = request.body
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(f"A webhook body may hold at most {MAX_BODY_BYTES} bytes.", status=413,
                       code="request_too_large")
    # Bad signatures count against the sender's address as bad keys do: past the limit it is refused
    # before any lookup.
    address = request.META.get("REMOTE_ADDR") or ""
    wait = throttle.retry_after(address) if address else None
    if wait is not None:
        raise TooManyFailedAuthentications(wait)
    signature = request.headers.get(SIGNATURE_HEADER)
    hook = await orm(hook_for_request, name=name[:64], signature=signature, body=body)
    if hook is None:
        if address:
            throttle.record_failure(address)
        raise _refused()
    text, sender = _message(body)
    # A signature is good once: the same request sent again within its five minutes is a replay (refused
    # by the database, so whichever worker takes the repeat).
    delivery_id = await orm(delivery_start, hook=hook, sender=sender)
    try:
        turn, saver = await _turn(hook, text=text, sender=sender, request_id=request_id, delivery_id=delivery_id)
        run_slots.take(hook.organization_id)
    except Exception as exc:
        await orm(delivery_failed, delivery_id=delivery_id, error=to_api_error(exc, request_id=request_id).message)
        raise
    if hook.mode == "callback":
        task = asyncio.get_running_loop().create_task(_callback(hook, turn, saver, delivery_id, sender))
        _deliveries.add(task)
        task.add_done_callback(_deliveries.discard)
        return json_response({"object": "hook.delivery", "id": delivery_id, "session_id": saver.session_id,
                              "status": "running"}, status=202)
    try:
        await _run(turn, saver)
    except asyncio.CancelledError:
        # The sender hung up before the reply: the turn stopped (and settled what it used); the delivery says so.
        await asyncio.shield(orm(delivery_failed, delivery_id=delivery_id, error="the sender went away"))
        raise
    except Exception as exc:
        await orm(delivery_failed, delivery_id=delivery_id, error=to_api_error(exc, request_id=request_id).message)
        raise
    finally:
        run_slots.give_back(hook.organization_id)
    await orm(delivery_answered, delivery_id=delivery_id)
    return json_response(_reply(hook, turn, delivery_id=delivery_id, session_id=saver.session_id, sender=sender))


async def _turn(hook: HookTarget, *, text: str, sender: str, request_id: str, delivery_id: str
                ) -> tuple[Turn, Saver]:
    agent = hook.agent
    # A webhook's sender sets no output limit: each step is bounded here, so that one message cannot keep a
    # model generating up to its whole context.
    chat, _ = parse_chat({"model": agent.model, "messages": [{"role": "user", "content": text}],
                          "max_tokens": settings.KEYWAY_HOOK_MAX_TOKENS}, model_pinned=False)
    session = await orm(session_for_sender, organization_id=hook.organization_id, project_id=hook.project_id,
                        api_key_id=hook.key.id, agent_slug=agent.slug, hook_id=hook.id, sender=sender)
    history = await orm(session_messages, session=session)
    await orm(delivery_session, delivery_id=delivery_id, session_id=session.id)
    # The hook's creator chose the agent: its model and connectors are not the hook key's to restrict.
    key = dataclasses.replace(hook.key, pinned_model="", allowed_models=frozenset())
    tools = await server_tools(agent) if agent.connectors else {}
    turn = Turn(request=chat, caller=Caller(key=key, request_id=request_id, session_id=session.id),
                history=history, agent=agent, tools=tools, max_iterations=agent.max_iterations)
    saver = Saver(turn, session_id=session.id, new=False, key_id=hook.key.id, organization_id=hook.organization_id,
                  project_id=hook.project_id, agent_slug=agent.slug)
    return turn, saver


async def _run(turn: Turn, saver: Saver) -> None:
    try:
        async for _ in turn.events():
            pass
    finally:
        turn.close()
    await saver.save()


def _reply(hook: HookTarget, turn: Turn, *, delivery_id: str, session_id: str, sender: str) -> dict[str, Any]:
    return {
        "object": "hook.reply", "id": delivery_id, "hook": hook.name, "session_id": session_id, "from": sender,
        "reply": "".join(turn.content), "finish_reason": turn.finish_reason, "usage": turn.usage,
    }


async def _callback(hook: HookTarget, turn: Turn, saver: Saver, delivery_id: str, sender: str) -> None:
    """Run the turn, then deliver its reply: attempts back off from KEYWAY_HOOK_CALLBACK_BACKOFF seconds,
    doubling, up to KEYWAY_HOOK_CALLBACK_ATTEMPTS; each is recorded on the delivery."""
    try:
        await _run(turn, saver)
    except Exception as exc:  # noqa: BLE001 - recorded on the delivery, which is where its owner looks
        await orm(delivery_failed, delivery_id=delivery_id, error=to_api_error(exc, request_id="").message)
        return
    finally:
        run_slots.give_back(hook.organization_id)
    reply = _reply(hook, turn, delivery_id=delivery_id, session_id=saver.session_id, sender=sender)
    await orm(delivery_pending, delivery_id=delivery_id, reply=reply, next_attempt_at=timezone.now())
    await deliver(delivery_id=delivery_id, url=hook.callback_url, secret=hook.secret, reply=reply)


async def deliver(*, delivery_id: str, url: str, secret: str, reply: dict[str, Any], first_attempt: int = 1) -> None:
    attempts = settings.KEYWAY_HOOK_CALLBACK_ATTEMPTS
    for attempt in range(first_attempt, attempts + 1):
        result = await post_callback(url, secret=secret, payload=reply)
        delay = settings.KEYWAY_HOOK_CALLBACK_BACKOFF * 2 ** (attempt - 1)
        last = result.delivered or attempt == attempts
        await orm(delivery_attempted, delivery_id=delivery_id, delivered=result.delivered,
                  status_code=result.status_code, error=result.error,
                  next_attempt_at=None if last else timezone.now() + dt.timedelta(seconds=delay))
        if last:
            return
        await asyncio.sleep(delay)
