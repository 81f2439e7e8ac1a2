"""The billing page, monthly statements (page and PDF) and the spend-alert settings, through Django's test client:
every role reads, owners and admins change alerts, the numbers are the ledgers', tenants never see each other."""

from __future__ import annotations

import io
import re
import sys
import time
from datetime import UTC, date, datetime

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone
from pypdf import PdfReader

from billing.alerts import month_start
from billing.models import BillingAccount, CreditEntry, Plan, SpendAlertSettings, UsageEvent
from billing.money import usd_display
from billing.selectors import monthly_statement
from billing.services import SettledUsage, billing_plan_set, credit_add, usage_events_write
from platform_site.models import AuditLog, Organization, Project, Role
from platform_site.selectors import default_project
from platform_site.services import membership_set, organization_create
from tests.dashboard.test_pages import _client, _user

pytestmark = pytest.mark.django_db

MARCH = date(2025, 3, 1)




def _usd(micros: int) -> str:
    return f"-${usd_display(-micros)}" if micros < 0 else f"${usd_display(micros)}"


_calls = iter(range(1, 10**9))


def _usage(org: Organization, when: datetime, cost: int, *, model: str = "gpt-small", project: Project | None = None,
           prompt: int = 1200, completion: int = 340) -> SettledUsage:
    call = f"call_{next(_calls)}"
    return SettledUsage(
        call_id=call, request_id=call, session_id="", organization_id=org.pk, api_key_id=None,
        endpoint=UsageEvent.Endpoint.CHAT, model=model, deployment_id=None, provider="fake", prompt_tokens=prompt,
        cached_tokens=200, completion_tokens=completion, cost_micros=cost, status=UsageEvent.Status.OK,
        usage_source=UsageEvent.UsageSource.REPORTED, latency_ms=90, ttft_ms=None, created_at=when.timestamp(),
        project_id=project.pk if project is not None else None,
    )


def _credit(org: Organization, amount: int, reason: str, when: datetime | None = None,
            kind: str = CreditEntry.Kind.TOPUP) -> CreditEntry:
    entry = credit_add(organization=org, amount_micros=amount, reason=reason, kind=kind, actor_label="staff")
    if when is not None:
        CreditEntry.objects.filter(pk=entry.pk).update(created_at=when)
        entry.refresh_from_db()
    return entry


def _pdf_text(content: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(content)).pages)


@pytest.fixture
def alice() -> User:
    return _user("alice@example.com")


@pytest.fixture
def acme(alice: User) -> Organization:
    return organization_create(name="Acme", owner=alice)


@pytest.fixture
def prepaid(acme: Organization) -> Plan:
    plan = Plan.objects.create(name="prepaid-standard", billing_mode=Plan.Mode.PREPAID)
    billing_plan_set(organization=acme, plan=plan, actor_label="staff")
    return plan


def _member(org: Organization, role: str) -> Client:
    user = _user(f"{role}-{org.slug}@example.com")
    membership_set(organization=org, user=user, role=role)
    return _client(user)


@pytest.mark.parametrize("role", [Role.OWNER, Role.ADMIN, Role.MEMBER, Role.READER])
def test_every_role_reads_the_billing_page_and_only_owners_and_admins_get_the_alert_form(
    acme: Organization, role: str
) -> None:
    response = _member(acme, role).get("/billing")
    page = response.content.decode()
    assert response.status_code == 200
    assert "<h1>Billing</h1>" in page and "Monthly caps" in page and "Spend alerts" in page
    manages = role in (Role.OWNER, Role.ADMIN)
    assert ('name="thresholds"' in page) is manages
    assert ("Owners and admins change spend alerts." in page) is not manages


def test_a_new_prepaid_organization_is_told_to_ask_its_operator_for_credit(
    alice: User, acme: Organization, prepaid: Plan
) -> None:
    page = _client(alice).get("/billing").content.decode()
    assert "No prepaid credit yet." in page and "ask them for a top-up" in page
    assert "<code>insufficient_quota</code>" in page
    assert "No credit yet. Your Keyway operator adds it" in page
    assert "No statements yet." in page and "No spend alerts." in page
    assert "Plan <strong>prepaid-standard</strong>" in page and "<dt>Balance</dt><dd>$0.00</dd>" in page


