"""Shared fixtures: organizations, keys, an in-process client of the real ASGI app, schema validation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx2 as httpx
import openai
import pydantic
import pytest
import yaml
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from apikeys.models import ApiKey
from apikeys.services import apikey_create
from billing import counters
from billing.ledger import drain_stream, ledger
from completions.api.openapi import as_json_schema_2020
from platform_site.kernel import loops, process
from platform_site.models import Organization
from platform_site.services import organization_create

OPENAPI_PATH = Path(settings.BASE_DIR).parent / "shared" / "openai-openapi.yaml"
USES_POSTGRES = connection.vendor == "postgresql"
USES_REDIS = bool(settings.REDIS_URL)
SESSION_REDIS_URL = settings.REDIS_URL


@pytest.fixture(scope="session", autouse=True)
def _private_usage_journal(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The suite's usage journals live apart from a development server's, which a recovery would replay. With
    Redis, the usage stream is written by the tests' own thread (below), not by a periodic writer that would
    write one test's events during the next test (or while its tables are being emptied)."""
    settings.KEYWAY_USAGE_JOURNAL_DIR = tmp_path_factory.mktemp("usage-journal")
    settings.KEYWAY_USAGE_STREAM_WRITER = False


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    """Process-wide state outlives a test; reset it so no test sees another's keys, catalog, prices,
    breakers or billing counters."""
    cache.clear()
    process.reset()
    yield
    process.reset()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Write the usage a test produced before its database rows are torn down, in the test's own thread
    (so a test inside a transaction writes inside it): what is journaled, and with Redis what is in the usage
    stream or still queued for it (each test starts with an empty Redis database: `cache.clear()`)."""
    yield
    if USES_REDIS:
        counters._journal_events()
    if ledger.pending():
        ledger.flush_sync()
    if USES_REDIS and settings.REDIS_URL == SESSION_REDIS_URL:
        # (A test that pointed REDIS_URL elsewhere, restored after this hook, sent nothing to this one.)
        drain_stream()
    ledger.verify_kept(older_than=0)  # what went to any Redis (nothing without one)


@pytest.fixture
def org(db: None) -> Organization:
    return organization_create(name="Acme", slug="acme", actor_label="test")


@pytest.fixture
def other_org(db: None) -> Organization:
    return organization_create(name="Globex", slug="globex", actor_label="test")


@pytest.fixture
def api_key(org: Organization) -> tuple[ApiKey, str]:
    return apikey_create(organization=org, name="test key", actor_label="test")


@pytest.fixture
def default_model(db: None) -> None:
    from completions.services import catalog_ensure_default

    catalog_ensure_default()


@pytest.fixture
async def asgi_client() -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client wired straight into platform_site.asgi.application: the same router, handlers and
    views as production, without a socket."""
    from platform_site.asgi import application

    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        yield client


@pytest.fixture
async def sdk(api_key: tuple[ApiKey, str]) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official SDK, holding the `api_key` fixture's key, wired into the real ASGI app in-process."""
    from platform_site.asgi import application

    http_client = httpx.AsyncClient(transport=httpx.ASGITransport(app=application))
    client = openai.AsyncOpenAI(
        base_url="http://127.0.0.1/v1", api_key=api_key[1], http_client=http_client, max_retries=0
    )
    yield client
    await client.close()


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[int, Any]]:
    """A fake OpenAI-compatible upstream (bench/fake_upstream.py) on a loopback port: (port, app)."""
    from bench import fake_upstream

    runner, port, app = await fake_upstream.start()
    yield port, app
    await runner.cleanup()


def _openapi() -> dict[str, Any]:
    with OPENAPI_PATH.open() as handle:
        return yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506


def openapi_validator(openapi: dict[str, Any]) -> Callable[[str, Any], None]:
    """validate(name, instance) against components/schemas/<name> of the official OpenAPI document."""
    openapi = as_json_schema_2020(openapi)
    registry = Registry().with_resource("urn:openai", DRAFT202012.create_resource(openapi))

    def validate(name: str, instance: Any) -> None:
        validator = Draft202012Validator({"$ref": f"urn:openai#/components/schemas/{name}"}, registry=registry)
        errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
        assert not errors, f"{name}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])

    return validate


