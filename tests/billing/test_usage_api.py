"""The billing API (/api/billing/): reports and the CSV export agree with the usage ledger, statements add up,
and nobody reads an organization they do not belong to."""

from __future__ import annotations

import csv
import io
import warnings
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.contrib.auth import get_user_model
from django.http import StreamingHttpResponse
from django.test import Client
from django.utils import timezone

from apikeys.models import ApiKey
from apikeys.scopes import KEY_SCOPES
from apikeys.services import apikey_create
from billing import api
from billing.models import CreditEntry, UsageEvent
from billing.services import SettledUsage, credit_add, usage_events_write
from platform_site.models import Membership, Organization
from platform_site.services import membership_set
from tests.conftest import bearer

pytestmark = pytest.mark.django_db

MARCH = {"start": "2025-03-01", "end": "2025-03-05"}


def _at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def _event(
    request_id: str,
    organization: Organization,
    key: ApiKey | None,
    when: datetime,
    *,
    model: str = "gpt-small",
    prompt: int = 100,
    cached: int = 0,
    completion: int = 50,
    cost: int = 1_000,
    status: int = UsageEvent.Status.OK,
) -> SettledUsage:
    return SettledUsage(
        call_id=request_id,
        request_id=request_id,
        session_id="",
        organization_id=organization.pk,
        api_key_id=key.pk if key is not None else None,
        endpoint=UsageEvent.Endpoint.CHAT,
        model=model,
        deployment_id=None,
        provider="fake",
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
        cost_micros=cost,
        status=status,
        usage_source=UsageEvent.UsageSource.REPORTED,
        latency_ms=120,
        ttft_ms=None,
        created_at=when.timestamp(),
    )


@pytest.fixture
def api_key(org: Organization) -> tuple[ApiKey, str]:
    """This module's key reads usage: a scope a key gets only when it is asked for."""
    return apikey_create(organization=org, name="test key", actor_label="test", scopes=KEY_SCOPES)


@pytest.fixture
def second_key(org: Organization) -> tuple[ApiKey, str]:
    return apikey_create(organization=org, name="batch jobs", actor_label="test")


def test_a_key_made_with_the_default_scopes_cannot_read_usage(client: Client, org: Organization) -> None:
    _, raw = apikey_create(organization=org, name="backend", actor_label="test")
    response = client.get("/api/billing/usage", headers=bearer(raw))
    assert response.status_code == 403 and response.json()["error"]["code"] == "missing_scope"


@pytest.fixture
def ledger(
    org: Organization, other_org: Organization, api_key: tuple[ApiKey, str], second_key: tuple[ApiKey, str]
) -> list[SettledUsage]:
    """Acme's usage around March 2025 (boundaries included), written the way metering writes it, plus
    Globex's usage in the same days, which no Acme report may ever show."""
    key, batch = api_key[0], second_key[0]
    foreign, _ = apikey_create(organization=other_org, name="globex key", actor_label="test")
    events = [
        _event("req_feb_last", org, key, _at(2025, 2, 28, 23, 59, 59), cost=7),
        _event("req_mar1_a", org, key, _at(2025, 3, 1, 0, 0, 0), model="gpt-small", cost=1_500),
        _event("req_mar1_b", org, batch, _at(2025, 3, 1, 13, 5), model="gpt-large", prompt=1_000, cached=200,
               completion=300, cost=42_000),
        _event("req_mar2_a", org, key, _at(2025, 3, 2, 8), model="gpt-large", prompt=10, completion=0, cost=30,
               status=UsageEvent.Status.CLIENT_DISCONNECTED),
        _event("req_mar2_b", org, None, _at(2025, 3, 2, 9), model="gpt-small", cost=900),
        _event("req_mar4_a", org, batch, _at(2025, 3, 4, 12), model="embed", prompt=5_000, completion=0, cost=55),
        _event("req_mar5_last", org, key, _at(2025, 3, 5, 23, 59, 59), model="gpt-small", cost=1_234_567),
        _event("req_mar6_first", org, key, _at(2025, 3, 6, 0, 0, 0), cost=11),
        _event("req_globex", other_org, foreign, _at(2025, 3, 3, 10), cost=999_999, model="gpt-secret"),
    ]
    assert usage_events_write(events) == len(events)
    return events


