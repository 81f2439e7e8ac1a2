"""OpenAI's usage and costs reports (/v1/organization/usage/completions, /usage/embeddings, /costs): bodies valid
against the official schemas, numbers equal to the ledger's sums in every bucket width and grouping, pages that
add up to the whole, and no tenant ever reading, or learning of, another's usage."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx2 as httpx
import openai
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apikeys.models import ApiKey
from apikeys.services import apikey_create
from billing.models import UsageEvent
from billing.services import SettledUsage, usage_events_write
from dashboard.admin_api.usage import page_cursor
from platform_site.access import system_actor
from platform_site.models import Organization, Project, Role
from platform_site.selectors import default_project
from platform_site.services import membership_set, project_create
from tests.conftest import bearer

pytestmark = pytest.mark.django_db
Validate = Callable[[str, Any], None]
Endpoint = UsageEvent.Endpoint

COMPLETIONS = "/v1/organization/usage/completions"
EMBEDDINGS = "/v1/organization/usage/embeddings"
COSTS = "/v1/organization/costs"
DAY, HOUR, MINUTE = 86_400, 3_600, 60
RESULT_SCHEMAS = {
    "organization.usage.completions.result": "UsageCompletionsResult",
    "organization.usage.embeddings.result": "UsageEmbeddingsResult",
    "organization.costs.result": "CostsResult",
}


def _at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp())


MARCH_1, MARCH_2, MARCH_3, MARCH_4 = _at(2025, 3, 1), _at(2025, 3, 2), _at(2025, 3, 3), _at(2025, 3, 4)


@dataclass(frozen=True)
class Usage:
    """What the ledger holds for this module, and the public ids the API names projects and keys by."""

    events: list[SettledUsage]
    projects: dict[int | None, str | None]
    keys: dict[int | None, str | None]
    main: Project
    search: Project
    ops: ApiKey
    indexer: ApiKey
    theirs: Project
    their_key: ApiKey


def _event(
    name: str,
    organization: Organization,
    when: int,
    *,
    endpoint: int = Endpoint.CHAT,
    project: Project | None = None,
    key: ApiKey | None = None,
    model: str = "gpt-small",
    prompt: int = 0,
    cached: int = 0,
    completion: int = 0,
    cost: int = 0,
    status: int = UsageEvent.Status.OK,
) -> SettledUsage:
    return SettledUsage(
        call_id=name,
        request_id=name,
        session_id="",
        organization_id=organization.pk,
        api_key_id=key.pk if key is not None else None,
        endpoint=endpoint,
        model=model,
        deployment_id=None,
        provider="fake",
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
        cost_micros=cost,
        status=status,
        usage_source=UsageEvent.UsageSource.REPORTED,
        latency_ms=90,
        ttft_ms=None,
        created_at=float(when),
        project_id=project.pk if project is not None else None,
    )


@pytest.fixture
def admin_key(org: Organization) -> str:
    return apikey_create(organization=org, name="ops admin", scopes=["admin"], actor_label="test")[1]


@pytest.fixture
def usage(org: Organization, other_org: Organization) -> Usage:
    return _usage_of(org, other_org)


def _usage_of(org: Organization, other_org: Organization) -> Usage:
    """Acme's calls over 1–3 March 2025 (nothing on the 2nd), through every endpoint, two projects, two keys and
    no key at all; and Globex's calls in the same hours, which no Acme report may show."""
    main = default_project(organization=org)
    search = project_create(by=system_actor(org, "test"), name="Search")
    ops, _ = apikey_create(organization=org, project=main, name="ops", actor_label="test")
    indexer, _ = apikey_create(organization=org, project=search, name="indexer", actor_label="test")
    theirs = default_project(organization=other_org)
    their_key, _ = apikey_create(organization=other_org, project=theirs, name="globex", actor_label="test")
    events = [
        _event("a1", org, MARCH_1, project=main, key=ops, prompt=100, cached=20, completion=50, cost=1_000),
        _event(
            "a2",
            org,
            _at(2025, 3, 1, 10, 15, 30),
            endpoint=Endpoint.RESPONSES,
            project=main,
            key=ops,
            model="gpt-large",
            prompt=1_000,
            completion=300,
            cost=42_000,
        ),
        _event(
            "a3",
            org,
            _at(2025, 3, 1, 10, 45),
            endpoint=Endpoint.REALTIME,
            project=search,
            key=indexer,
            model="gpt-large",
            prompt=400,
            cached=100,
            completion=80,
            cost=5_500,
        ),
        _event(
            "a4",
            org,
            _at(2025, 3, 1, 11),
            endpoint=Endpoint.EMBEDDINGS,
            project=search,
            key=indexer,
            model="embed",
            prompt=5_000,
            cost=55,
        ),
        _event("a5", org, _at(2025, 3, 1, 10, 15, 59), project=search, key=indexer, prompt=30, completion=5, cost=70),
        # Keyless usage (made from the dashboard's playground), and a call that failed.
        _event("a6", org, _at(2025, 3, 3, 12), prompt=7, completion=3, cost=9),
        _event("a7", org, MARCH_4 - 1, project=main, key=ops, prompt=10, status=UsageEvent.Status.ERROR),
        _event(
            "g1",
            other_org,
            _at(2025, 3, 1, 10, 20),
            project=theirs,
            key=their_key,
            model="gpt-secret",
            prompt=777,
            completion=777,
            cost=999_999,
        ),
        _event(
            "g2",
            other_org,
            _at(2025, 3, 2, 9),
            endpoint=Endpoint.EMBEDDINGS,
            project=theirs,
            key=their_key,
            model="secret-embed",
            prompt=888,
            cost=4_444,
        ),
    ]
    assert usage_events_write(events) == len(events)
    return Usage(
        events=events,
        projects={None: None, main.pk: main.public_id, search.pk: search.public_id},
        keys={None: None, ops.pk: f"key_{ops.public_id}", indexer.pk: f"key_{indexer.public_id}"},
        main=main,
        search=search,
        ops=ops,
        indexer=indexer,
        theirs=theirs,
        their_key=their_key,
    )


