"""The engine's one metered call, seen from the outside: calls have ids, only known fields go upstream, a
stream settles itself under any handler, and errors after admission still carry the limits."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import openai
import orjson
import pytest
from asgiref.sync import sync_to_async

from apikeys.auth import authenticate_key
from apikeys.models import ApiKey
from bench import fake_upstream
from billing import metering
from billing.models import UsageEvent
from completions.api.requests import parse_chat
from completions.engine import calls
from completions.models import Deployment, Model, Provider
from completions.services import deployment_add, provider_upsert_openai_compatible
from platform_site.kernel import process

pytestmark = pytest.mark.django_db(transaction=True)
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def fake(upstream: tuple[int, Any]) -> Any:
    port, app = upstream
    await sync_to_async(provider_upsert_openai_compatible)(
        name="fake", base_url=f"http://127.0.0.1:{port}/v1", models=["ok", "drip", "http400", "http500"]
    )
    return app


def _events() -> list[UsageEvent]:
    return list(UsageEvent.objects.order_by("id"))


async def _ledger() -> list[UsageEvent]:
    await metering.flush()
    return await sync_to_async(_events)()


async def test_an_unknown_field_is_refused_naming_it_and_nothing_is_metered(
    sdk: openai.AsyncOpenAI, fake: Any
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.chat.completions.create(model="ok", messages=MESSAGES, extra_body={"top_k": 5})
    error = refused.value.body
    assert refused.value.status_code == 400
    assert error["code"] == "unknown_parameter" and error["param"] == "top_k" and "'top_k'" in error["message"]
    assert fake[fake_upstream.SEEN] == []
    assert await _ledger() == []


async def test_embeddings_refuse_unknown_fields_too(sdk: openai.AsyncOpenAI, fake: Any) -> None:
    await sync_to_async(Model.objects.filter(public_id="ok").update)(capabilities=["chat", "embeddings"])
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.embeddings.create(model="ok", input="x", extra_body={"truncate": "END"})
    assert refused.value.body["param"] == "truncate"


async def test_only_known_fields_and_the_deployments_allowed_extras_go_upstream(
    sdk: openai.AsyncOpenAI, upstream: tuple[int, Any]
) -> None:
    """top_k is allowed on the first deployment, which fails; the fallback does not allow it and gets the
    request without it."""
    port, app = upstream

    def route() -> None:
        model = Model.objects.create(public_id="routed", capabilities=["chat"])
        first = Provider.objects.create(name="first", kind="openai_compatible", base_url=f"http://127.0.0.1:{port}/v1")
        second = Provider.objects.create(name="second", kind="openai_compatible",
                                         base_url=f"http://127.0.0.1:{port}/v1")
        deployment_add(model=model, provider=first, upstream_model="http500", priority=0, extra_fields=["top_k"])
        deployment_add(model=model, provider=second, upstream_model="ok", priority=1)

    await sync_to_async(route)()
    raw = await sdk.chat.completions.with_raw_response.create(
        model="routed", messages=MESSAGES, user="u-1", extra_body={"top_k": 5, "provider": {"order": ["first"]}}
    )
    assert raw.headers["x-keyway-provider"] == "second"
    tried, answered = app[fake_upstream.SEEN]
    assert tried["top_k"] == 5 and tried["model"] == "http500"
    assert "top_k" not in answered and answered["model"] == "ok"
    for body in (tried, answered):
        assert set(body) <= {"model", "messages", "user", "top_k"}, body  # no gateway field went upstream


def test_a_deployment_refuses_badly_named_extra_fields(db: None) -> None:
    from django.core.exceptions import ValidationError

    provider = Provider.objects.create(name="p", kind="openai_compatible", base_url="http://127.0.0.1:1/v1")
    model = Model.objects.create(public_id="m", capabilities=["chat"])
    with pytest.raises(ValidationError):
        deployment_add(model=model, provider=provider, upstream_model="x", extra_fields=["Top-K; DROP"])
    deployment = Deployment(model=model, provider=provider, upstream_model="x", extra_fields="top_k")
    with pytest.raises(ValidationError):
        deployment.full_clean()


async def test_one_request_may_make_several_calls_each_metered_once_with_its_own_id(
    fake: Any, api_key: tuple[ApiKey, str]
) -> None:
    """What an agent run or a WebSocket connection does: several engine calls under one request and one
    session, each with its own ledger row."""
    caller = calls.Caller(key=await authenticate_key(api_key[1]), request_id="req_agent", session_id="sess_1")
    request, _ = parse_chat({"model": "ok", "messages": MESSAGES}, model_pinned=False)
    first = await calls.chat(request, caller=caller)
    second = await calls.chat(request, caller=caller)
    async with await calls.chat_stream(request, caller=caller) as stream:
        pieces = [choices async for choices in stream]
    assert len(pieces) > 1
    events = await _ledger()
    assert [event.call_id for event in events] == [first.call_id, second.call_id, stream.call_id]
    assert len({event.call_id for event in events}) == 3
    assert {(event.request_id, event.session_id) for event in events} == {("req_agent", "sess_1")}
    assert all(event.status == UsageEvent.Status.OK for event in events)


async def test_a_rest_request_is_one_call_named_by_its_request_id(sdk: openai.AsyncOpenAI, fake: Any) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(model="ok", messages=MESSAGES)
    (event,) = await _ledger()
    assert event.request_id == raw.headers["x-request-id"]
    assert event.call_id.startswith("call-") and event.session_id == ""


async def test_a_stream_closed_unread_settles_as_client_disconnected_and_frees_its_hold(
    fake: Any, api_key: tuple[ApiKey, str]
) -> None:
    caller = calls.Caller(key=await authenticate_key(api_key[1]), request_id="req_unread")
    request, _ = parse_chat({"model": "drip", "messages": MESSAGES, "stream": True}, model_pinned=False)
    open_before = process.counters()["open_streams"]
    stream = await calls.chat_stream(request, caller=caller)
    assert process.counters()["open_streams"] == open_before + 1
    stream.close()
    stream.close()  # a second close changes nothing
    assert process.counters()["open_streams"] == open_before
    assert [choices async for choices in stream] == []
    (event,) = await _ledger()
    assert event.status == UsageEvent.Status.CLIENT_DISCONNECTED


async def _drive_django_handler(path: str, raw_key: str, body: dict[str, Any], *, leave_after: int) -> list[bytes]:
    """Django's own ASGIHandler (the full middleware stack, as the dashboard runs), with a client that
    leaves after `leave_after` body messages."""
    from django.core.handlers.asgi import ASGIHandler

    handler = ASGIHandler()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {raw_key}".encode()),
                    (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80),
    }
    left = asyncio.Event()
    sent: list[bytes] = []
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": orjson.dumps(body), "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(message["body"])
            if len(sent) >= leave_after:
                left.set()
                await asyncio.sleep(3600)  # the client is gone: nothing more is delivered

    await asyncio.wait_for(handler(scope, receive, send), timeout=30)
    return sent


async def test_a_stream_settles_through_djangos_own_handler_when_the_client_leaves(
    fake: Any, api_key: tuple[ApiKey, str]
) -> None:
    open_before = process.counters()["open_streams"]
    body = {"model": "drip", "messages": MESSAGES, "stream": True}
    sent = await _drive_django_handler("/v1/chat/completions", api_key[1], body, leave_after=3)
    assert len(sent) == 3 and sent[0].startswith(b"data: ")
    for _ in range(50):  # Django closes the response from a worker thread; the settlement hops to the loop
        if (events := await _ledger()):
            break
        await asyncio.sleep(0.05)
    (event,) = events
    assert event.status == UsageEvent.Status.CLIENT_DISCONNECTED
    assert 1 <= event.completion_tokens < fake_upstream.CHUNKS
    assert process.counters()["open_streams"] == open_before


async def test_an_upstream_error_after_admission_still_carries_the_rate_limit_headers(
    sdk: openai.AsyncOpenAI, fake: Any
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.chat.completions.create(model="http400", messages=MESSAGES)
    headers = refused.value.response.headers
    assert headers["x-ratelimit-limit-requests"] and headers["x-ratelimit-remaining-tokens"]
    (event,) = await _ledger()
    assert event.status == UsageEvent.Status.ERROR and event.cost_micros == 0


async def test_the_last_resort_500_names_the_request_id_it_logs(
    asgi_client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from platform_site import api_handler

    def broken_resolver() -> Any:
        raise RuntimeError("resolver exploded with a secret")

    monkeypatch.setattr(api_handler, "get_resolver", broken_resolver)
    with caplog.at_level(logging.ERROR, logger="platform_site.api_handler"):
        response = await asgi_client.get("/v1/models")
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    assert request_id in response.json()["error"]["message"] and "secret" not in response.text
    assert any(request_id in record.getMessage() for record in caplog.records)


def test_the_admin_edits_a_deployments_extra_fields(db: None) -> None:
    from django.contrib.auth import get_user_model
    from django.test import Client

    provider = Provider.objects.create(name="p", kind="openai_compatible", base_url="http://127.0.0.1:1/v1")
    model = Model.objects.create(public_id="m", capabilities=["chat"])
    deployment = deployment_add(model=model, provider=provider, upstream_model="x")
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "x" * 16))
    page = client.get(f"/admin/completions/model/{model.pk}/change/").content.decode()
    assert 'name="deployments-0-extra_fields"' in page
    form = {
        "public_id": "m", "capabilities": '["chat"]', "context_length": "8192", "created": str(model.created),
        "owned_by": model.owned_by, "tokenizer": "", "enabled": "on",
        "deployments-TOTAL_FORMS": "1", "deployments-INITIAL_FORMS": "1", "deployments-MIN_NUM_FORMS": "0",
        "deployments-MAX_NUM_FORMS": "1000", "deployments-0-id": str(deployment.pk),
        "deployments-0-model": str(model.pk),
        "deployments-0-provider": str(provider.pk), "deployments-0-upstream_model": "x", "deployments-0-weight": "1",
        "deployments-0-priority": "0", "deployments-0-timeout_seconds": "", "deployments-0-enabled": "on",
        "deployments-0-extra_fields": '["top_k", "min_p"]',
    }
    response = client.post(f"/admin/completions/model/{model.pk}/change/", form)
    assert response.status_code == 302, response.content.decode()[:2000]
    deployment.refresh_from_db()
    assert deployment.extra_fields == ["top_k", "min_p"]
    refused = client.post(f"/admin/completions/model/{model.pk}/change/",
                          {**form, "deployments-0-extra_fields": '["Top K"]'})
    assert refused.status_code == 200 and "field names" in refused.content.decode()


async def test_an_output_limit_beyond_the_context_is_refused_naming_the_field_used(
    sdk: openai.AsyncOpenAI, fake: Any
) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.chat.completions.create(model="ok", messages=MESSAGES, **{field: 10**6})
        assert refused.value.body["code"] == "context_length_exceeded"
        assert refused.value.body["param"] == field
    assert await _ledger() == []


def test_a_usage_report_no_request_can_have_is_not_believed() -> None:
    from completions.engine.usage import _reported

    assert _reported({"prompt_tokens": 9, "completion_tokens": 7}) == (9, 0, 7)
    assert _reported({"prompt_tokens": 9, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 4}}) \
        == (9, 4, 7)
    for usage in (
        {"prompt_tokens": -500, "completion_tokens": 7},  # would credit the tenant
        {"prompt_tokens": 9, "completion_tokens": 2**40},  # past any ledger column
        {"prompt_tokens": True, "completion_tokens": 7},
        {"prompt_tokens": 9, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 10}},
    ):
        assert _reported(usage) is None, usage