def _in_march(events: Iterable[SettledUsage], organization: Organization) -> list[SettledUsage]:
    since, until = _at(2025, 3, 1).timestamp(), _at(2025, 3, 6).timestamp()
    return [e for e in events if e.organization_id == organization.pk and since <= e.created_at < until]


def _sums(events: Iterable[SettledUsage]) -> dict[str, int]:
    events = list(events)
    prompt, completion = sum(e.prompt_tokens for e in events), sum(e.completion_tokens for e in events)
    return {
        "requests": len(events),
        "prompt_tokens": prompt,
        "cached_tokens": sum(e.cached_tokens for e in events),
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost_micros": sum(e.cost_micros for e in events),
    }


def _numbers(row: dict[str, Any]) -> dict[str, int]:
    return {name: row[name] for name in ("requests", "prompt_tokens", "cached_tokens", "completion_tokens",
                                         "total_tokens", "cost_micros")}


def _member(username: str, *organizations: Organization) -> Client:
    user = get_user_model().objects.create_user(username, password="x" * 16)
    for organization in organizations:
        membership_set(organization=organization, user=user, role=Membership.Role.MEMBER, actor_label="test")
    client = Client()
    client.force_login(user)
    return client


def _read_stream(response: StreamingHttpResponse) -> str:
    # Consumed the way the ASGI handler consumes it (the iterator is asynchronous on purpose; see billing.api).
    async def collect() -> bytes:
        return b"".join([chunk async for chunk in response.streaming_content])  # type: ignore[union-attr]

    return async_to_sync(collect)().decode()


@pytest.mark.parametrize("group_by", ["day", "model", "key"])
def test_usage_grouped_by_day_model_and_key_adds_up_to_the_ledger(
    client: Client, api_key: tuple[ApiKey, str], second_key: tuple[ApiKey, str], org: Organization,
    ledger: list[SettledUsage], group_by: str,
) -> None:
    response = client.get("/api/billing/usage", {**MARCH, "group_by": group_by}, headers=bearer(api_key[1]))
    assert response.status_code == 200, response.content
    body = response.json()
    expected_events = _in_march(ledger, org)
    assert body["object"] == "list" and body["group_by"] == group_by and body["organization"] == "acme"
    assert _numbers(body["totals"]) == _sums(expected_events)
    assert body["totals"]["cost_usd"] == "1.279052"

    bucket_of = {
        "day": lambda e: datetime.fromtimestamp(e.created_at, tz=UTC).date().isoformat(),
        "model": lambda e: e.model,
        "key": lambda e: {api_key[0].pk: api_key[0].public_id, second_key[0].pk: second_key[0].public_id}.get(
            e.api_key_id
        ),
    }[group_by]
    field = {"day": "date", "model": "model", "key": "api_key"}[group_by]
    expected: defaultdict[Any, list[SettledUsage]] = defaultdict(list)
    for event in expected_events:
        expected[bucket_of(event)].append(event)
    assert {row[field]: _numbers(row) for row in body["data"]} == {
        bucket: _sums(events) for bucket, events in expected.items()
    }
    for row in body["data"]:
        assert row["cost_usd"] == f"{row['cost_micros'] / 1_000_000:.6f}"


def test_usage_by_day_is_in_date_order_and_key_rows_name_the_key(
    client: Client, api_key: tuple[ApiKey, str], second_key: tuple[ApiKey, str], ledger: list[SettledUsage]
) -> None:
    days = client.get("/api/billing/usage", MARCH, headers=bearer(api_key[1])).json()
    assert [row["date"] for row in days["data"]] == ["2025-03-01", "2025-03-02", "2025-03-04", "2025-03-05"]
    keys = client.get("/api/billing/usage", {**MARCH, "group_by": "key"}, headers=bearer(api_key[1])).json()
    # Most expensive first; usage without a key (a deleted key's) keeps its own row.
    assert [(row["api_key"], row["api_key_name"]) for row in keys["data"]] == [
        (api_key[0].public_id, "test key"),
        (second_key[0].public_id, "batch jobs"),
        (None, None),
    ]