KIND_ENDPOINTS = {
    COMPLETIONS: {Endpoint.CHAT, Endpoint.RESPONSES, Endpoint.REALTIME},
    EMBEDDINGS: {Endpoint.EMBEDDINGS},
    COSTS: set(Endpoint),
}


def _numbers(path: str, result: dict[str, Any]) -> tuple[int, ...]:
    if path == COMPLETIONS:
        return (
            result["input_tokens"],
            result["input_cached_tokens"],
            result["output_tokens"],
            result["num_model_requests"],
        )
    if path == EMBEDDINGS:
        return result["input_tokens"], result["num_model_requests"]
    return (round(result["amount"]["value"] * 1_000_000),)


def _event_numbers(path: str, event: SettledUsage) -> tuple[int, ...]:
    if path == COMPLETIONS:
        return event.prompt_tokens, event.cached_tokens, event.completion_tokens, 1
    if path == EMBEDDINGS:
        return event.prompt_tokens, 1
    return (event.cost_micros,)


def expected(
    usage: Usage,
    path: str,
    *,
    organization: Organization,
    since: int,
    until: int,
    width: int,
    group_by: Iterable[str] = (),
    keep: Callable[[SettledUsage], bool] = lambda event: True,
) -> dict[int, dict[tuple[Any, ...], tuple[int, ...]]]:
    """The sums a report must show, computed from the events this module wrote: per bucket start, per group."""
    sums: defaultdict[int, dict[tuple[Any, ...], tuple[int, ...]]] = defaultdict(dict)
    for event in usage.events:
        when = int(event.created_at)
        if (
            event.organization_id != organization.pk
            or event.endpoint not in KIND_ENDPOINTS[path]
            or not since <= when < until
            or not keep(event)
        ):
            continue
        named = {
            "project_id": usage.projects[event.project_id],
            "api_key_id": usage.keys[event.api_key_id],
            "model": event.model,
            "line_item": event.model,
        }
        group = tuple(named[name] for name in group_by)
        bucket = sums[when - when % width]
        numbers = _event_numbers(path, event)
        bucket[group] = tuple(a + b for a, b in zip(bucket.get(group, (0,) * len(numbers)), numbers, strict=True))
    return dict(sums)


def observed(
    path: str, body: dict[str, Any], group_by: Iterable[str] = ()
) -> dict[int, dict[tuple[Any, ...], tuple[int, ...]]]:
    found: dict[int, dict[tuple[Any, ...], tuple[int, ...]]] = {}
    for bucket in body["data"]:
        if bucket["results"]:
            groups = {tuple(r[name] for name in group_by): _numbers(path, r) for r in bucket["results"]}
            assert len(groups) == len(bucket["results"]), "a group is listed twice in one bucket"
            found[bucket["start_time"]] = groups
    return found


