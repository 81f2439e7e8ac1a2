"""The billing pages in a real browser (Debian's Chromium driven by Playwright) against a real server process: sign
in → /billing (balance, caps, alerts, statements, credit ledger) → save spend alerts → last month's statement →
its PDF download, whose text holds the page's numbers → both pages at a phone's width.

Every page visited is saved as a screenshot under test-artifacts/browser/billing/, with the PDF.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from pypdf import PdfReader

from tests.e2e import server
from tests.e2e.test_dashboard_browser import ARTIFACTS, OVERFLOWING, Shots

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

EMAIL = "ada@example.com"
NEWCOMER = "grace@example.com"
PASSWORD = "correct-horse-battery-staple-42"
# A prepaid organization with a month of history: credits and usage last month and this one, an organization cap
# ($50, from its plan), a project cap of $40 at 78 %, one of $5 passed, a project without a cap, and alerts.
SETUP = f"""
from datetime import UTC, date, datetime, timedelta
from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model
from billing.alerts import month_start, spend_alert_settings_set, spend_alerts_after_usage
from billing.models import CreditEntry, Plan, UsageEvent
from billing.services import SettledUsage, billing_plan_set, credit_add, usage_events_write
from platform_site.access import system_actor
from platform_site.models import Project
from platform_site.selectors import default_project
from platform_site.services import organization_create

user = get_user_model().objects.create_user(username="ada", email="{EMAIL}", password="{PASSWORD}")
EmailAddress.objects.create(user=user, email=user.email, verified=True, primary=True)
org = organization_create(name="Lovelace Analytical Engines", owner=user)
plan = Plan.objects.create(name="prepaid-team", billing_mode="prepaid", monthly_budget_micros=50_000_000)
billing_plan_set(organization=org, plan=plan, actor_label="ops")
main = default_project(organization=org)
Project.objects.filter(pk=main.pk).update(monthly_budget_micros=40_000_000)
research = Project.objects.create(organization=org, name="Research", monthly_budget_micros=5_000_000)
Project.objects.create(organization=org, name="Unlimited experiments")
now = datetime.now(UTC)
this_month = datetime.combine(month_start(now), datetime.min.time(), tzinfo=UTC)
last_month = datetime.combine(month_start(this_month - timedelta(days=1)), datetime.min.time(), tzinfo=UTC)

def credit(amount, reason, when, kind="topup"):
    entry = credit_add(organization=org, amount_micros=amount, reason=reason, kind=kind, actor_label="ops")
    CreditEntry.objects.filter(pk=entry.pk).update(created_at=when)

credit(100_000_000, "Wire transfer INV-0042", last_month + timedelta(days=2, hours=9))
credit(-2_500_000, "Goodwill correction for a duplicated invoice line", last_month + timedelta(days=20),
       "adjustment")
credit(25_000_000, "Card payment", this_month + timedelta(minutes=5))
calls = iter(range(1, 10**6))

def usage(cost, when, model, project, prompt, completion):
    call = f"call_{{next(calls)}}"
    return SettledUsage(call_id=call, request_id=call, session_id="", organization_id=org.pk, api_key_id=None,
        endpoint=1, model=model, deployment_id=None, provider="fake", prompt_tokens=prompt, cached_tokens=0,
        completion_tokens=completion, cost_micros=cost, status=1, usage_source=1, latency_ms=80, ttft_ms=None,
        created_at=when.timestamp(), project_id=project.pk)

events = [
    usage(12_345_678, last_month + timedelta(days=3), "gpt-4o", main, 1_200_000, 310_000),
    usage(4_000_000, last_month + timedelta(days=9), "text-embedding-3-small", research, 9_800_000, 0),
    usage(987_654, last_month + timedelta(days=27), "gemma-3-270m", main, 401_000, 88_000),
    usage(31_250_000, now - timedelta(seconds=30), "gpt-4o", main, 3_100_000, 760_000),
    usage(5_500_000, now - timedelta(seconds=20), "gemma-3-270m", research, 2_000_000, 900_000),
]
usage_events_write(events)
spend_alert_settings_set(by=system_actor(org), thresholds=[50, 80, 100], notify_owners=True, notify_admins=True)
spend_alerts_after_usage(events=events)
# A second organization, new and prepaid: what its owner sees before any credit.
newcomer = get_user_model().objects.create_user(username="grace", email="{NEWCOMER}", password="{PASSWORD}")
EmailAddress.objects.create(user=newcomer, email=newcomer.email, verified=True, primary=True)
billing_plan_set(organization=organization_create(name="Fresh Start", owner=newcomer), plan=plan, actor_label="ops")
print(f"{{last_month:%Y-%m}} {{last_month:%B %Y}}")
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    var_dir = tmp_path_factory.mktemp("keyway-billing-browser")
    env, database = server.make_environment(var_dir)
    env["KEYWAY_EMAIL_FILE_PATH"] = str(var_dir / "mail")
    process = None
    try:
        last_month, last_month_name = server.django_shell(env, SETUP).strip().splitlines()[-1].split(" ", 1)
        process, url = server.start_keyway(env, var_dir / "server.log")
        yield {"url": url, "mail_dir": var_dir / "mail", "last_month": last_month, "last_month_name": last_month_name}
    finally:
        if process is not None:
            server.stop(process)
        server.drop_database(database)