def test_date_range_includes_both_ends_and_nothing_beyond(
    client: Client, api_key: tuple[ApiKey, str], org: Organization, ledger: list[SettledUsage]
) -> None:
    one_day = client.get("/api/billing/usage", {"start": "2025-03-05", "end": "2025-03-05"},
                         headers=bearer(api_key[1])).json()
    assert one_day["totals"]["requests"] == 1 and one_day["totals"]["cost_micros"] == 1_234_567
    february = client.get("/api/billing/usage", {"start": "2025-02-01", "end": "2025-02-28"},
                          headers=bearer(api_key[1])).json()
    assert february["totals"]["requests"] == 1 and february["totals"]["cost_micros"] == 7
    everything = client.get("/api/billing/usage", {"start": "2025-01-01", "end": "2025-12-31"},
                            headers=bearer(api_key[1])).json()
    assert _numbers(everything["totals"]) == _sums(e for e in ledger if e.organization_id == org.pk)


def test_model_and_key_filters_narrow_the_report(
    client: Client, api_key: tuple[ApiKey, str], second_key: tuple[ApiKey, str], org: Organization,
    ledger: list[SettledUsage],
) -> None:
    march = _in_march(ledger, org)
    by_model = client.get("/api/billing/usage", {**MARCH, "model": "gpt-large"}, headers=bearer(api_key[1])).json()
    assert _numbers(by_model["totals"]) == _sums(e for e in march if e.model == "gpt-large")
    by_key = client.get("/api/billing/usage", {**MARCH, "api_key": second_key[0].public_id, "group_by": "model"},
                        headers=bearer(api_key[1])).json()
    assert _numbers(by_key["totals"]) == _sums(e for e in march if e.api_key_id == second_key[0].pk)
    assert {row["model"] for row in by_key["data"]} == {"gpt-large", "embed"}


def test_default_range_is_the_last_30_days(client: Client, api_key: tuple[ApiKey, str], org: Organization) -> None:
    now = timezone.now()
    usage_events_write([
        _event("req_today", org, api_key[0], now, cost=5),
        _event("req_29_days_ago", org, api_key[0], now - timedelta(days=29), cost=6),
        _event("req_31_days_ago", org, api_key[0], now - timedelta(days=31), cost=7),
    ])
    body = client.get("/api/billing/usage", headers=bearer(api_key[1])).json()
    assert body["end"] == now.date().isoformat()
    assert body["start"] == (now.date() - timedelta(days=29)).isoformat()
    assert body["totals"]["cost_micros"] == 11