def get(client: Client, path: str, key: str, **params: Any) -> dict[str, Any]:
    response = client.get(path, params, headers=bearer(key))
    assert response.status_code == 200, response.content[:500]
    body: dict[str, Any] = response.json()
    return body


def valid(validate: Validate, body: dict[str, Any]) -> dict[str, Any]:
    validate("UsageResponse", body)
    for bucket in body["data"]:
        validate("UsageTimeBucket", bucket)
        for result in bucket["results"]:
            validate(RESULT_SCHEMAS[result["object"]], result)
    return body


def test_completions_per_day_are_the_ledgers_sums_with_empty_days_present(
    client: Client, admin_key: str, usage: Usage, validate_schema: Validate
) -> None:
    body = valid(validate_schema, get(client, COMPLETIONS, admin_key, start_time=MARCH_1, end_time=MARCH_4))
    assert [(b["start_time"], b["end_time"]) for b in body["data"]] == [
        (MARCH_1, MARCH_2),
        (MARCH_2, MARCH_3),
        (MARCH_3, MARCH_4),
    ]
    assert (body["object"], body["has_more"], body["next_page"]) == ("page", False, None)
    first, empty, third = (bucket["results"] for bucket in body["data"])
    # Chat, responses and realtime calls; not the embeddings call, and not Globex's call of the same hour.
    assert first == [
        {
            "object": "organization.usage.completions.result",
            "input_tokens": 1_530,
            "output_tokens": 435,
            "input_cached_tokens": 120,
            "input_audio_tokens": 0,
            "output_audio_tokens": 0,
            "num_model_requests": 4,
            "project_id": None,
            "user_id": None,
            "api_key_id": None,
            "model": None,
            "batch": None,
            "service_tier": None,
        }
    ]
    assert empty == []
    # The failed call counts as a request, as the ledger counts it.
    assert (third[0]["input_tokens"], third[0]["output_tokens"], third[0]["num_model_requests"]) == (17, 3, 2)


def test_completions_grouped_by_project_key_and_model_name_them_by_public_ids(
    client: Client, admin_key: str, org: Organization, usage: Usage, validate_schema: Validate
) -> None:
    group_by = ["project_id", "api_key_id", "model"]
    body = valid(
        validate_schema,
        get(client, COMPLETIONS, admin_key, start_time=MARCH_1, end_time=MARCH_4, **{"group_by[]": group_by}),
    )
    want = expected(usage, COMPLETIONS, organization=org, since=MARCH_1, until=MARCH_4, width=DAY, group_by=group_by)
    assert observed(COMPLETIONS, body, group_by) == want
    groups = {group for bucket in want.values() for group in bucket}
    assert (usage.search.public_id, f"key_{usage.indexer.public_id}", "gpt-large") in groups
    assert (None, None, "gpt-small") in groups  # the keyless call
    assert all(p is None or p.startswith("proj_") for p, _, _ in groups)

    by_model = get(client, COMPLETIONS, admin_key, start_time=MARCH_1, end_time=MARCH_4, group_by="model")
    assert observed(COMPLETIONS, by_model, ["model"]) == expected(
        usage, COMPLETIONS, organization=org, since=MARCH_1, until=MARCH_4, width=DAY, group_by=["model"]
    )
    assert {r["project_id"] for b in by_model["data"] for r in b["results"]} == {None}


@pytest.mark.parametrize("group_by", [[], ["model"], ["project_id", "api_key_id"]])
def test_hour_and_minute_buckets_are_the_ledgers_sums(
    client: Client, admin_key: str, org: Organization, usage: Usage, validate_schema: Validate, group_by: list[str]
) -> None:
    hours = valid(
        validate_schema,
        get(
            client,
            COMPLETIONS,
            admin_key,
            start_time=MARCH_1,
            end_time=MARCH_2,
            bucket_width="1h",
            **{"group_by[]": group_by},
        ),
    )
    assert [b["start_time"] for b in hours["data"]] == list(range(MARCH_1, MARCH_2, HOUR))
    assert not hours["has_more"]
    assert observed(COMPLETIONS, hours, group_by) == expected(
        usage, COMPLETIONS, organization=org, since=MARCH_1, until=MARCH_2, width=HOUR, group_by=group_by
    )
    ten, eleven = _at(2025, 3, 1, 10), _at(2025, 3, 1, 11)
    minutes = valid(
        validate_schema,
        get(
            client,
            COMPLETIONS,
            admin_key,
            start_time=ten,
            end_time=eleven,
            bucket_width="1m",
            **{"group_by[]": group_by},
        ),
    )
    assert [b["start_time"] for b in minutes["data"]] == list(range(ten, eleven, MINUTE))
    want = expected(usage, COMPLETIONS, organization=org, since=ten, until=eleven, width=MINUTE, group_by=group_by)
    assert observed(COMPLETIONS, minutes, group_by) == want
    # 10:15:30 and 10:15:59 fall in one minute, 10:45 in another; Globex's 10:20 in none of Acme's.
    assert sorted(want) == [_at(2025, 3, 1, 10, 15), _at(2025, 3, 1, 10, 45)]