def _sdk_types() -> dict[str, type[pydantic.BaseModel]]:
    from openai.types import CreateEmbeddingResponse, Model
    from openai.types.admin.organization.admin_api_key import AdminAPIKey
    from openai.types.admin.organization.admin_api_key_create_response import AdminAPIKeyCreateResponse
    from openai.types.admin.organization.audit_log_list_response import AuditLogListResponse
    from openai.types.admin.organization.invite import Invite
    from openai.types.admin.organization.organization_user import OrganizationUser
    from openai.types.admin.organization.project import Project
    from openai.types.admin.organization.projects.project_api_key import ProjectAPIKey
    from openai.types.admin.organization.projects.project_rate_limit import ProjectRateLimit
    from openai.types.admin.organization.projects.project_spend_limit import ProjectSpendLimit
    from openai.types.admin.organization.projects.project_spend_limit_deleted import ProjectSpendLimitDeleted
    from openai.types.admin.organization.usage_completions_response import (
        Data as UsageTimeBucket,
    )
    from openai.types.admin.organization.usage_completions_response import (
        DataResultOrganizationCostsResult,
        DataResultOrganizationUsageCompletionsResult,
        DataResultOrganizationUsageEmbeddingsResult,
        UsageCompletionsResponse,
    )
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.conversations import Conversation, ConversationDeletedResource, ConversationItemList
    from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent
    from openai.types.shared import ErrorObject

    class _Strict(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")

    class ErrorResponse(_Strict):
        error: ErrorObject

    class ListModelsResponse(_Strict):
        object: Literal["list"]
        data: list[Model]

    class ProjectRateLimitListResponse(pydantic.BaseModel):
        object: Literal["list"]
        data: list[ProjectRateLimit]
        first_id: str | None
        last_id: str | None
        has_more: bool

    class ResponseStreamEventModel(pydantic.RootModel[ResponseStreamEvent]):  # type: ignore[misc]
        pass

    return {
        "Response": Response,
        "ResponseStreamEvent": ResponseStreamEventModel,
        "ResponseItemList": ResponseItemList,
        "ConversationItemList": ConversationItemList,
        "ConversationResource": Conversation,
        "DeletedConversationResource": ConversationDeletedResource,
        "CreateChatCompletionResponse": ChatCompletion,
        "CreateChatCompletionStreamResponse": ChatCompletionChunk,
        "CreateEmbeddingResponse": CreateEmbeddingResponse,
        "ErrorResponse": ErrorResponse,
        "ListModelsResponse": ListModelsResponse,
        "Model": Model,
        "AdminApiKey": AdminAPIKey,
        "AdminApiKeyCreateResponse": AdminAPIKeyCreateResponse,
        "Invite": Invite,
        "User": OrganizationUser,
        "Project": Project,
        "ProjectApiKey": ProjectAPIKey,
        "AuditLog": AuditLogListResponse,
        "ProjectRateLimit": ProjectRateLimit,
        "ProjectRateLimitListResponse": ProjectRateLimitListResponse,
        "ProjectSpendLimitResource": ProjectSpendLimit,
        "ProjectSpendLimitDeletedResource": ProjectSpendLimitDeleted,
        "UsageResponse": UsageCompletionsResponse,
        "UsageTimeBucket": UsageTimeBucket,
        "UsageCompletionsResult": DataResultOrganizationUsageCompletionsResult,
        "UsageEmbeddingsResult": DataResultOrganizationUsageEmbeddingsResult,
        "CostsResult": DataResultOrganizationCostsResult,
    }


def sdk_validator() -> Callable[[str, Any], None]:
    """validate(name, instance) against the official SDK's own response type for that schema: where the
    OpenAPI document is absent (a fresh clone without ../shared), every check still runs. The SDK's models
    are strict about types and required fields (pydantic validation), lenient about extra fields."""
    types = _sdk_types()

    def validate(name: str, instance: Any) -> None:
        try:
            types[name].model_validate(instance, strict=False)
        except pydantic.ValidationError as exc:
            raise AssertionError(f"{name}: {exc}") from None

    return validate


@pytest.fixture(scope="session")
def validate_schema() -> Callable[[str, Any], None]:
    """validate_schema(name, instance): the OpenAPI document's components/schemas/<name> where the document
    is present, the official SDK's response type otherwise."""
    if OPENAPI_PATH.exists():
        return openapi_validator(_openapi())
    return sdk_validator()


@pytest.fixture
def fresh_rate_window() -> None:
    """Rate windows are calendar minutes: a test that counts requests in one window starts at least 5 s
    before the window ends (waiting for the next one if need be), so its requests cannot straddle two."""
    left = 60 - time.time() % 60
    if left < 5:
        time.sleep(left + 0.05)


def bearer(raw_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw_key}"}


def running_in_ci() -> bool:
    return os.environ.get("CI") == "true"


@pytest.fixture(scope="session", autouse=True)
async def _close_upstream_pool(
    django_db_setup: None, django_db_blocker: Any, pytestconfig: pytest.Config
) -> AsyncIterator[None]:
    yield
    from asgiref.sync import sync_to_async
    from django.db import connections

    with django_db_blocker.unblock():
        # As a server ends: upstream pools closed, settlements sent, buffered usage written, heartbeats
        # stopped.
        await process.run_shutdown_hooks()
        await _end_leftover_tasks(pytestconfig)
        await loops.close_all()
        # Tests call services through sync_to_async; that worker thread's connections must go before the
        # test database is dropped.
        await sync_to_async(connections.close_all, thread_sensitive=True)()


async def _end_leftover_tasks(config: pytest.Config) -> None:
    """Cancel what tests left running on the session's loop (a WebSocket consumer whose client never said it
    left, a periodic chore), as a server's shutdown does, and wait for it a bounded time. A task that does not
    end would hold pytest-asyncio's loop open for ever, and CI would end on its time-out instead of a failure
    that names the task. Such tasks are named (past pytest's capture) and let go of: taken out of asyncio's
    registry, so that closing the loop does not wait for them.

    Seen on the PostgreSQL leg: the billing counters' heartbeat and reconciler, cancelled and asleep, still
    not woken 15 s after a second cancel (issue noted in the closing note of issue 14)."""
    current = asyncio.current_task()
    leftovers = [task for task in asyncio.all_tasks() if task is not current]
    for task in leftovers:
        task.cancel()
    if not leftovers:
        return
    _, stuck = await asyncio.wait(leftovers, timeout=15)
    if stuck:
        capture = config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            print(f"\n{len(stuck)} task(s) did not end when cancelled at the end of the run; let go of:",
                  file=sys.stderr)
            for task in stuck:
                print(task, file=sys.stderr)
                coroutine: Any = task.get_coro()
                while coroutine is not None:  # the whole chain of awaits, where print_stack shows one frame
                    frame = getattr(coroutine, "cr_frame", None) or getattr(coroutine, "gi_frame", None)
                    if frame is not None:
                        print(f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}",
                              file=sys.stderr)
                    coroutine = getattr(coroutine, "cr_await", None) or getattr(coroutine, "gi_yieldfrom", None)
                asyncio.tasks._unregister_task(task)
            sys.stderr.flush()
