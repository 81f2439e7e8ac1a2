"""Spend alerts: e-mailed to owners and admins once per cap, percentage and month, after the ledger batch that
crossed it commits; whatever the number of deciders, journal replays or months a batch straddles."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core import mail
from django.core.mail.backends.base import BaseEmailBackend
from django.db import connections

from billing import alerts
from billing.alerts import spend_alert_settings_set, spend_alerts_after_usage, spend_alerts_check
from billing.exceptions import BillingError
from billing.ledger import ledger, recover_orphans
from billing.models import BillingAccount, SpendAlert, SpendAlertSettings, UsageEvent
from billing.services import SettledUsage, usage_events_write
from platform_site.access import Actor, system_actor
from platform_site.exceptions import NotPermitted
from platform_site.models import AuditLog, Organization, Project, Role
from platform_site.selectors import default_project
from platform_site.services import membership_set, organization_create
from tests.conftest import USES_POSTGRES

CAP = 10_000_000  # $10
_calls = iter(range(1, 10**9))


def _user(email: str, *, active: bool = True) -> User:
    return get_user_model().objects.create_user(username=email, email=email, is_active=active)


def _spend(org: Organization, cost: int, when: datetime | None = None, project: Project | None = None) -> SettledUsage:
    call = f"alert_call_{next(_calls)}"
    return SettledUsage(
        call_id=call, request_id=call, session_id="", organization_id=org.pk, api_key_id=None,
        endpoint=UsageEvent.Endpoint.CHAT, model="gpt-small", deployment_id=None, provider="fake", prompt_tokens=10,
        cached_tokens=0, completion_tokens=5, cost_micros=cost, status=UsageEvent.Status.OK,
        usage_source=UsageEvent.UsageSource.REPORTED, latency_ms=50, ttft_ms=None,
        created_at=(when or datetime.now(UTC)).timestamp(), project_id=project.pk if project is not None else None,
    )


@pytest.fixture
def acme(db: None) -> Organization:
    """Acme with a $10 cap, alerts at 50, 80 and 100 %, and a member of every role (one owner inactive)."""
    owner = _user("owner@acme.example")
    org = organization_create(name="Acme & Sons", owner=owner)
    for email, role in [("admin@acme.example", Role.ADMIN), ("member@acme.example", Role.MEMBER),
                        ("reader@acme.example", Role.READER)]:
        membership_set(organization=org, user=_user(email), role=role)
    membership_set(organization=org, user=_user("gone@acme.example", active=False), role=Role.OWNER)
    BillingAccount.objects.create(organization=org, monthly_budget_micros=CAP)
    spend_alert_settings_set(by=system_actor(org), thresholds=[50, 80, 100], notify_owners=True, notify_admins=True)
    return org


@pytest.fixture
def write(transactional_db: None) -> Callable[..., None]:
    """Write events the way a worker does: journaled, then flushed by the ledger writer, whose hook decides on
    alerts after its commit. Tests that use it commit for real (the writer hands its connection back after each
    batch, which it could not do inside a test's transaction on PostgreSQL)."""

    def write_events(*events: SettledUsage) -> None:
        for event in events:
            ledger.record(event)
        ledger.flush_sync()

    return write_events


def _sent() -> list[tuple[str, str]]:
    return sorted((message.to[0], message.subject) for message in mail.outbox)


@pytest.mark.django_db(transaction=True)
def test_crossing_a_percentage_of_the_organization_cap_emails_its_owners_and_admins_once(
    acme: Organization, write: Callable[..., None]
) -> None:
    write(_spend(acme, 4_000_000))
    assert mail.outbox == []
    write(_spend(acme, 2_000_000))
    assert _sent() == [
        ("admin@acme.example", "[Keyway] Acme & Sons has spent 50% of its monthly cap"),
        ("owner@acme.example", "[Keyway] Acme & Sons has spent 50% of its monthly cap"),
    ]
    body = mail.outbox[0].body
    assert "Acme & Sons has spent $6.00 in" in body and "60% of its monthly cap of $10.00" in body
    assert "past the 50% you asked to be told about" in body and "http://127.0.0.1:8000/billing" in body
    assert "The cap is reached" not in body
    write(_spend(acme, 1_000_000))  # 70 %: nothing new
    assert len(mail.outbox) == 2
    write(_spend(acme, 3_000_000))  # 100 %: the 80 and the 100, in one e-mail each
    assert [m.subject for m in mail.outbox[2:]] == ["[Keyway] Acme & Sons has spent 100% of its monthly cap"] * 2
    assert "The cap is reached" in mail.outbox[2].body
    rows = SpendAlert.objects.filter(organization=acme).values_list("percent", "spend_micros", "recipients")
    assert sorted(rows) == [(50, 6_000_000, 2), (80, 10_000_000, 2), (100, 10_000_000, 2)]
    write(_spend(acme, 5_000_000))  # past every percentage: nothing more this month
    assert len(mail.outbox) == 4


@pytest.mark.django_db(transaction=True)
def test_a_project_cap_is_alerted_apart_from_the_organizations(acme: Organization, write: Callable[..., None]) -> None:
    project = default_project(organization=acme)
    Project.objects.filter(pk=project.pk).update(monthly_budget_micros=2_000_000)
    other = Project.objects.create(organization=acme, name="Uncapped")
    write(_spend(acme, 1_600_000, project=project), _spend(acme, 1_000_000, project=other))
    subject = "[Keyway] Default project (Acme & Sons) has spent 80% of its monthly cap"
    assert {m.subject for m in mail.outbox} == {subject}
    assert "The project Default project of Acme & Sons has spent $1.60" in mail.outbox[0].body
    assert "80% of its monthly cap of $2.00" in mail.outbox[0].body
    rows = set(SpendAlert.objects.values_list("project_id", "percent"))
    assert rows == {(project.pk, 50), (project.pk, 80)}
    # An archived project's cap no longer counts: its keys are refused anyway.
    Project.objects.filter(pk=project.pk).update(archived_at=datetime.now(UTC))
    write(_spend(acme, 1_000_000, project=project))
    assert SpendAlert.objects.filter(percent=100).count() == 0 and len(mail.outbox) == 2


@pytest.mark.django_db(transaction=True)
def test_a_replayed_journal_charges_and_alerts_nothing_twice(
    acme: Organization, write: Callable[..., None], tmp_path: Path
) -> None:
    events = [_spend(acme, 3_000_000), _spend(acme, 3_000_000)]
    write(*events)
    assert len(mail.outbox) == 2
    # A worker that died after the commit, before deleting its journal: the journal is replayed.
    (tmp_path / "dead-host-1-1-1.usage").write_bytes(b"".join(orjson.dumps(e.as_row()) + b"\n" for e in events))
    assert recover_orphans(tmp_path) == 2
    assert len(mail.outbox) == 2 and SpendAlert.objects.count() == 1
    assert BillingAccount.objects.get(pk=acme.pk).usage_total_micros == 6_000_000


@pytest.mark.django_db
def test_alerts_decided_in_a_transaction_that_rolls_back_send_nothing(acme: Organization) -> None:
    usage_events_write([_spend(acme, 9_000_000)])
    with pytest.raises(RuntimeError):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(alerts, "_messages", _raise_after_recording)
            spend_alerts_check(organization_id=acme.pk, month=alerts.month_start(datetime.now(UTC)),
                               thresholds=[50, 80, 100])
    assert mail.outbox == [] and SpendAlert.objects.count() == 0


def _raise_after_recording(*args: Any) -> list[Any]:
    assert SpendAlert.objects.count() == 2  # the 50 and the 80 of a 90 % spend
    raise RuntimeError("the decision fails after recording")


@pytest.mark.django_db
def test_organizations_without_alerts_cost_one_query_per_batch_and_without_a_cap_a_few(
    acme: Organization, django_assert_num_queries: Any
) -> None:
    quiet = organization_create(name="Quiet", slug="quiet")
    events = [_spend(quiet, 5_000_000) for _ in range(50)]
    with django_assert_num_queries(1):
        spend_alerts_after_usage(events=events)
    # Alerts on, no cap anywhere: the organization, its account and its projects are read, nothing more.
    spend_alert_settings_set(by=system_actor(quiet), thresholds=[50], notify_owners=True, notify_admins=True)
    with django_assert_num_queries(4):
        spend_alerts_after_usage(events=events)
    # Free calls charge nothing, so they are not looked at at all.
    with django_assert_num_queries(0):
        spend_alerts_after_usage(events=[_spend(acme, 0)])


@pytest.mark.django_db
def test_a_batch_across_midnight_at_a_months_end_alerts_each_month_on_its_own_spend(
    acme: Organization, django_capture_on_commit_callbacks: Any
) -> None:
    october = [_spend(acme, 9_000_000, datetime(2025, 10, 31, 23, 59, 58, tzinfo=UTC))]
    november = [_spend(acme, 5_500_000, datetime(2025, 11, 1, 0, 0, 1, tzinfo=UTC))]
    ancient = [_spend(acme, 20_000_000, datetime(2025, 8, 15, tzinfo=UTC))]
    usage_events_write(october + november + ancient)
    with django_capture_on_commit_callbacks(execute=True):
        spend_alerts_after_usage(events=october + november + ancient, now=datetime(2025, 11, 1, 0, 0, 5, tzinfo=UTC))
    months = sorted(SpendAlert.objects.values_list("month", "percent"))
    # October's 90 % (its own $9), November's 55 % (not October's and November's $14.50 together); August's $20
    # is a journal replayed months late, and an alert about it would only be noise.
    assert months == [(date(2025, 10, 1), 50), (date(2025, 10, 1), 80), (date(2025, 11, 1), 50)]
    subjects = sorted(m.subject for m in mail.outbox)
    assert subjects == ["[Keyway] Acme & Sons has spent 50% of its monthly cap"] * 2 + [
        "[Keyway] Acme & Sons has spent 80% of its monthly cap"] * 2
    assert any("in November 2025 (UTC): 55%" in m.body for m in mail.outbox)
    assert any("in October 2025 (UTC): 90%" in m.body for m in mail.outbox)


@pytest.mark.django_db(transaction=True)
def test_a_changed_cap_is_a_new_cap(acme: Organization, write: Callable[..., None]) -> None:
    write(_spend(acme, 10_000_000))
    assert len(mail.outbox) == 2 and all(m.subject.endswith("has spent 100% of its monthly cap") for m in mail.outbox)
    BillingAccount.objects.filter(pk=acme.pk).update(monthly_budget_micros=2 * CAP)
    write(_spend(acme, 1))
    assert [m.subject for m in mail.outbox[2:]] == ["[Keyway] Acme & Sons has spent 50% of its monthly cap"] * 2
    assert "of its monthly cap of $20.00" in mail.outbox[2].body


@pytest.mark.django_db(transaction=True)
def test_only_active_members_with_the_chosen_roles_are_emailed(acme: Organization, write: Callable[..., None]) -> None:
    spend_alert_settings_set(by=system_actor(acme), thresholds=[50], notify_owners=False, notify_admins=True)
    outsider = organization_create(name="Globex", owner=_user("owner@globex.example"))
    membership_set(organization=outsider, user=_user("admin@globex.example"), role=Role.ADMIN)
    write(_spend(acme, 5_000_000))
    assert [m.to for m in mail.outbox] == [["admin@acme.example"]]
    assert "You get this e-mail as an admin of Acme & Sons." in mail.outbox[0].body


@pytest.mark.django_db
def test_settings_are_validated_by_the_service_and_every_change_is_audited(acme: Organization) -> None:
    by = system_actor(acme)
    for bad in ([0], [1001], [True], [50.0], ["50"], list(range(1, 12))):
        with pytest.raises(BillingError) as caught:
            spend_alert_settings_set(by=by, thresholds=bad, notify_owners=True, notify_admins=True)  # type: ignore[arg-type]
        assert caught.value.param == "thresholds"
    with pytest.raises(BillingError, match="Choose who gets the alerts"):
        spend_alert_settings_set(by=by, thresholds=[5], notify_owners=False, notify_admins=False)
    for role in (Role.MEMBER, Role.READER):
        with pytest.raises(NotPermitted):
            spend_alert_settings_set(by=Actor(organization=acme, role=role), thresholds=[5], notify_owners=True,
                                     notify_admins=True)
    saved = spend_alert_settings_set(by=by, thresholds=[100, 1, 1000, 1], notify_owners=True, notify_admins=False)
    assert saved.thresholds == [1, 100, 1000]
    assert SpendAlertSettings.objects.get(pk=acme.pk).thresholds == [1, 100, 1000]
    rows = AuditLog.objects.filter(organization=acme, action="billing.spend_alerts_set").order_by("id")
    assert [row.details["after"]["thresholds"] for row in rows] == [[50, 80, 100], [1, 100, 1000]]


@pytest.mark.django_db(transaction=True)
def test_alert_emails_reach_the_file_backend(acme: Organization, write: Callable[..., None], settings: Any,
                                             tmp_path: Path) -> None:
    settings.EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
    settings.EMAIL_FILE_PATH = str(tmp_path)
    settings.KEYWAY_DASHBOARD_URL = ""
    write(_spend(acme, 8_500_000))
    text = "".join(path.read_text() for path in tmp_path.glob("*.log"))
    assert text.count("Subject: [Keyway] Acme & Sons has spent 80% of its monthly cap") == 2
    assert "To: owner@acme.example" in text and "To: admin@acme.example" in text
    assert "on the Billing page of the Keyway dashboard" in text and "member@acme.example" not in text


class RefusingBackend(BaseEmailBackend):
    def send_messages(self, email_messages: Any) -> int:
        raise ConnectionRefusedError("the mail server is down")


@pytest.mark.django_db(transaction=True)
def test_a_mail_server_that_refuses_after_the_commit_loses_the_alert_and_says_so(
    acme: Organization, write: Callable[..., None], settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.EMAIL_BACKEND = f"{__name__}.RefusingBackend"
    write(_spend(acme, 5_000_000))
    assert "Sending 2 spend alert e-mails failed; they are not retried" in caplog.text
    assert SpendAlert.objects.filter(percent=50).exists()
    assert UsageEvent.objects.filter(organization=acme).count() == 1 and ledger.pending() == 0


@pytest.mark.django_db(transaction=True)
def test_an_alert_that_cannot_be_decided_never_fails_the_batch(
    acme: Organization, write: Callable[..., None], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(**kwargs: Any) -> None:
        raise RuntimeError("a bug in alerts")

    monkeypatch.setattr(alerts, "spend_alerts_check", broken)
    write(_spend(acme, 5_000_000))
    assert UsageEvent.objects.filter(organization=acme).count() == 1 and ledger.pending() == 0
    assert "Could not check the spend alerts of organization" in caplog.text and mail.outbox == []


@pytest.mark.django_db
def test_a_decider_that_raced_past_the_lock_is_stopped_by_the_unique_constraint(
    acme: Organization, monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> None:
    usage_events_write([_spend(acme, 8_000_000)])
    month = alerts.month_start(datetime.now(UTC))
    with django_capture_on_commit_callbacks(execute=True):
        spend_alerts_check(organization_id=acme.pk, month=month, thresholds=[50, 80, 100])
    assert len(mail.outbox) == 2
    # A decider that read "nothing sent yet" before the first one committed (as if the row lock had not held):
    monkeypatch.setattr(alerts, "_sent", lambda **kwargs: set())
    with django_capture_on_commit_callbacks(execute=True):
        assert spend_alerts_check(organization_id=acme.pk, month=month, thresholds=[50, 80, 100]) == []
    assert len(mail.outbox) == 2 and SpendAlert.objects.count() == 2


@pytest.mark.skipif(
    not USES_POSTGRES,
    reason="SQLite's in-memory test database shares one cache between connections, which fails a second writer at "
    "once ('table is locked') where a database file makes it wait; the row lock is PostgreSQL's",
)
@pytest.mark.django_db(transaction=True)
def test_workers_deciding_at_once_send_each_alert_once(acme: Organization, caplog: pytest.LogCaptureFixture) -> None:
    """Eight deciders, each with its own database connection as a worker process has, check the same crossing at
    the same moment: they queue on the settings row's lock, and the first one's alert is the only one."""
    events = [_spend(acme, 8_500_000)]
    usage_events_write(events)
    start = threading.Barrier(8)

    def worker() -> None:
        try:
            start.wait()
            spend_alerts_after_usage(events=events)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # None of them failed (the hook logs what it cannot decide rather than raise).
    assert "Could not" not in caplog.text
    assert sorted(SpendAlert.objects.values_list("percent", flat=True)) == [50, 80]
    assert _sent() == [
        ("admin@acme.example", "[Keyway] Acme & Sons has spent 80% of its monthly cap"),
        ("owner@acme.example", "[Keyway] Acme & Sons has spent 80% of its monthly cap"),
    ]
    # And once more from a worker that replays the batch later: nothing.
    spend_alerts_after_usage(events=events)
    assert len(mail.outbox) == 2


def test_alert_mail_over_smtp_leaves_the_ledger_writer_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mail server that hangs holds its own thread, not the ledger writer's (on SQLite, every ORM call's)."""
    import threading
    import time

    from billing import alerts

    release, sent = threading.Event(), threading.Event()

    class HangingConnection:
        def send_messages(self, messages: list[Any]) -> int:
            release.wait(10)
            sent.set()
            return len(messages)

    monkeypatch.setattr(alerts.settings, "EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend")
    monkeypatch.setattr(alerts, "get_connection", lambda: HangingConnection())
    began = time.monotonic()
    alerts._deliver([])
    assert time.monotonic() - began < 1 and not sent.is_set()
    release.set()
    assert sent.wait(5)