def test_a_new_postpaid_organization_without_a_plan_sees_month_to_date_spend_and_who_sets_its_terms(
    alice: User, acme: Organization
) -> None:
    page = _client(alice).get("/billing").content.decode()
    assert "No plan" in page and "billed postpaid at list prices" in page
    assert "Spent in " in page and "<dt>Balance</dt>" not in page and "No prepaid credit" not in page
    assert "No credit entries. A postpaid organization needs none" in page
    # The organization has no cap, its default project neither: both listed, neither with a meter.
    assert page.count("· no cap") == 2 and "<meter" not in page


def test_balance_caps_and_credit_ledger_show_the_ledgers_numbers(
    alice: User, acme: Organization, prepaid: Plan
) -> None:
    project = default_project(organization=acme)
    Project.objects.filter(pk=project.pk).update(monthly_budget_micros=4_000_000)
    rocket = Project.objects.create(organization=acme, name="Rocket")
    BillingAccount.objects.filter(pk=acme.pk).update(monthly_budget_micros=10_000_000)
    _credit(acme, 25_000_000, "wire transfer INV-7")
    now = timezone.now()
    usage_events_write([_usage(acme, now, 3_000_000, project=project), _usage(acme, now, 1_234_567, project=rocket)])

    page = _client(alice).get("/billing").content.decode()
    assert "<dt>Balance</dt><dd>$20.765433</dd>" in page
    assert "<dd>$4.234567</dd>" in page  # spent this month
    assert "<dt>Credit added, all time</dt><dd>$25.00</dd>" in page
    # The organization's cap ($10) at 42 %, the default project's ($4) at 75 %, Rocket without a cap.
    assert re.search(r'value="42"[^>]*>42%</meter>', page) and re.search(r'value="75"[^>]*>75%</meter>', page)
    assert "$3.00 <span class=\"muted\">of $4.00</span>" in page and "of $10.00" in page and page.count("· no cap") == 1
    assert "wire transfer INV-7" in page and "Top-up" in page and "$25.00" in page
    assert "No prepaid credit" not in page and "credit is used up" not in page


def test_a_prepaid_organization_whose_credit_ran_out_is_told_so(alice: User, acme: Organization, prepaid: Plan) -> None:
    _credit(acme, 1_000_000, "trial")
    usage_events_write([_usage(acme, timezone.now(), 1_000_000)])
    page = _client(alice).get("/billing").content.decode()
    assert "Your credit is used up." in page and "<dt>Balance</dt><dd>$0.00</dd>" in page


def _march_ledgers(org: Organization) -> None:
    _credit(org, 2_000_000, "february top-up", datetime(2025, 2, 10, tzinfo=UTC))
    _credit(org, 3_000_000, "march top-up", datetime(2025, 3, 10, tzinfo=UTC))
    _credit(org, -100_000, "march correction", datetime(2025, 3, 31, 23, 59, 59, tzinfo=UTC),
            CreditEntry.Kind.ADJUSTMENT)
    usage_events_write([
        _usage(org, datetime(2025, 2, 20, tzinfo=UTC), 7),
        _usage(org, datetime(2025, 3, 1, tzinfo=UTC), 1_250_000, model="gpt-large", prompt=5000, completion=2500),
        _usage(org, datetime(2025, 3, 15, tzinfo=UTC), 333_333),
        _usage(org, datetime(2025, 3, 31, 23, 59, 59, tzinfo=UTC), 1),
        _usage(org, datetime(2025, 4, 1, tzinfo=UTC), 999_999),
    ])