def test_csv_export_lists_exactly_the_ledger_rows(
    client: Client, api_key: tuple[ApiKey, str], org: Organization, ledger: list[SettledUsage],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pages of two rows make the export cross several keyset pages, one of them inside a run of rows that
    # share a timestamp, where only the id orders them.
    monkeypatch.setattr(api, "_EXPORT_PAGE", 2)
    same_instant = _at(2025, 3, 3, 12)
    usage_events_write([_event(f"req_tie_{n}", org, api_key[0], same_instant, cost=n) for n in range(5)])

    response = client.get("/api/billing/usage.csv", MARCH, headers=bearer(api_key[1]))
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert 'filename="keyway-usage-acme-2025-03-01-2025-03-05.csv"' in response["Content-Disposition"]
    text = _read_stream(response)
    rows = list(csv.DictReader(io.StringIO(text)))

    ledger_rows = UsageEvent.objects.filter(
        organization=org, created_at__gte=_at(2025, 3, 1), created_at__lt=_at(2025, 3, 6)
    ).select_related("api_key").order_by("created_at", "id")
    assert [row["request_id"] for row in rows] == [event.request_id for event in ledger_rows]
    for row, event in zip(rows, ledger_rows, strict=True):
        assert datetime.fromisoformat(row["created_at"]) == event.created_at
        assert row["model"] == event.model and row["endpoint"] == "chat.completions"
        assert row["api_key"] == (event.api_key.public_id if event.api_key else "")
        assert row["status"] == UsageEvent.Status(event.status).label
        assert int(row["prompt_tokens"]) == event.prompt_tokens
        assert int(row["cached_tokens"]) == event.cached_tokens
        assert int(row["completion_tokens"]) == event.completion_tokens
        assert int(row["total_tokens"]) == event.prompt_tokens + event.completion_tokens
        assert int(row["cost_micros"]) == event.cost_micros
        assert row["cost_usd"] == f"{event.cost_micros / 1_000_000:.6f}"

    report = client.get("/api/billing/usage", MARCH, headers=bearer(api_key[1])).json()
    assert sum(int(row["cost_micros"]) for row in rows) == report["totals"]["cost_micros"]
    assert len(rows) == report["totals"]["requests"]
    assert "req_globex" not in text and "gpt-secret" not in text
    assert api_key[1] not in text and api_key[0].secret_hash not in text


def test_csv_export_of_an_empty_range_is_the_header_alone(client: Client, api_key: tuple[ApiKey, str]) -> None:
    response = client.get("/api/billing/usage.csv", {"start": "2020-01-01", "end": "2020-01-31"},
                          headers=bearer(api_key[1]))
    assert _read_stream(response).splitlines() == [",".join(api._CSV_HEADER)]


def test_key_without_usage_read_scope_gets_403(client: Client, org: Organization, ledger: list[SettledUsage]) -> None:
    _, raw = apikey_create(organization=org, name="chat only", scopes=["chat", "models:read"], actor_label="test")
    for path in ("/api/billing/usage", "/api/billing/usage.csv", "/api/billing/balance", "/api/billing/credits",
                 "/api/billing/statements/2025-03"):
        response = client.get(path, headers=bearer(raw))
        assert response.status_code == 403, path
        error = response.json()["error"]
        assert error["type"] == "permission_error" and error["code"] == "missing_scope"
        assert "usage:read" in error["message"]


def test_a_usage_read_only_key_is_enough(client: Client, org: Organization, ledger: list[SettledUsage]) -> None:
    _, raw = apikey_create(organization=org, name="reader", scopes=["usage:read"], actor_label="test")
    assert client.get("/api/billing/usage", MARCH, headers=bearer(raw)).json()["totals"]["requests"] == 6


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer sk-kw-nonsense"}, {"Authorization": "Basic dXNlcjpwYXNz"}],
)
def test_missing_or_invalid_credentials_get_401_in_openai_shape(client: Client, headers: dict[str, str]) -> None:
    response = client.get("/api/billing/usage", headers=headers)
    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_revoked_key_gets_401(client: Client, api_key: tuple[ApiKey, str]) -> None:
    from apikeys.services import apikey_revoke

    apikey_revoke(key=api_key[0], actor_label="test")
    assert client.get("/api/billing/balance", headers=bearer(api_key[1])).status_code == 401


def test_member_reads_their_organization_with_a_session(org: Organization, ledger: list[SettledUsage]) -> None:
    member = _member("ada", org)
    body = member.get("/api/billing/usage", MARCH).json()
    assert body["organization"] == "acme" and body["totals"]["requests"] == 6
    assert member.get("/api/billing/usage", {**MARCH, "organization": "acme"}).json()["totals"]["requests"] == 6


def test_a_member_of_another_organization_cannot_read_it(
    org: Organization, other_org: Organization, ledger: list[SettledUsage]
) -> None:
    # The third user, whose only job is to prove tenant isolation: a member of Globex, never of Acme.
    outsider = _member("eve", other_org)
    for path in ("/api/billing/usage", "/api/billing/usage.csv", "/api/billing/balance", "/api/billing/credits",
                 "/api/billing/statements/2025-03"):
        response = outsider.get(path, {**MARCH, "organization": "acme"})
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "organization_not_found"
        # An organization that does not exist is answered the same way: the slug reveals nothing.
        unknown = outsider.get(path, {**MARCH, "organization": "no-such-org"})
        assert unknown.status_code == 404 and unknown.json()["error"]["message"].startswith("No organization")
    own = outsider.get("/api/billing/usage", MARCH).json()
    assert own["organization"] == "globex" and own["totals"]["cost_micros"] == 999_999