def test_pages_follow_next_page_and_add_up_to_the_whole(
    client: Client, admin_key: str, org: Organization, usage: Usage, validate_schema: Validate
) -> None:
    query = {"start_time": MARCH_1, "end_time": MARCH_2, "bucket_width": "1h", "limit": 5, "group_by": "model"}
    pages = [valid(validate_schema, get(client, COMPLETIONS, admin_key, **query))]
    while pages[-1]["has_more"]:
        pages.append(valid(validate_schema, get(client, COMPLETIONS, admin_key, **query, page=pages[-1]["next_page"])))
    assert [len(p["data"]) for p in pages] == [5, 5, 5, 5, 4]
    assert pages[-1]["next_page"] is None
    starts = [bucket["start_time"] for p in pages for bucket in p["data"]]
    assert starts == list(range(MARCH_1, MARCH_2, HOUR))
    whole = {"object": "page", "data": [bucket for p in pages for bucket in p["data"]]}
    assert observed(COMPLETIONS, whole, ["model"]) == expected(
        usage, COMPLETIONS, organization=org, since=MARCH_1, until=MARCH_2, width=HOUR, group_by=["model"]
    )
    assert observed(COMPLETIONS, whole, ["model"]) == observed(
        COMPLETIONS, get(client, COMPLETIONS, admin_key, **{**query, "limit": 24}), ["model"]
    )


def test_buckets_are_whole_utc_periods_and_the_range_ends_now_by_default(
    client: Client, admin_key: str, usage: Usage
) -> None:
    # start_time is floored to its bucket's start and end_time rounded up to its bucket's end.
    hours = get(
        client,
        COMPLETIONS,
        admin_key,
        start_time=_at(2025, 3, 1, 10, 30, 17),
        end_time=_at(2025, 3, 1, 11, 0, 1),
        bucket_width="1h",
    )
    assert [(b["start_time"], b["end_time"]) for b in hours["data"]] == [
        (_at(2025, 3, 1, 10), _at(2025, 3, 1, 11)),
        (_at(2025, 3, 1, 11), _at(2025, 3, 1, 12)),
    ]
    # The 10:00 bucket is the whole hour, the calls before 10:30:17 included.
    assert hours["data"][0]["results"][0]["num_model_requests"] == 3
    days = get(client, COMPLETIONS, admin_key, start_time=_at(2025, 3, 1, 23, 59), end_time=_at(2025, 3, 2, 0, 0, 1))
    assert [b["start_time"] for b in days["data"]] == [MARCH_1, MARCH_2]

    now = int(timezone.now().timestamp())
    start = now - 30 * DAY
    default = get(client, COMPLETIONS, admin_key, start_time=start)
    assert len(default["data"]) == 7 and default["has_more"]  # OpenAI's default limit for 1d
    assert default["data"][0]["start_time"] == start - start % DAY
    last = get(client, COMPLETIONS, admin_key, start_time=now - 3 * HOUR, bucket_width="1h")
    assert not last["has_more"] and last["data"][-1]["start_time"] <= now <= last["data"][-1]["end_time"]