def test_the_statement_page_and_its_pdf_show_the_numbers_of_monthly_statement(
    alice: User, acme: Organization
) -> None:
    _march_ledgers(acme)
    statement = monthly_statement(organization=acme, year=2025, month=3)
    numbers = [
        _usd(statement.opening_balance_micros), _usd(statement.credits_micros),
        "-" + _usd(statement.usage_totals.cost_micros), _usd(statement.closing_balance_micros),
    ]
    assert numbers == ["$1.999993", "$2.90", "-$1.583334", "$3.316659"]
    client = _client(alice)

    page = client.get("/billing/statements/2025-03").content.decode()
    for text in [*numbers, "march top-up", "march correction", "-$0.10", "gpt-large", "gpt-small",
                 "Statement for March 2025", acme.public_id, "1 March 2025 to 31 March 2025, UTC", "7,400", "5,000"]:
        assert text in page, text
    assert "february top-up" not in page and "In progress" not in page
    assert 'href="/billing/statements/2025-03.pdf"' in page

    started = time.perf_counter()
    response = client.get("/billing/statements/2025-03.pdf")
    elapsed = time.perf_counter() - started
    assert response.status_code == 200 and response["Content-Type"] == "application/pdf"
    assert response["Content-Disposition"] == f'attachment; filename="keyway-statement-{acme.slug}-2025-03.pdf"'
    assert response["Cache-Control"] == "private, no-store"
    text = _pdf_text(response.content)
    for needle in [*numbers, "march top-up", "march correction", "gpt-large", "Statement for March 2025",
                   acme.public_id, "Page 1 of 1"]:
        assert needle in text, needle
    assert "Download PDF" not in text and "february top-up" not in text
    assert elapsed < 5, f"a one-page statement took {elapsed:.2f} s"


def test_this_months_statement_is_marked_in_progress(alice: User, acme: Organization) -> None:
    usage_events_write([_usage(acme, timezone.now(), 500_000)])
    period = f"{timezone.now():%Y-%m}"
    page = _client(alice).get(f"/billing/statements/{period}").content.decode()
    assert "In progress: the month is not over" in page and "$0.50" in page and "Closing balance so far" in page
    assert "Next month" not in page
    assert "In progress" in _pdf_text(_client(alice).get(f"/billing/statements/{period}.pdf").content)


def test_statements_are_listed_for_every_month_from_the_first_usage_or_credit_to_now(
    alice: User, acme: Organization
) -> None:
    now = timezone.now()
    three_back = date(now.year - (now.month <= 3), (now.month - 4) % 12 + 1, 1)
    _credit(acme, 1_000_000, "first", datetime(three_back.year, three_back.month, 15, tzinfo=UTC))
    page = _client(alice).get("/billing").content.decode()
    links = re.findall(r'href="/billing/statements/([0-9]{4}-[0-9]{2})"', page)
    expected = [f"{now:%Y-%m}"]
    month = month_start(now)
    while month > three_back:
        month = date(month.year - (month.month == 1), (month.month - 2) % 12 + 1, 1)
        expected.append(f"{month:%Y-%m}")
    assert links == expected and len(links) == 4
    assert page.count(".pdf\"") == 4 and page.count("In progress") == 1


def _next_month() -> str:
    now = timezone.now()
    return f"{now.year + (now.month == 12)}-{now.month % 12 + 1:02d}"


BAD_MONTHS = ["garbage", "2025-13", "2025-00", "1999-12", "0000-01", "2999-01", "next", "2025-3", "20250-01",
              "٢٠٢٥-٠٣", "2025-03-01", "2025-03.PDF", "2025-03 ", "%20", "9" * 3000, "2025-03%0A", "-2025-03",
              "2025_03"]


@pytest.mark.parametrize("month", BAD_MONTHS)
@pytest.mark.parametrize("suffix", ["", ".pdf"])
def test_bad_statement_months_get_a_404_page_that_says_what_a_month_looks_like(
    alice: User, acme: Organization, month: str, suffix: str
) -> None:
    month = _next_month() if month == "next" else month
    response = _client(alice).get(f"/billing/statements/{month}{suffix}")
    assert response.status_code == 404
    assert "No such statement" in response.content.decode() and "YYYY-MM" in response.content.decode()


@pytest.mark.parametrize("path", ["/billing/statements/", "/billing/statements/2025-03/", "/billing/statements/a/b",
                                  "/billing/statements/..%2F..%2Fadmin", "/billing/statements/.pdf"])
def test_paths_no_statement_route_takes_are_plain_404s(alice: User, acme: Organization, path: str) -> None:
    assert _client(alice).get(path).status_code == 404


def test_a_nul_byte_in_a_statement_url_is_refused_before_any_view(alice: User, acme: Organization) -> None:
    assert _client(alice).get("/billing/statements/2025-03%00").status_code == 400


@pytest.mark.parametrize(("method", "path"), [
    ("put", "/billing"), ("delete", "/billing"), ("patch", "/billing"),
    ("post", "/billing/statements/2025-03"), ("post", "/billing/statements/2025-03.pdf"),
    ("delete", "/billing/statements/2025-03"),
])
def test_methods_the_billing_pages_do_not_take_get_405(alice: User, acme: Organization, method: str, path: str) -> None:
    assert getattr(_client(alice), method)(path).status_code == 405


