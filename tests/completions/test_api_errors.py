"""Every failure under /v1 and /api/v1 is an OpenAI error object with the right status (in-process ASGI)."""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import sync_to_async

from apikeys.models import ApiKey
from apikeys.services import apikey_create, apikey_revoke
from completions.api import models as models_api
from platform_site.models import Organization
from tests.conftest import bearer

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
OK = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}]}


def assert_error(response: Any, status: int, code: str | None, validate_schema: Any) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"].startswith("req_")
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    validate_schema("ErrorResponse", body)
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


async def test_missing_malformed_unknown_and_revoked_keys_get_401(
    asgi_client, api_key: tuple[ApiKey, str], validate_schema
) -> None:
    key, raw = api_key
    assert_error(await asgi_client.get("/v1/models"), 401, "invalid_api_key", validate_schema)
    assert_error(await asgi_client.get("/v1/models", headers=bearer("nope")), 401, "invalid_api_key", validate_schema)
    unknown = raw[:-4] + ("AAAA" if not raw.endswith("AAAA") else "BBBB")
    assert_error(await asgi_client.get("/v1/models", headers=bearer(unknown)), 401, "invalid_api_key", validate_schema)
    assert (await asgi_client.get("/v1/models", headers=bearer(raw))).status_code == 200
    await sync_to_async(apikey_revoke)(key=key)
    error = assert_error(await asgi_client.get("/v1/models", headers=bearer(raw)), 401, "invalid_api_key",
                         validate_schema)
    assert raw not in error["message"]


async def test_missing_scope_gets_403_naming_the_scope(asgi_client, org: Organization, validate_schema) -> None:
    _, raw = await sync_to_async(apikey_create)(organization=org, name="ro", scopes=["models:read"])
    response = await asgi_client.post(CHAT, headers=bearer(raw), json={"model": "x", "messages": []})
    error = assert_error(response, 403, "missing_scope", validate_schema)
    assert "'chat'" in error["message"]


