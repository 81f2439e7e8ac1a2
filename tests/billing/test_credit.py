"""Credit changes by staff (`manage.py credit` and the admin's add form) and the read-only admin ledgers."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client

from billing.models import BillingAccount, CreditEntry, Plan, Price, UsageEvent
from billing.money import micros_to_usd, usd_display, usd_to_micros
from billing.services import SettledUsage, credit_add, usage_events_write
from platform_site.models import AuditLog, Organization

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff() -> User:
    return get_user_model().objects.create_superuser("root", "root@example.com", "x" * 16)


@pytest.fixture
def admin_client(staff: User) -> Client:
    client = Client()
    client.force_login(staff)
    return client


def _spend(organization: Organization, cost_micros: int, request_id: str = "req_1") -> None:
    usage_events_write([
        SettledUsage(
            call_id=request_id, request_id=request_id, session_id="",
            organization_id=organization.pk, api_key_id=None, endpoint=UsageEvent.Endpoint.CHAT,
            model="m", deployment_id=None, provider="fake", prompt_tokens=10, cached_tokens=0, completion_tokens=5,
            cost_micros=cost_micros, status=UsageEvent.Status.OK, usage_source=UsageEvent.UsageSource.REPORTED,
            latency_ms=1, ttft_ms=None, created_at=datetime(2025, 3, 1, tzinfo=UTC).timestamp(),
        )
    ])


def _account(organization: Organization) -> BillingAccount:
    return BillingAccount.objects.get(pk=organization.pk)


@pytest.mark.parametrize(
    ("usd", "micros"),
    [("25", 25_000_000), ("0.000001", 1), ("-1.5", -1_500_000), ("1e2", 100_000_000), (Decimal("3.10"), 3_100_000)],
)
def test_usd_converts_to_micro_usd_exactly(usd: str | Decimal, micros: int) -> None:
    assert usd_to_micros(usd) == micros
    assert usd_to_micros(micros_to_usd(micros)) == micros


@pytest.mark.parametrize(
    ("micros", "shown"),
    [(0, "0.00"), (12_500_000, "12.50"), (1234, "0.001234"), (-5_000_000, "-5.00"), (10, "0.00001")],
)
def test_amounts_for_people_show_cents_and_never_hide_a_tiny_spend(micros: int, shown: str) -> None:
    assert usd_display(micros) == shown


@pytest.mark.parametrize("usd", ["0.0000001", "abc", "NaN", "Infinity", ""])
def test_usd_finer_than_a_micro_or_not_a_number_is_refused(usd: str) -> None:
    with pytest.raises(ValueError):
        usd_to_micros(usd)


def test_credit_command_tops_up_with_reason_and_actor(org: Organization, staff: User) -> None:
    _spend(org, 1_250_000)
    out = StringIO()
    call_command("credit", "acme", "25.50", "--reason", "Invoice 2025-031 paid", "--user", "root", stdout=out)
    entry = CreditEntry.objects.get(organization=org)
    assert entry.kind == CreditEntry.Kind.TOPUP and entry.amount_micros == 25_500_000
    assert entry.reason == "Invoice 2025-031 paid" and entry.actor == staff and entry.actor_label == "root"
    assert entry.credit_total_after_micros == 25_500_000
    assert _account(org).credit_total_micros == 25_500_000 and _account(org).balance_micros == 24_250_000
    assert "Credit total: 25.500000 USD" in out.getvalue() and "balance: 24.250000 USD" in out.getvalue()
    audit = AuditLog.objects.get(organization=org, action="credit.topup")
    assert audit.actor == staff and audit.details == {"amount_micros": 25_500_000, "reason": "Invoice 2025-031 paid"}


def test_credit_command_adjustment_may_take_credit_away(org: Organization) -> None:
    credit_add(organization=org, amount_micros=10_000_000, reason="first", actor_label="test")
    call_command("credit", "acme", "-2.000001", "--reason", "duplicate top-up", "--adjustment", stdout=StringIO())
    entry = CreditEntry.objects.filter(organization=org).first()
    assert entry is not None and entry.kind == CreditEntry.Kind.ADJUSTMENT and entry.amount_micros == -2_000_001
    assert entry.actor is None and entry.actor_label == "cli"
    assert _account(org).credit_total_micros == 7_999_999


@pytest.mark.parametrize(
    "arguments",
    [
        ["nope", "5", "--reason", "x"],  # unknown organization
        ["acme", "five", "--reason", "x"],  # not a number
        ["acme", "0.0000001", "--reason", "x"],  # finer than a micro-USD
        ["acme", "-5", "--reason", "x"],  # a negative top-up
        ["acme", "0", "--reason", "x", "--adjustment"],  # zero
        ["acme", "5", "--reason", "   "],  # no reason
        ["acme", "5"],  # --reason missing
        ["acme", "5", "--reason", "x", "--user", "ghost"],  # unknown user
        ["acme", "5", "--reason", "x", "--user", "customer"],  # not staff
    ],
)
def test_credit_command_refuses_bad_input_and_changes_nothing(org: Organization, arguments: list[str]) -> None:
    get_user_model().objects.create_user("customer", password="x" * 16)
    with pytest.raises(CommandError):
        call_command("credit", *arguments, stdout=StringIO(), stderr=StringIO())
    assert not CreditEntry.objects.exists()
    assert sum(BillingAccount.objects.values_list("credit_total_micros", flat=True)) == 0


def test_admin_add_form_records_actor_and_reason_and_moves_the_balance(
    admin_client: Client, org: Organization, staff: User
) -> None:
    _spend(org, 500_000)
    response = admin_client.post(
        "/admin/billing/creditentry/add/",
        {"organization": org.pk, "kind": "topup", "amount_usd": "10.000001", "reason": "Wire transfer 88"},
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    entry = CreditEntry.objects.get(organization=org)
    assert entry.amount_micros == 10_000_001 and entry.reason == "Wire transfer 88"
    assert entry.actor == staff and entry.actor_label == "root"
    assert _account(org).balance_micros == 10_000_001 - 500_000
    assert AuditLog.objects.filter(organization=org, action="credit.topup", actor=staff).exists()
    listing = admin_client.get("/admin/billing/creditentry/").content.decode()
    assert "Wire transfer 88" in listing and "10.000001 USD" in listing


@pytest.mark.parametrize(
    ("kind", "amount"),
    [("topup", "-3"), ("adjustment", "0"), ("topup", "1.0000001")],
)
def test_admin_add_form_refuses_what_the_ledger_would_refuse(
    admin_client: Client, org: Organization, kind: str, amount: str
) -> None:
    response = admin_client.post(
        "/admin/billing/creditentry/add/",
        {"organization": org.pk, "kind": kind, "amount_usd": amount, "reason": "try"},
    )
    assert response.status_code == 200 and "errorlist" in response.content.decode()
    assert not CreditEntry.objects.exists()


def test_credit_and_usage_ledgers_are_read_only_in_admin(admin_client: Client, org: Organization) -> None:
    entry = credit_add(organization=org, amount_micros=1_000_000, reason="seed", actor_label="test")
    _spend(org, 10)
    event = UsageEvent.objects.get()
    page = admin_client.get(f"/admin/billing/creditentry/{entry.pk}/change/")
    assert page.status_code == 200 and 'name="amount_usd"' not in page.content.decode()
    changed = admin_client.post(f"/admin/billing/creditentry/{entry.pk}/change/",
                                {"organization": org.pk, "kind": "topup", "amount_usd": "999", "reason": "x"})
    assert changed.status_code == 403
    assert admin_client.post(f"/admin/billing/creditentry/{entry.pk}/delete/", {"post": "yes"}).status_code == 403
    assert admin_client.get("/admin/billing/usageevent/add/").status_code == 403
    assert admin_client.post(f"/admin/billing/usageevent/{event.pk}/delete/", {"post": "yes"}).status_code == 403
    assert CreditEntry.objects.get().amount_micros == 1_000_000 and UsageEvent.objects.count() == 1


def test_admin_lists_and_filters_the_usage_ledger(admin_client: Client, org: Organization) -> None:
    _spend(org, 1_234)
    listing = admin_client.get("/admin/billing/usageevent/", {"organization__id__exact": org.pk, "status__exact": 1})
    assert listing.status_code == 200 and "req_1" in listing.content.decode()
    assert "0.001234 USD" in listing.content.decode()
    found = admin_client.get("/admin/billing/usageevent/", {"q": "req_1"}).content.decode()
    assert "req_1" in found
    assert admin_client.get("/admin/billing/usageevent/", {"created_at__year": 2025}).status_code == 200


def test_admin_edits_plan_and_budget_but_never_the_totals(admin_client: Client, org: Organization) -> None:
    credit_add(organization=org, amount_micros=3_000_000, reason="seed", actor_label="test")
    _spend(org, 700)
    plan = Plan.objects.create(name="pro", billing_mode=Plan.Mode.PREPAID)
    response = admin_client.post(
        f"/admin/billing/billingaccount/{org.pk}/change/",
        {"plan": plan.pk, "monthly_budget_micros": 50_000_000, "credit_total_micros": 1, "usage_total_micros": 1},
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    account = _account(org)
    assert account.plan == plan and account.monthly_budget_micros == 50_000_000
    assert account.credit_total_micros == 3_000_000 and account.usage_total_micros == 700
    assert AuditLog.objects.filter(organization=org, action="billing.plan_set").exists()
    assert admin_client.get("/admin/billing/billingaccount/add/").status_code == 403


def test_admin_shows_prices_in_usd_per_million_tokens(admin_client: Client) -> None:
    Price.objects.create(model="gpt-small", input_per_million_micros=2_500_000, output_per_million_micros=10_000_000)
    listing = admin_client.get("/admin/billing/price/").content.decode()
    assert "2.500000 USD" in listing and "10.000000 USD" in listing


def test_saving_an_account_in_admin_keeps_usage_recorded_while_the_page_was_open(
    admin_client: Client, org: Organization, monkeypatch: pytest.MonkeyPatch
) -> None:
    from billing.admin import BillingAccountAdmin

    _spend(org, 100, request_id="req_before")
    load = BillingAccountAdmin.get_object

    def load_then_meter(self: BillingAccountAdmin, *args: object, **kwargs: object) -> BillingAccount | None:
        # Metering charges the account after the admin has read it and before the admin writes it back.
        account = load(self, *args, **kwargs)  # type: ignore[arg-type]
        _spend(org, 5_000, request_id="req_meanwhile")
        return account

    monkeypatch.setattr(BillingAccountAdmin, "get_object", load_then_meter)
    response = admin_client.post(f"/admin/billing/billingaccount/{org.pk}/change/", {"monthly_budget_micros": 9})
    assert response.status_code == 302
    account = _account(org)
    assert account.monthly_budget_micros == 9 and account.usage_total_micros == 5_100


def test_an_organization_with_a_ledger_or_an_audit_trail_cannot_be_deleted(org: Organization) -> None:
    """Ledgers and the audit log are never deleted by a cascade: deleting their organization is refused."""
    from django.db.models import ProtectedError

    _spend(org, 1_000)
    with pytest.raises(ProtectedError):
        org.delete()
    assert UsageEvent.objects.filter(organization=org).count() == 1
    assert AuditLog.objects.filter(organization=org).exists()
