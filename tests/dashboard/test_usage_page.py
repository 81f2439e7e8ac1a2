"""The usage page and its CSV export: the figures equal the ledger's for any range and filter, every
member may read them, and nothing of another organization is ever shown or matched."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apikeys.models import ApiKey
from apikeys.services import apikey_create
from billing.models import UsageEvent
from billing.services import SettledUsage, usage_events_write
from platform_site.models import Organization, Role
from platform_site.selectors import default_project
from platform_site.services import membership_set, organization_create
from tests.dashboard.test_pages import _client, _user

pytestmark = pytest.mark.django_db


def _event(n: int, organization: Organization, key: ApiKey | None, when: datetime, **fields: int | str) -> SettledUsage:
    values = {"model": "gpt-small", "prompt": 100, "completion": 40, "cost": 2_500, "status": 1, "latency": 120,
              "endpoint": UsageEvent.Endpoint.CHAT, **fields}
    return SettledUsage(
        call_id=f"{organization.pk}-{n}", request_id=f"{organization.pk}-{n}", session_id="",
        organization_id=organization.pk, api_key_id=key.pk if key else None, endpoint=int(values["endpoint"]),
        model=str(values["model"]), deployment_id=None, provider="fake", prompt_tokens=int(values["prompt"]),
        cached_tokens=0, completion_tokens=int(values["completion"]), cost_micros=int(values["cost"]),
        status=int(values["status"]), usage_source=UsageEvent.UsageSource.REPORTED,
        latency_ms=int(values["latency"]), ttft_ms=None, created_at=when.timestamp(),
        project_id=key.project_id if key else None,
    )


@pytest.fixture
def alice() -> User:
    return _user("alice@example.com")


@pytest.fixture
def acme(alice: User) -> Organization:
    return organization_create(name="Acme", owner=alice)


@pytest.fixture
def rival() -> Organization:
    return organization_create(name="Rival", owner=_user("rival@example.com"))


@pytest.fixture
def keys(acme: Organization) -> list[ApiKey]:
    return [apikey_create(organization=acme, name=name, actor_label="test")[0] for name in ("web", "batch")]


def _today(hour: int = 12) -> datetime:
    return timezone.now().astimezone(UTC).replace(hour=hour, minute=0, second=0, microsecond=0)


def test_a_new_organization_sees_how_to_make_its_first_call(alice: User, acme: Organization) -> None:
    page = _client(alice).get("/usage").content.decode()
    assert "No usage yet" in page and "Create an API key" in page and "chat.completions" in page.replace("/", ".")
    assert "usage-data" not in page


def test_the_page_shows_this_months_spend_by_key_and_model_as_the_ledger_has_it(
    alice: User, acme: Organization, keys: list[ApiKey], rival: Organization
) -> None:
    web, batch = keys
    usage_events_write([
        _event(1, acme, web, _today(), cost=1_000_000),
        _event(2, acme, web, _today(), model="gpt-large", cost=2_500_000, status=2, latency=900),
        _event(3, acme, batch, _today(), cost=500_000),
        _event(4, rival, None, _today(), cost=9_000_000, model="rival-secret-model"),
    ])
    client = _client(alice)
    with CaptureQueriesContext(connection) as queries:
        page = client.get("/usage").content.decode()
    assert not [q for q in queries.captured_queries if "usageevent" in q["sql"].lower()]
    assert "$4.00" in page and "33.3%" in page  # three calls, one an error
    assert "rival-secret-model" not in page and "9.00" not in page
    data = json.loads(re.search(r'<script id="usage-data" type="application/json">(.*?)</script>', page,
                                re.S).group(1))  # type: ignore[union-attr]
    assert {s["label"]: sum(s["data"]) for s in data["spend"]} == {"gpt-large": 2.5, "gpt-small": 1.5}
    by_key = client.get("/usage", {"breakdown": "key"}).content.decode()
    data = json.loads(re.search(r'id="usage-data" type="application/json">(.*?)</script>', by_key,
                                re.S).group(1))  # type: ignore[union-attr]
    assert {s["label"]: sum(s["data"]) for s in data["spend"]} == {"web": 3.5, "batch": 0.5}
    only_batch = client.get("/usage", {"api_key": batch.public_id}).content.decode()
    assert "$0.50" in only_batch and "$4.00" not in only_batch


def test_a_reader_sees_usage_too(acme: Organization, keys: list[ApiKey]) -> None:
    reader = _user("reader@example.com")
    membership_set(organization=acme, user=reader, role=Role.READER)
    usage_events_write([_event(1, acme, keys[0], _today(), cost=1_230_000)])
    assert "$1.23" in _client(reader).get("/usage").content.decode()


def test_another_organizations_key_or_project_filters_nothing_and_says_nothing(
    alice: User, acme: Organization, keys: list[ApiKey], rival: Organization
) -> None:
    theirs = apikey_create(organization=rival, name="theirs", actor_label="test")[0]
    usage_events_write([_event(1, acme, keys[0], _today(), cost=1_000_000),
                        _event(2, rival, theirs, _today(), cost=7_000_000)])
    client = _client(alice)
    for params in ({"api_key": theirs.public_id}, {"project": default_project(organization=rival).public_id}):
        response = client.get("/usage", params)
        page = response.content.decode()
        assert response.status_code == 200
        assert "$1.00" in page and "7.00" not in page and "theirs" not in page
        export = client.get("/usage/export.csv", params)
        rows = list(csv.DictReader(io.StringIO(b"".join(export.streaming_content).decode())))  # type: ignore[attr-defined]
        assert [row["cost_usd"] for row in rows] == ["1.000000"]


def test_the_export_lists_the_days_of_the_range_as_the_page_sums_them(
    alice: User, acme: Organization, keys: list[ApiKey]
) -> None:
    yesterday = _today() - timedelta(days=1)
    events = [_event(n, acme, keys[n % 2], yesterday if n % 3 else _today(), cost=1_000 * n) for n in range(1, 31)]
    usage_events_write(events)
    start = (yesterday.date()).isoformat()
    response = _client(alice).get("/usage/export.csv", {"start": start, "end": _today().date().isoformat()})
    assert response["Content-Disposition"].startswith('attachment; filename="keyway-usage-')
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))  # type: ignore[attr-defined]
    assert sum(int(row["requests"]) for row in rows) == 30
    assert sum(float(row["cost_usd"]) for row in rows) == pytest.approx(sum(e.cost_micros for e in events) / 1e6)
    assert {row["api_key"] for row in rows} == {k.public_id for k in keys}


def test_names_that_look_like_formulas_are_not_run_by_a_spreadsheet(alice: User, acme: Organization) -> None:
    key = apikey_create(organization=acme, name="=HYPERLINK(\"x\")", actor_label="test")[0]
    usage_events_write([_event(1, acme, key, _today())])
    response = _client(alice).get("/usage/export.csv")
    body = b"".join(response.streaming_content).decode()  # type: ignore[attr-defined]
    assert "'=HYPERLINK" in body


@pytest.mark.parametrize(
    "params",
    [
        {"start": "not-a-date"},
        {"start": "2025-03-10", "end": "2025-03-01"},
        {"start": "2020-01-01", "end": "2025-01-01"},
        {"start": "1900-01-01", "end": "1900-01-02"},
        {"end": "99999-01-01"},
        {"breakdown": "password"},
        {"model": "x" * 5000},
        {"api_key": "sk-kw-" + "k" * 300},
        {"start": "2025-02-30"},
    ],
)
def test_hostile_filters_show_an_error_and_this_month_never_a_500(
    alice: User, acme: Organization, params: dict[str, str]
) -> None:
    client = _client(alice)
    response = client.get("/usage", params)
    assert response.status_code == 200
    assert "message-error" in response.content.decode()
    assert client.get("/usage/export.csv", params).status_code == 200


def test_a_nul_in_a_filter_is_refused_before_the_page(alice: User, acme: Organization) -> None:
    assert _client(alice).get("/usage", {"api_key": "sk-kw-\x00"}).status_code == 400


def test_signed_out_visitors_are_sent_to_sign_in(acme: Organization) -> None:
    for path in ("/usage", "/usage/export.csv"):
        response = Client().get(path)
        assert response.status_code == 302 and "/accounts/login/" in response["Location"]