def test_a_key_reads_only_its_own_organization(
    client: Client, other_org: Organization, ledger: list[SettledUsage]
) -> None:
    _, globex_raw = apikey_create(organization=other_org, name="globex reader", actor_label="test",
                                  scopes=KEY_SCOPES)
    refused = client.get("/api/billing/usage", {**MARCH, "organization": "acme"}, headers=bearer(globex_raw))
    assert refused.status_code == 404
    own = client.get("/api/billing/usage", MARCH, headers=bearer(globex_raw)).json()
    assert own["organization"] == "globex" and own["totals"]["requests"] == 1


def test_a_user_without_organizations_gets_403_and_one_with_several_must_choose(
    org: Organization, other_org: Organization, ledger: list[SettledUsage]
) -> None:
    lonely = _member("nobody")
    assert lonely.get("/api/billing/balance").status_code == 403
    both = _member("consultant", org, other_org)
    response = both.get("/api/billing/balance")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "organization"
    assert both.get("/api/billing/balance", {"organization": "globex"}).json()["organization"] == "globex"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"start": "2025-13-01"}, "start"),
        ({"start": "2025-02-30"}, "start"),
        ({"start": "20250301"}, "start"),
        ({"end": "yesterday"}, "end"),
        ({"start": "2025-03-05", "end": "2025-03-01"}, "start"),
        ({"start": "2024-01-01", "end": "2025-01-01"}, "end"),
        ({"group_by": "week"}, "group_by"),
    ],
)
def test_bad_query_parameters_get_400_in_openai_shape(
    client: Client, api_key: tuple[ApiKey, str], params: dict[str, str], param: str
) -> None:
    # The export has no grouping; every other parameter means the same to both.
    paths = ["/api/billing/usage"] + (["/api/billing/usage.csv"] if param != "group_by" else [])
    for path in paths:
        response = client.get(path, params, headers=bearer(api_key[1]))
        assert response.status_code == 400, (path, params)
        assert response["Content-Type"] == "application/json"
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param


def test_a_range_of_366_days_is_accepted(client: Client, api_key: tuple[ApiKey, str]) -> None:
    response = client.get("/api/billing/usage", {"start": "2024-01-01", "end": "2024-12-31"},
                          headers=bearer(api_key[1]))
    assert response.status_code == 200


def test_an_unknown_key_or_another_organizations_is_not_found(
    client: Client, api_key: tuple[ApiKey, str], other_org: Organization
) -> None:
    foreign, _ = apikey_create(organization=other_org, name="theirs", actor_label="test")
    for public_id in (foreign.public_id, "nosuchkey123"):
        for path in ("/api/billing/usage", "/api/billing/usage.csv"):
            response = client.get(path, {"api_key": public_id}, headers=bearer(api_key[1]))
            assert response.status_code == 404, (path, public_id)
            assert response.json()["error"]["param"] == "api_key"
            assert response.json()["error"]["code"] == "not_found"


def test_balance_is_credits_minus_usage_and_shows_this_months_spend(
    client: Client, api_key: tuple[ApiKey, str], org: Organization, ledger: list[SettledUsage]
) -> None:
    credit_add(organization=org, amount_micros=5_000_000, reason="welcome", actor_label="test")
    credit_add(organization=org, amount_micros=-250_000, reason="refund fix", kind=CreditEntry.Kind.ADJUSTMENT,
               actor_label="test")
    usage_events_write([_event("req_now", org, api_key[0], timezone.now(), cost=4_321)])
    body = client.get("/api/billing/balance", headers=bearer(api_key[1])).json()
    usage = sum(e.cost_micros for e in ledger if e.organization_id == org.pk) + 4_321
    assert body["credit_total_micros"] == 4_750_000
    assert body["usage_total_micros"] == usage
    assert body["balance_micros"] == 4_750_000 - usage
    assert body["balance_usd"] == f"{(4_750_000 - usage) / 1_000_000:.6f}"
    assert body["month_spend_micros"] == 4_321 and body["month"] == timezone.now().strftime("%Y-%m")
    assert body["billing_mode"] in ("prepaid", "postpaid") and body["plan"] is None