def test_filters_keep_only_the_projects_keys_and_models_asked_for(
    client: Client, admin_key: str, org: Organization, usage: Usage, validate_schema: Validate
) -> None:
    window = {"start_time": MARCH_1, "end_time": MARCH_4}
    cases: list[tuple[dict[str, Any], Callable[[SettledUsage], bool]]] = [
        ({"project_ids[]": [usage.search.public_id]}, lambda e: e.project_id == usage.search.pk),
        ({"project_ids": [usage.search.public_id, usage.main.public_id]}, lambda e: e.project_id is not None),
        ({"api_key_ids[]": [f"key_{usage.ops.public_id}"]}, lambda e: e.api_key_id == usage.ops.pk),
        # A key's bare public id names it too, as elsewhere in this API.
        ({"api_key_ids": [usage.indexer.public_id]}, lambda e: e.api_key_id == usage.indexer.pk),
        ({"models[]": ["gpt-large"]}, lambda e: e.model == "gpt-large"),
        (
            {"models[]": ["gpt-large"], "project_ids[]": [usage.main.public_id]},
            lambda e: e.model == "gpt-large" and e.project_id == usage.main.pk,
        ),
        ({"models[]": ["no-such-model"]}, lambda e: False),
        # A filter given as blank is no filter.
        ({"models": [""]}, lambda e: True),
    ]
    for path in (COMPLETIONS, EMBEDDINGS):
        for filters, keep in cases:
            body = valid(validate_schema, get(client, path, admin_key, **window, **filters, group_by="model"))
            want = expected(
                usage, path, organization=org, since=MARCH_1, until=MARCH_4, width=DAY, group_by=["model"], keep=keep
            )
            assert observed(path, body, ["model"]) == want, (path, filters)
            assert len(body["data"]) == 3


def test_embeddings_report_only_embeddings_calls(
    client: Client, admin_key: str, usage: Usage, validate_schema: Validate
) -> None:
    body = valid(
        validate_schema,
        get(
            client,
            EMBEDDINGS,
            admin_key,
            start_time=MARCH_1,
            end_time=MARCH_4,
            group_by=["project_id", "api_key_id", "model", "user_id"],
        ),
    )
    assert body["data"][0]["results"] == [
        {
            "object": "organization.usage.embeddings.result",
            "input_tokens": 5_000,
            "num_model_requests": 1,
            "project_id": usage.search.public_id,
            "user_id": None,
            "api_key_id": f"key_{usage.indexer.public_id}",
            "model": "embed",
        }
    ]
    assert [b["results"] for b in body["data"][1:]] == [[], []]


def test_costs_are_usd_per_day_by_line_item_project_and_key(
    client: Client, admin_key: str, org: Organization, usage: Usage, validate_schema: Validate
) -> None:
    body = valid(validate_schema, get(client, COSTS, admin_key, start_time=MARCH_1, end_time=MARCH_4))
    # Every endpoint's cost: 1,000 + 42,000 + 5,500 + 55 + 70 micro-USD.
    assert body["data"][0]["results"] == [
        {
            "object": "organization.costs.result",
            "amount": {"value": 0.048625, "currency": "usd"},
            "line_item": None,
            "project_id": None,
            "api_key_id": None,
            "quantity": None,
            "quantity_unit": None,
        }
    ]
    assert body["data"][1]["results"] == []
    for group_by in (["line_item"], ["project_id", "line_item"], ["api_key_id"]):
        grouped = valid(
            validate_schema,
            get(client, COSTS, admin_key, start_time=MARCH_1, end_time=MARCH_4, **{"group_by[]": group_by}),
        )
        assert observed(COSTS, grouped, group_by) == expected(
            usage, COSTS, organization=org, since=MARCH_1, until=MARCH_4, width=DAY, group_by=group_by
        )
    by_item = get(client, COSTS, admin_key, start_time=MARCH_1, end_time=MARCH_2, group_by="line_item")
    assert {r["line_item"]: r["amount"]["value"] for r in by_item["data"][0]["results"]} == {
        "embed": 0.000055,
        "gpt-large": 0.0475,
        "gpt-small": 0.00107,
    }
    only = get(client, COSTS, admin_key, start_time=MARCH_1, end_time=MARCH_2, line_items=["embed"])
    assert only["data"][0]["results"][0]["amount"]["value"] == 0.000055
    # Up to 180 days a page, as OpenAI allows for costs.
    long = get(client, COSTS, admin_key, start_time=MARCH_1, end_time=MARCH_1 + 200 * DAY, limit=180)
    assert len(long["data"]) == 180 and long["has_more"]