@pytest.mark.parametrize("path", ["/billing", "/billing/statements/2025-03", "/billing/statements/2025-03.pdf"])
def test_signed_out_visitors_are_sent_to_sign_in(path: str) -> None:
    response = Client().get(path)
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_a_signed_in_user_without_an_organization_is_sent_to_make_one() -> None:
    response = _client(_user("nobody@example.com")).get("/billing")
    assert response.status_code == 302 and response["Location"] == "/organizations/new"


def test_a_member_of_another_organization_never_sees_this_ones_numbers_statements_or_alerts(
    alice: User, acme: Organization
) -> None:
    _march_ledgers(acme)
    _credit(acme, 123_456_789, "acme-secret-reason")
    BillingAccount.objects.filter(pk=acme.pk).update(monthly_budget_micros=987_000_000)
    _client(alice).post("/billing", {"thresholds": "37, 73", "notify_owners": "on"})
    assert SpendAlertSettings.objects.get(pk=acme.pk).thresholds == [37, 73]
    # Eve belongs to another organization: her only job is to prove the walls hold.
    eve = _user("eve@example.com")
    eve_corp = organization_create(name="Eve Corp", owner=eve)
    client = _client(eve)
    secrets = ["acme-secret-reason", "march top-up", "$123.456789", "$987.00", "37%", "37, 73", "gpt-large",
               acme.public_id, "Acme", "$3.316659"]
    # The organization a page shows is the signed-in member's own: switching to one she is not in does nothing.
    client.post("/organizations/switch", {"organization": acme.public_id})
    for path in ("/billing", "/billing/statements/2025-03", f"/billing/statements/{timezone.now():%Y-%m}"):
        response = client.get(path)
        page = response.content.decode()
        assert response.status_code == 200 and "Eve Corp" in page, path
        for secret in secrets:
            assert secret not in page, (path, secret)
    pdf = client.get("/billing/statements/2025-03.pdf")
    assert pdf.status_code == 200 and eve_corp.slug in pdf["Content-Disposition"]
    text = _pdf_text(pdf.content)
    assert "Eve Corp" in text and all(secret not in text for secret in secrets)
    # Her alert settings are her organization's; Acme's stay as they were.
    client.post("/billing", {"thresholds": "99", "notify_admins": "on"})
    assert SpendAlertSettings.objects.get(pk=eve_corp.pk).thresholds == [99]
    assert SpendAlertSettings.objects.get(pk=acme.pk).thresholds == [37, 73]
    assert not AuditLog.objects.filter(organization=acme, action="billing.spend_alerts_set", actor=eve).exists()


@pytest.mark.parametrize("role", [Role.OWNER, Role.ADMIN])
def test_owners_and_admins_save_spend_alerts_with_an_audit_row(acme: Organization, role: str) -> None:
    client = _member(acme, role)
    response = client.post("/billing", {"thresholds": "100, 50 80%,50", "notify_owners": "on"})
    assert response.status_code == 302 and response["Location"] == "/billing#alerts"
    saved = SpendAlertSettings.objects.get(pk=acme.pk)
    assert saved.thresholds == [50, 80, 100] and saved.notify_owners and not saved.notify_admins
    page = client.get("/billing").content.decode()
    assert "Spend alerts saved." in page and "50%, 80% and 100%" in page and 'value="50, 80, 100"' in page
    row = AuditLog.objects.get(organization=acme, action="billing.spend_alerts_set")
    assert row.actor is not None and row.actor.email == f"{role}-{acme.slug}@example.com"
    assert row.details["after"] == {"thresholds": [50, 80, 100], "notify_owners": True, "notify_admins": False}
    assert row.details["before"]["thresholds"] == []
    # Emptying the percentages turns alerts off, and is audited too.
    client.post("/billing", {"thresholds": "", "notify_owners": "on", "notify_admins": "on"})
    assert SpendAlertSettings.objects.get(pk=acme.pk).thresholds == []
    assert AuditLog.objects.filter(organization=acme, action="billing.spend_alerts_set").count() == 2