def test_balance_of_an_organization_never_billed_is_zero_and_creates_nothing(
    client: Client, api_key: tuple[ApiKey, str]
) -> None:
    from billing.models import BillingAccount

    body = client.get("/api/billing/balance", headers=bearer(api_key[1])).json()
    assert body["balance_micros"] == 0 and body["credit_total_micros"] == 0
    assert not BillingAccount.objects.exists()


def test_credit_ledger_is_paginated_newest_first(
    client: Client, api_key: tuple[ApiKey, str], org: Organization, other_org: Organization
) -> None:
    for amount in (1, 2, 3, 4, 5):
        credit_add(organization=org, amount_micros=amount * 1_000_000, reason=f"top-up {amount}", actor_label="test")
    credit_add(organization=other_org, amount_micros=9_000_000, reason="not yours", actor_label="test")
    first = client.get("/api/billing/credits", {"limit": 2}, headers=bearer(api_key[1])).json()
    assert [entry["amount_micros"] for entry in first["data"]] == [5_000_000, 4_000_000]
    assert first["has_more"] is True and first["data"][0]["credit_total_after_micros"] == 15_000_000
    rest = client.get("/api/billing/credits", {"limit": 10, "after": first["last_id"]},
                      headers=bearer(api_key[1])).json()
    assert [entry["reason"] for entry in rest["data"]] == ["top-up 3", "top-up 2", "top-up 1"]
    assert rest["has_more"] is False
    assert client.get("/api/billing/credits", {"limit": 0}, headers=bearer(api_key[1])).status_code == 400


def test_monthly_statement_adds_up(
    client: Client, api_key: tuple[ApiKey, str], org: Organization, ledger: list[SettledUsage]
) -> None:
    def backdated(amount: int, reason: str, when: datetime, kind: str = CreditEntry.Kind.TOPUP) -> None:
        entry = credit_add(organization=org, amount_micros=amount, reason=reason, kind=kind, actor_label="test")
        CreditEntry.objects.filter(pk=entry.pk).update(created_at=when)

    backdated(2_000_000, "february top-up", _at(2025, 2, 10))
    backdated(3_000_000, "march top-up", _at(2025, 3, 10))
    backdated(-100_000, "march correction", _at(2025, 3, 31, 23, 59, 59), CreditEntry.Kind.ADJUSTMENT)
    backdated(8_000_000, "april top-up", _at(2025, 4, 1))

    body = client.get("/api/billing/statements/2025-03", headers=bearer(api_key[1])).json()
    assert body["object"] == "billing.statement" and body["complete"] is True
    assert body["opening_balance_micros"] == 2_000_000 - 7
    assert body["credits"]["total_micros"] == 2_900_000
    assert [entry["reason"] for entry in body["credits"]["data"]] == ["march top-up", "march correction"]
    march_usage = [e for e in ledger if e.organization_id == org.pk and _at(2025, 3, 1).timestamp() <= e.created_at
                   < _at(2025, 4, 1).timestamp()]
    assert _numbers(body["usage"]["totals"]) == _sums(march_usage)
    assert sum(row["cost_micros"] for row in body["usage"]["data"]) == body["usage"]["totals"]["cost_micros"]
    assert body["closing_balance_micros"] == (
        body["opening_balance_micros"] + body["credits"]["total_micros"] - body["usage"]["totals"]["cost_micros"]
    )
    # The closing balance is also what both ledgers add up to on 1 April, counted independently.
    credits_by_april = 2_000_000 + 3_000_000 - 100_000
    usage_by_april = sum(e.cost_micros for e in ledger if e.organization_id == org.pk
                         and e.created_at < _at(2025, 4, 1).timestamp())
    assert body["closing_balance_micros"] == credits_by_april - usage_by_april
    april = client.get("/api/billing/statements/2025-04", headers=bearer(api_key[1])).json()
    assert april["opening_balance_micros"] == body["closing_balance_micros"]