def _sign_in(page: Any, url: str, email: str) -> None:
    page.goto(url + "/accounts/login/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign In").click()
    page.wait_for_url(re.compile(r".*/(settings/api-keys)?$"))


def _text(locator: Any) -> str:
    return " ".join(locator.inner_text().split())


def test_a_member_reads_billing_saves_alerts_and_downloads_a_statement_pdf_with_the_pages_numbers(
    site: dict[str, Any], browser: Any
) -> None:
    url = site["url"]
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
    shot = Shots(page, ARTIFACTS / "billing")

    _sign_in(page, url, EMAIL)

    # The billing page: balance, caps with their meters, the alerts the set-up's spend already sent.
    page.goto(url + "/billing")
    stats = _text(page.locator("dl.stats"))
    assert "Balance $68.416668" in stats and "Credit added, all time $122.50" in stats
    caps = page.get_by_role("table").filter(has_text="Research")
    assert "Lovelace Analytical Engines organization, all projects $36.75 of $50.00 73%" in _text(caps)
    assert "Research project $5.50 of $5.00 110%" in _text(caps)
    assert "Unlimited experiments project $0.00 · no cap" in _text(caps)
    sent = _text(page.locator(".alerts-sent"))
    assert "100% of Research's cap" in sent and "50% of Default project's cap" in sent
    shot("billing")
    assert page.evaluate(OVERFLOWING) == []

    # Spend alerts, saved through the form.
    page.get_by_label("Percentages of a cap").fill("25, 75, 90")
    page.get_by_label("Admins").uncheck()
    page.get_by_role("button", name="Save spend alerts").click()
    page.get_by_text("Spend alerts saved.").wait_for()
    assert "owners when a month's spend reaches 25%, 75% and 90%" in _text(page.locator("#alerts"))
    shot("billing-alerts-saved")

    # Last month's statement, then its PDF: the same numbers.
    page.get_by_role("link", name=site["last_month_name"], exact=True).click()
    page.wait_for_url(f"**/billing/statements/{site['last_month']}")
    summary = _text(page.locator("table.statement-summary"))
    assert re.search(r"Opening balance, 1 \w+ \$0\.00 Credits added \$97\.50 Usage -\$17\.333332 "
                     r"Closing balance, \d+ \w+ \$80\.166668", summary), summary
    usage_table = _text(page.locator("table.statement-table").last)
    assert "gpt-4o 1 1,200,000 0 310,000 $12.345678" in usage_table
    shot("statement")
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download PDF").click()
    download = download_info.value
    assert download.suggested_filename == f"keyway-statement-lovelace-analytical-engines-{site['last_month']}.pdf"
    # Kept beside the screenshots, for a person to look at.
    download.save_as(shot.folder / "statement.pdf")
    pdf = PdfReader(shot.folder / "statement.pdf")
    text = " ".join("\n".join(p.extract_text() for p in pdf.pages).split())
    for needle in ("$0.00", "$97.50", "-$17.333332", "$80.166668", "Wire transfer INV-0042",
                   "Goodwill correction for a duplicated invoice line", "-$2.50", "text-embedding-3-small",
                   "9,800,000", f"Statement for {site['last_month_name']}", "Page 1 of 1"):
        assert needle in text, needle

    # A phone's width: both pages without a horizontal scroll of the page itself.
    page.set_viewport_size({"width": 390, "height": 844})
    page.reload()
    shot("statement-phone")
    assert page.evaluate(OVERFLOWING) == []
    page.goto(url + "/billing")
    shot("billing-phone")
    assert page.evaluate(OVERFLOWING) == []
    context.close()

    # A new prepaid organization: no credit yet, and who to ask for it.
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
    shot.page = page
    _sign_in(page, url, NEWCOMER)
    page.goto(url + "/billing")
    assert "Requests are refused with insufficient_quota until your organization has credit" in _text(
        page.get_by_role("note"))
    assert "No statements yet." in _text(page.locator("#statements"))
    shot("billing-new-organization")
    assert console_errors == []
    context.close()