@pytest.mark.parametrize("role", [Role.MEMBER, Role.READER])
def test_members_and_readers_cannot_change_spend_alerts(acme: Organization, role: str) -> None:
    response = _member(acme, role).post("/billing", {"thresholds": "50", "notify_owners": "on"})
    assert response.status_code == 403
    assert "Only owners and admins can change spend alerts" in response.content.decode()
    assert not SpendAlertSettings.objects.filter(pk=acme.pk).exists()
    assert not AuditLog.objects.filter(organization=acme, action="billing.spend_alerts_set").exists()


@pytest.mark.parametrize(("thresholds", "message"), [
    ("abc", "&#x27;abc&#x27; is not a percentage"),
    ("50.5", "&#x27;50.5&#x27; is not a percentage"),
    ("-5", "&#x27;-5&#x27; is not a percentage"),
    ("1e3", "&#x27;1e3&#x27; is not a percentage"),
    ("٥٠", "is not a percentage"),
    ("0", "from 1 to 1000; &#x27;0&#x27; is not"),
    ("1001", "from 1 to 1000; &#x27;1001&#x27; is not"),
    ("9" * 150, "from 1 to 1000"),
    (",".join(str(n) for n in range(1, 12)), "Choose at most 10 percentages, not 11."),
    ("5" * 201, "Ensure this value has at most 200 characters"),
    ("<script>alert(1)</script>", "&lt;script&gt;"),
])
def test_hostile_alert_settings_get_400_with_a_message_and_change_nothing(
    alice: User, acme: Organization, thresholds: str, message: str
) -> None:
    response = _client(alice).post("/billing", {"thresholds": thresholds, "notify_owners": "on"})
    page = response.content.decode()
    assert response.status_code == 400 and message in page, page[page.find("errorlist") - 200:][:600]
    assert "<script>alert" not in page
    assert not SpendAlertSettings.objects.filter(pk=acme.pk).exists()


def test_alerts_with_nobody_to_tell_get_400(alice: User, acme: Organization) -> None:
    response = _client(alice).post("/billing", {"thresholds": "80"})
    assert response.status_code == 400 and "Choose who gets the alerts" in response.content.decode()
    assert not SpendAlertSettings.objects.filter(pk=acme.pk).exists()


def test_a_post_with_unknown_or_missing_fields_changes_only_what_the_form_knows(
    alice: User, acme: Organization
) -> None:
    extra = {"notify_owners": "on", "organization": "org-other", "thresholds[]": "1"}
    response = _client(alice).post("/billing", extra)
    assert response.status_code == 302
    assert SpendAlertSettings.objects.get(pk=acme.pk).thresholds == []


def test_the_credit_ledger_is_paged_newest_first_and_bad_page_numbers_fall_back(
    alice: User, acme: Organization
) -> None:
    for number in range(1, 26):
        _credit(acme, number * 1_000_000, f"top-up number {number:02d}")
    client = _client(alice)

    def reasons(query: str) -> list[str]:
        return re.findall(r"top-up number ([0-9]{2})", client.get(f"/billing{query}").content.decode())

    assert reasons("") == [f"{n:02d}" for n in range(25, 5, -1)]
    assert reasons("?page=2") == ["05", "04", "03", "02", "01"]
    assert reasons("?page=abc") == reasons("") and reasons("?page=-1") == reasons("?page=2")
    assert reasons("?page=99999999999999999999999") == reasons("?page=2")
    assert "Page 1 of 2" in client.get("/billing").content.decode()


def test_a_server_that_cannot_make_pdfs_says_so_and_links_the_page(
    alice: User, acme: Organization, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a machine without Pango (or without WeasyPrint): importing it fails.
    monkeypatch.setitem(sys.modules, "weasyprint", None)
    response = _client(alice).get("/billing/statements/2025-03.pdf")
    page = response.content.decode()
    assert response.status_code == 503 and "libpango-1.0-0" in page
    assert 'href="/billing/statements/2025-03"' in page


def test_a_project_cap_links_to_its_project_and_an_archived_project_is_left_out(
    alice: User, acme: Organization
) -> None:
    active = Project.objects.create(organization=acme, name="Active one", monthly_budget_micros=1_000_000)
    Project.objects.create(organization=acme, name="Old one", monthly_budget_micros=1_000_000,
                           archived_at=timezone.now())
    page = _client(alice).get("/billing").content.decode()
    assert f'href="/settings/projects/{active.public_id}"' in page and "Old one" not in page