def test_another_organizations_usage_never_appears_and_its_ids_match_nothing(
    client: Client, admin_key: str, org: Organization, other_org: Organization, usage: Usage
) -> None:
    window: dict[str, Any] = {"start_time": MARCH_1, "end_time": MARCH_4}
    for path in (COMPLETIONS, EMBEDDINGS, COSTS):
        grouped = get(client, path, admin_key, **window, group_by=["project_id", "api_key_id"])
        named = {value for b in grouped["data"] for r in b["results"] for value in (r["project_id"], r["api_key_id"])}
        assert named <= {*usage.projects.values(), *usage.keys.values()}
        by_model = get(client, path, admin_key, **window, group_by="line_item" if path == COSTS else "model")
        assert "gpt-secret" not in str(by_model) and "secret-embed" not in str(by_model)
        # Globex's project and key ids answer exactly as made-up ones do: nothing, and no hint they exist.
        for param, theirs, made_up in (
            ("project_ids[]", usage.theirs.public_id, "proj_doesnotexist0000000"),
            ("api_key_ids[]", f"key_{usage.their_key.public_id}", "key_doesnotexist"),
        ):
            foreign = client.get(path, {**window, param: theirs}, headers=bearer(admin_key))
            unknown = client.get(path, {**window, param: made_up}, headers=bearer(admin_key))
            assert foreign.status_code == unknown.status_code == 200
            assert foreign.json() == unknown.json()
            assert all(bucket["results"] == [] for bucket in foreign.json()["data"])
    # Globex's own admin key sees Globex's usage, and only that.
    their_admin = apikey_create(organization=other_org, name="globex admin", scopes=["admin"], actor_label="t")[1]
    mine = get(client, COMPLETIONS, their_admin, **window, group_by="model")
    assert observed(COMPLETIONS, mine, ["model"]) == {MARCH_1: {("gpt-secret",): (777, 0, 777, 1)}}


def test_batch_user_and_service_tier_are_accepted_and_group_nothing(
    client: Client, admin_key: str, usage: Usage, validate_schema: Validate
) -> None:
    window = {"start_time": MARCH_1, "end_time": MARCH_2}
    plain = get(client, COMPLETIONS, admin_key, **window)
    grouped = valid(
        validate_schema, get(client, COMPLETIONS, admin_key, **window, group_by=["batch", "user_id", "service_tier"])
    )
    [result] = grouped["data"][0]["results"]
    # Keyway serves no Batch API: every call is a non-batch call.
    assert (result["batch"], result["user_id"], result["service_tier"]) == (False, None, None)
    assert _numbers(COMPLETIONS, result) == _numbers(COMPLETIONS, plain["data"][0]["results"][0])
    assert get(client, COMPLETIONS, admin_key, **window, batch="false") == plain
    assert get(client, COMPLETIONS, admin_key, **window, batch="true")["data"][0]["results"] == []


def test_day_and_hour_reports_read_the_roll_ups_once_and_never_the_ledger(
    client: Client, admin_key: str, usage: Usage
) -> None:
    query = {
        "start_time": MARCH_1,
        "end_time": MARCH_4,
        "group_by": ["project_id", "api_key_id"],
        "project_ids": [usage.main.public_id, usage.search.public_id],
    }
    for path, width, table in (
        (COMPLETIONS, "1d", "billing_usagedaily"),
        (COMPLETIONS, "1h", "billing_usagehourly"),
        (EMBEDDINGS, "1h", "billing_usagehourly"),
        (COSTS, "1d", "billing_usagedaily"),
    ):
        with CaptureQueriesContext(connection) as queries:
            body = get(client, path, admin_key, **query, bucket_width=width, limit=24 if width == "1h" else 3)
        assert any(bucket["results"] for bucket in body["data"])
        statements = [q["sql"].lower() for q in queries.captured_queries]
        assert not [s for s in statements if "billing_usageevent" in s], (path, width)
        assert len([s for s in statements if table in s]) == 1, (path, width)
    # Minutes come from the ledger, in one query too.
    with CaptureQueriesContext(connection) as queries:
        get(client, COMPLETIONS, admin_key, start_time=MARCH_1, end_time=MARCH_1 + HOUR, bucket_width="1m")
    assert len([q for q in queries.captured_queries if "billing_usageevent" in q["sql"].lower()]) == 1