@pytest.mark.parametrize("month", ["2025-3", "2025-13", "march", "2999-01", "0000-01", "0001-01", "1999-12",
                                   "\u0662\u0660\u0662\u0665-03"])
def test_bad_or_future_statement_months_get_400(client: Client, api_key: tuple[ApiKey, str], month: str) -> None:
    response = client.get(f"/api/billing/statements/{month}", headers=bearer(api_key[1]))
    assert response.status_code == 400 and response.json()["error"]["param"] == "month"


def test_the_billing_api_is_rate_limited_with_an_openai_429(
    client: Client, api_key: tuple[ApiKey, str], org: Organization, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api.BillingApi, "rate", "2/m")
    assert client.get("/api/billing/balance", headers=bearer(api_key[1])).status_code == 200
    assert client.get("/api/billing/credits", headers=bearer(api_key[1])).status_code == 200
    refused = client.get("/api/billing/usage", headers=bearer(api_key[1]))
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert 1 <= int(refused["Retry-After"]) <= 60
    # The limit is per caller: another key of the same organization still gets through.
    _, other_raw = apikey_create(organization=org, name="second", actor_label="test", scopes=KEY_SCOPES)
    assert client.get("/api/billing/balance", headers=bearer(other_raw)).status_code == 200


def test_errors_are_json_even_when_a_browser_asks_for_html(client: Client, api_key: tuple[ApiKey, str]) -> None:
    accept = {"Accept": "text/html,application/xhtml+xml"}
    ok = client.get("/api/billing/balance", headers={**bearer(api_key[1]), **accept})
    assert ok.status_code == 200 and ok["Content-Type"] == "application/json"
    refused = client.get("/api/billing/balance", headers=accept)
    assert refused.status_code == 401 and refused["Content-Type"] == "application/json"
    unknown = client.get("/api/billing/nothing-here", headers=accept)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_url"
    posted = client.post("/api/billing/balance", headers=bearer(api_key[1]))
    assert posted.status_code == 405 and posted.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.django_db(transaction=True)
async def test_csv_export_streams_through_the_real_asgi_app(
    asgi_client: Any, api_key: tuple[ApiKey, str], org: Organization, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Production serves this path with Django's ASGI handler, which iterates the response asynchronously; a
    # synchronous iterator would be read to the end into memory first (and warn).
    monkeypatch.setattr(api, "_EXPORT_PAGE", 3)
    events = [_event(f"req_{n:02d}", org, api_key[0], _at(2025, 3, 1, n % 24), cost=n) for n in range(10)]
    await sync_to_async(usage_events_write)(events)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        response = await asgi_client.get("/api/billing/usage.csv", params=MARCH, headers=bearer(api_key[1]))
    assert not [w for w in caught if "StreamingHttpResponse" in str(w.message)]
    assert response.status_code == 200 and response.headers["x-request-id"].startswith("req_")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert sorted(row["request_id"] for row in rows) == [event.request_id for event in events]
    assert sum(int(row["cost_micros"]) for row in rows) == sum(range(10))


def test_the_openapi_document_is_served_without_a_key_and_other_methods_get_an_error_object(client: Client) -> None:
    from openapi_spec_validator import validate

    document = client.get("/api/billing/openapi.json", {"format": "yaml", "x": "y" * 5000})
    assert document.status_code == 200
    validate(document.json())
    assert {"/api/billing/usage", "/api/billing/balance"} <= set(document.json()["paths"])
    for path in ("/api/billing/openapi.json", "/v1/organization/openapi.json"):
        for method in ("post", "put", "delete"):
            answer = getattr(client, method)(path, data="{not json", content_type="application/json")
            assert answer.status_code == 405, (path, method, answer.status_code)
            assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