async def test_key_sees_and_uses_only_its_allowed_models(
    asgi_client, org: Organization, default_model: None, validate_schema
) -> None:
    _, raw = await sync_to_async(apikey_create)(organization=org, name="limited", allowed_models=["all-minilm-l6-v2"])
    listing = (await asgi_client.get("/v1/models", headers=bearer(raw))).json()
    assert [m["id"] for m in listing["data"]] == ["all-minilm-l6-v2"]
    assert_error(await asgi_client.get("/v1/models/gemma-3-270m", headers=bearer(raw)), 404, "model_not_found",
                 validate_schema)
    response = await asgi_client.post(
        CHAT, headers=bearer(raw), json={"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}]}
    )
    error = assert_error(response, 403, "model_not_allowed", validate_schema)
    assert "gemma-3-270m" in error["message"]


async def test_models_list_and_retrieve_match_the_openai_schema(
    asgi_client, api_key: tuple[ApiKey, str], default_model: None, validate_schema
) -> None:
    _, raw = api_key
    for path in ("/v1/models", "/api/v1/models", "/api/v1/chat/models"):
        response = await asgi_client.get(path, headers=bearer(raw))
        assert response.status_code == 200
        validate_schema("ListModelsResponse", response.json())
        assert sorted(m["id"] for m in response.json()["data"]) == ["all-minilm-l6-v2", "gemma-3-270m"]
    model = (await asgi_client.get("/v1/models/gemma-3-270m", headers=bearer(raw))).json()
    validate_schema("Model", model)
    assert model["owned_by"] == "google"
    assert_error(await asgi_client.get("/v1/models/gpt-9", headers=bearer(raw)), 404, "model_not_found",
                 validate_schema)


async def test_unknown_route_and_wrong_method_are_json_errors(
    asgi_client, api_key: tuple[ApiKey, str], validate_schema
) -> None:
    _, raw = api_key
    assert_error(await asgi_client.get("/v1/nothing/here", headers=bearer(raw)), 404, "unknown_url", validate_schema)
    assert_error(await asgi_client.post("/api/v1/whatever", headers=bearer(raw)), 404, "unknown_url", validate_schema)
    # A body is only read from a client with a valid key, whatever the URL.
    assert_error(await asgi_client.post("/api/v1/whatever"), 401, "invalid_api_key", validate_schema)
    assert_error(await asgi_client.get("/v1"), 404, "unknown_url", validate_schema)
    response = await asgi_client.get(CHAT, headers=bearer(raw))
    assert_error(response, 405, "method_not_allowed", validate_schema)
    assert response.headers["allow"] == "POST"
    assert_error(await asgi_client.delete("/v1/models", headers=bearer(raw)), 405, "method_not_allowed",
                 validate_schema)


async def test_a_newline_in_the_path_is_a_json_404_not_a_500(
    asgi_client, api_key: tuple[ApiKey, str], validate_schema
) -> None:
    # Found by schemathesis (tests/e2e/test_fuzz.py): `.` in the catch-all route did not match a newline, so no
    # route matched and the lean handler answered 500.
    _, raw = api_key
    for path in ("/v1/models/a%0Ab", "/v1/no%0Awhere", "/api/v1/responses/x/y%0A/z"):
        assert_error(await asgi_client.get(path, headers=bearer(raw)), 404, "unknown_url", validate_schema)


async def test_malformed_json_gets_400(asgi_client, api_key: tuple[ApiKey, str], validate_schema) -> None:
    _, raw = api_key
    for content in (b"{not json", b"[1, 2]", b""):
        response = await asgi_client.post(
            CHAT, headers={**bearer(raw), "Content-Type": "application/json"}, content=content
        )
        assert_error(response, 400, "invalid_json", validate_schema)


async def test_body_too_large_gets_413(asgi_client, api_key: tuple[ApiKey, str], settings, validate_schema) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    _, raw = api_key
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_error(await asgi_client.post(CHAT, headers=bearer(raw), json=big), 413, "request_too_large",
                 validate_schema)


async def test_unexpected_exception_is_a_500_with_the_request_id_and_no_internals(
    asgi_client, api_key: tuple[ApiKey, str], monkeypatch: pytest.MonkeyPatch, validate_schema
) -> None:
    async def explode() -> None:
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(models_api, "catalog", explode)
    _, raw = api_key
    response = await asgi_client.get("/v1/models", headers=bearer(raw))
    error = assert_error(response, 500, "server_error", validate_schema)
    assert response.headers["x-request-id"] in error["message"]
    assert "secret internal detail" not in response.text and "Traceback" not in response.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "gemma-3-270m"}, "messages"),
        ({"model": "gemma-3-270m", "messages": "hi"}, "messages"),
        ({"model": "gemma-3-270m", "messages": []}, "messages"),
        ({"model": "gemma-3-270m", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": "gemma-3-270m", "messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
        ({"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, "temperature"),
        ({"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], "top_p": -0.1}, "top_p"),
        ({"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}, "max_tokens"),
        ({"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**7},
         "max_tokens"),
        ({"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
         "stop"),
        ({**OK, "n": 0}, "n"),
        ({**OK, "n": 129}, "n"),
        ({**OK, "seed": "42"}, "seed"),
        ({**OK, "presence_penalty": 2.5}, "presence_penalty"),
        ({**OK, "frequency_penalty": -3}, "frequency_penalty"),
        ({**OK, "top_logprobs": 3}, "top_logprobs"),
        ({**OK, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({**OK, "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({**OK, "metadata": {"k": "v" * 513}}, "metadata"),
        ({**OK, "metadata": {"k" * 65: "v"}}, "metadata"),
        ({**OK, "stream_options": {"include_usage": True}}, "stream_options"),
        ({**OK, "response_format": {"type": "yaml"}}, "response_format.type"),
        ({**OK, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
         "response_format.json_schema.name"),
        ({**OK, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({**OK, "tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        ({**OK, "tool_choice": "required"}, "tool_choice"),
        ({**OK, "max_completion_tokens": -1}, "max_completion_tokens"),
    ],
)
async def test_invalid_chat_requests_get_400_naming_the_field(
    asgi_client, api_key: tuple[ApiKey, str], default_model: None, body: dict[str, Any], param: str, validate_schema
) -> None:
    _, raw = api_key
    error = assert_error(await asgi_client.post(CHAT, headers=bearer(raw), json=body), 400, None, validate_schema)
    assert error["param"] == param


async def test_unknown_model_gets_404(asgi_client, api_key: tuple[ApiKey, str], validate_schema) -> None:
    _, raw = api_key
    response = await asgi_client.post(
        CHAT, headers=bearer(raw), json={"model": "gpt-404", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert_error(response, 404, "model_not_found", validate_schema)


async def test_health_and_status(asgi_client, api_key: tuple[ApiKey, str], validate_schema) -> None:
    health = await asgi_client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.headers["x-request-id"].startswith("req_")
    assert_error(await asgi_client.get("/status"), 401, "invalid_api_key", validate_schema)
    _, raw = api_key
    status = (await asgi_client.get("/status", headers=bearer(raw))).json()
    # A key learns the service is up and its own organization's activity, not the deployment's figures (those
    # are for staff).
    assert set(status) == {"status", "version", "uptime_seconds", "active_sessions", "agent_tool_runs_last_hour"}
    assert status["active_sessions"] == 0 and status["agent_tool_runs_last_hour"] == {"total": 0}


async def test_status_is_open_to_logged_in_staff(asgi_client, db: None) -> None:
    from django.contrib.auth import get_user_model
    from django.test import Client

    def staff_session_cookie() -> str:
        user = get_user_model().objects.create_user("ops", password="x" * 16, is_staff=True)
        client = Client()
        client.force_login(user)
        return client.cookies["sessionid"].value

    cookie = await sync_to_async(staff_session_cookie)()
    response = await asgi_client.get("/status", headers={"Cookie": f"sessionid={cookie}"})
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert {"loaded_models", "open_streams", "open_websockets"} <= set(response.json())


async def test_lifespan_startup_and_shutdown_complete() -> None:
    from platform_site.asgi import application

    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await application({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_health_is_503_when_a_dependency_fails(asgi_client, monkeypatch: pytest.MonkeyPatch) -> None:
    from platform_site import health

    def broken_cache() -> None:
        raise ConnectionError("cache down")

    monkeypatch.setattr(health, "_check_cache", broken_cache)
    response = await asgi_client.get("/health")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "checks": {"database": "ok", "cache": "error: ConnectionError"}}


def _deep_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(
    ("field", "schema", "param"),
    [
        ("tools", _deep_schema(20), "tools[0].function.parameters"),
        ("tools", {"type": "array", "items": {"type": "string"}, "maxItems": 100_000}, "tools[0].function.parameters"),
        ("tools", {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(6000)}},
         "tools[0].function.parameters"),
        ("response_format", {"type": "string", "maxLength": 10**9}, "response_format.json_schema.schema"),
        ("response_format", _deep_schema(20), "response_format.json_schema.schema"),
    ],
)
async def test_schemas_that_would_compile_into_huge_grammars_are_refused_before_the_model(
    asgi_client, api_key: tuple[ApiKey, str], default_model: None, field: str, schema: dict[str, Any], param: str,
    validate_schema
) -> None:
    body: dict[str, Any] = {**OK, "max_tokens": 2}
    if field == "tools":
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    response = await asgi_client.post(CHAT, json=body, headers=bearer(api_key[1]))
    assert assert_error(response, 400, "invalid_value", validate_schema)["param"] == param


async def test_a_schema_within_the_bounds_still_works(
    asgi_client, api_key: tuple[ApiKey, str], default_model: None
) -> None:
    schema = {**_deep_schema(8), "properties": {"a": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}}}
    body = {**OK, "max_tokens": 8, "response_format": {"type": "json_schema", "json_schema": {"name": "s",
                                                                                                "schema": schema}}}
    response = await asgi_client.post(CHAT, json=body, headers=bearer(api_key[1]))
    assert response.status_code == 200, response.text


async def test_an_address_that_keeps_failing_authentication_is_refused_without_a_lookup(
    api_key: tuple[ApiKey, str], settings: Any, monkeypatch: pytest.MonkeyPatch, validate_schema
) -> None:
    import httpx2 as httpx

    from apikeys import auth
    from platform_site.asgi import application

    settings.KEYWAY_AUTH_FAILURES_PER_MINUTE = 3
    lookups: list[str] = []
    real = auth._records._load
    monkeypatch.setattr(auth._records, "_load", lambda public_id: lookups.append(public_id) or real(public_id))

    def client(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=application, client=(address, 4711))
        return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1")

    async with client("203.0.113.9") as guesser, client("198.51.100.7") as bystander:
        for attempt in range(3):
            wrong = f"sk-kw-{attempt:012d}-" + "a" * 44
            assert (await guesser.get("/v1/models", headers=bearer(wrong))).status_code == 401
        assert len(lookups) == 3
        refused = await guesser.get("/v1/models", headers=bearer("sk-kw-999999999999-" + "a" * 44))
        error = assert_error(refused, 429, "too_many_failed_authentications", validate_schema)
        assert "try again in" in error["message"] and 1 <= int(refused.headers["retry-after"]) <= 60
        assert len(lookups) == 3  # refused before any lookup
        # Another address is not affected.
        assert (await bystander.get("/v1/models", headers=bearer(api_key[1]))).status_code == 200