def test_bad_parameters_are_400s_that_name_the_parameter(
    client: Client, admin_key: str, usage: Usage, validate_schema: Validate
) -> None:
    window = {"start_time": str(MARCH_1), "end_time": str(MARCH_4)}
    cases: list[tuple[str, dict[str, Any], str]] = [
        (COMPLETIONS, {}, "start_time"),
        (COMPLETIONS, {"start_time": ""}, "start_time"),
        (COMPLETIONS, {"start_time": "yesterday"}, "start_time"),
        (COMPLETIONS, {"start_time": "-5"}, "start_time"),
        (COMPLETIONS, {"start_time": "1.5"}, "start_time"),
        (COMPLETIONS, {"start_time": "１２３"}, "start_time"),
        (COMPLETIONS, {"start_time": "9" * 40}, "start_time"),
        (COMPLETIONS, {"start_time": str(10**11 + 1)}, "start_time"),
        # In the future, with no end_time: the range would end before it starts.
        (COMPLETIONS, {"start_time": str(int(timezone.now().timestamp()) + DAY)}, "start_time"),
        (COMPLETIONS, {**window, "end_time": "0x10"}, "end_time"),
        (COMPLETIONS, {**window, "end_time": str(MARCH_1)}, "end_time"),
        (COMPLETIONS, {**window, "end_time": str(MARCH_1 - 1)}, "end_time"),
        (COMPLETIONS, {**window, "bucket_width": "1w"}, "bucket_width"),
        (COMPLETIONS, {**window, "bucket_width": "1D"}, "bucket_width"),
        (COSTS, {**window, "bucket_width": "1h"}, "bucket_width"),
        (COMPLETIONS, {**window, "limit": "0"}, "limit"),
        (COMPLETIONS, {**window, "limit": "32"}, "limit"),
        (COMPLETIONS, {**window, "limit": "169", "bucket_width": "1h"}, "limit"),
        (COMPLETIONS, {**window, "limit": "1441", "bucket_width": "1m"}, "limit"),
        (COSTS, {**window, "limit": "181"}, "limit"),
        (EMBEDDINGS, {**window, "limit": "ten"}, "limit"),
        (EMBEDDINGS, {**window, "limit": "99999999999999999999999"}, "limit"),
        (COMPLETIONS, {**window, "group_by": "project"}, "group_by"),
        (COMPLETIONS, {**window, "group_by[]": ["model", "line_item"]}, "group_by"),
        (EMBEDDINGS, {**window, "group_by": "batch"}, "group_by"),
        (COSTS, {**window, "group_by": "model"}, "group_by"),
        (COSTS, {**window, "group_by": "user_id"}, "group_by"),
        (COMPLETIONS, {**window, "user_ids[]": ["user-abc"]}, "user_ids"),
        (EMBEDDINGS, {**window, "user_ids": ["user-abc"]}, "user_ids"),
        (COMPLETIONS, {**window, "batch": "maybe"}, "batch"),
        (COMPLETIONS, {**window, "batch": "true", "models": [f"m{i}" for i in range(101)]}, "models"),
        (COMPLETIONS, {**window, "models": [f"m{i}" for i in range(101)]}, "models"),
        (COSTS, {**window, "project_ids[]": [f"proj_{i}" for i in range(101)]}, "project_ids"),
        (COMPLETIONS, {**window, "page": "garbage"}, "page"),
        (COMPLETIONS, {**window, "page": "page_!!!!"}, "page"),
        (COMPLETIONS, {**window, "page": "page_AAAA"}, "page"),
        (COMPLETIONS, {**window, "page": "page_" + "A" * 5000}, "page"),
        (COMPLETIONS, {**window, "page": "page_é"}, "page"),
        # Cursors this query never wrote: not on a bucket boundary, before the range, at or past its end.
        (COMPLETIONS, {**window, "page": page_cursor(MARCH_1 + 1)}, "page"),
        (COMPLETIONS, {**window, "page": page_cursor(MARCH_1 - DAY)}, "page"),
        (COMPLETIONS, {**window, "page": page_cursor(MARCH_4)}, "page"),
        (COMPLETIONS, {**window, "page": page_cursor(2**64 - 1)}, "page"),
    ]
    for path, params, param in cases:
        response = client.get(path, params, headers=bearer(admin_key))
        assert response.status_code == 400, (path, params, response.content[:300])
        body = response.json()
        validate_schema("ErrorResponse", body)
        assert body["error"]["param"] == param, (path, params, body)
        assert body["error"]["type"] == "invalid_request_error"


def test_a_page_cursor_of_a_day_continues_an_hourly_report_at_that_hour(
    client: Client, admin_key: str, usage: Usage
) -> None:
    # A cursor holds nothing but a time, so it can name only the caller's own usage at that time.
    body = get(
        client,
        COMPLETIONS,
        admin_key,
        start_time=MARCH_1,
        end_time=MARCH_2,
        bucket_width="1h",
        limit=2,
        page=page_cursor(_at(2025, 3, 1, 10)),
    )
    assert [b["start_time"] for b in body["data"]] == [_at(2025, 3, 1, 10), _at(2025, 3, 1, 11)]
    assert body["next_page"] == page_cursor(_at(2025, 3, 1, 12))


def test_only_admin_keys_and_signed_in_owners_and_admins_may_read_usage(
    client: Client, org: Organization, admin_key: str, usage: Usage
) -> None:
    _, project_key = apikey_create(organization=org, name="plain", actor_label="test")
    window = {"start_time": MARCH_1, "end_time": MARCH_4}
    for path in (COMPLETIONS, EMBEDDINGS, COSTS):
        anonymous = client.get(path, window)
        assert anonymous.status_code == 401 and anonymous.json()["error"]["param"] is None
        refused = client.get(path, window, headers=bearer(project_key))
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "missing_scope"
        assert "input_tokens" not in refused.content.decode()

    users = get_user_model().objects
    owner = users.create_user("olga", email="olga@example.com", password="x" * 12)
    reader = users.create_user("ray", email="ray@example.com", password="x" * 12)
    membership_set(organization=org, user=owner, role=Role.OWNER)
    membership_set(organization=org, user=reader, role=Role.READER)
    session = Client(enforce_csrf_checks=True)
    session.force_login(reader)
    denied = session.get(COSTS, window)
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    session.force_login(owner)
    allowed = session.get(COSTS, window)
    assert allowed.status_code == 200 and allowed.json()["data"][0]["results"][0]["amount"]["value"] == 0.048625


def test_the_openapi_document_lists_the_usage_and_costs_paths(client: Client) -> None:
    from openapi_spec_validator import validate

    document = client.get("/v1/organization/openapi.json").json()
    validate(document)
    for path in (COMPLETIONS, EMBEDDINGS, COSTS):
        operation = document["paths"][path]["get"]
        assert {"start_time", "bucket_width", "group_by", "page"} <= {p["name"] for p in operation["parameters"]}


@pytest.mark.django_db(transaction=True)
async def test_the_official_sdk_reads_usage_and_costs_pages(org: Organization, other_org: Organization) -> None:
    from platform_site.asgi import application

    usage = await sync_to_async(_usage_of)(org, other_org)
    admin_key = (await sync_to_async(apikey_create)(organization=org, name="sdk", scopes=["admin"]))[1]
    client = openai.AsyncOpenAI(
        base_url="http://127.0.0.1/v1",
        api_key="unused",
        admin_api_key=admin_key,
        max_retries=0,
        http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=application)),
    )
    async with client:
        reports = client.admin.organization.usage
        # The SDK sends lists as `group_by[]=…`.
        first = await reports.completions(
            start_time=MARCH_1,
            end_time=MARCH_4,
            bucket_width="1h",
            limit=24,
            group_by=["model", "project_id"],
            project_ids=[usage.search.public_id],
        )
        assert first.has_more and first.next_page
        rest = await reports.completions(
            start_time=MARCH_1,
            end_time=MARCH_4,
            bucket_width="1h",
            limit=48,
            group_by=["model", "project_id"],
            project_ids=[usage.search.public_id],
            page=first.next_page,
        )
        assert len(first.data) + len(rest.data) == 72 and not rest.has_more
        results = [r for bucket in [*first.data, *rest.data] for r in bucket.results]
        # Both of the Search project's calls were made at 10 o'clock on 1 March, in one bucket.
        assert sorted((r.model, r.project_id, r.num_model_requests) for r in results) == [
            ("gpt-large", usage.search.public_id, 1),
            ("gpt-small", usage.search.public_id, 1),
        ]
        assert {bucket.start_time for bucket in first.data if bucket.results} == {_at(2025, 3, 1, 10)}
        embeddings = await reports.embeddings(start_time=MARCH_1, end_time=MARCH_2)
        assert embeddings.data[0].results[0].input_tokens == 5_000
        costs = await reports.costs(start_time=MARCH_1, end_time=MARCH_2, group_by=["line_item"])
        assert sorted(r.line_item or "" for r in costs.data[0].results) == ["embed", "gpt-large", "gpt-small"]
        with pytest.raises(openai.BadRequestError) as refused:
            await reports.completions(start_time=MARCH_1, bucket_width="1h", limit=1000)
        assert refused.value.param == "limit"
