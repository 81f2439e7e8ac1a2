"""Billing: the organization's balance or month-to-date spend, its caps, the credit ledger, monthly statements
(a page, and the same page as a PDF) and spend alerts. Every member reads it; owners and admins change alerts.

No URL here names an organization: every page reads request.membership's, so another organization's numbers
cannot be asked for, only one's own.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Any

from django import forms
from django.contrib import messages
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_safe

from billing.alerts import (
    MAX_PERCENT,
    MAX_THRESHOLDS,
    CapSpend,
    cap_spend_list,
    month_start,
    spend_alert_list,
    spend_alert_settings_get,
    spend_alert_settings_set,
)
from billing.models import SpendAlertSettings
from billing.money import usd_display
from billing.selectors import balance_summary, credit_entry_list, monthly_statement
from billing.statements import FIRST_MONTH, PdfUnavailable, statement_months, statement_pdf
from dashboard.views.common import add_service_error, member_required
from platform_site.access import Actor
from platform_site.kernel.errors import ApiError
from platform_site.models import Organization

CREDITS_PAGE = 20
_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")
_NUMBER = re.compile(r"[0-9]+")


def _actor(request: HttpRequest) -> Actor:
    return request.actor  # type: ignore[attr-defined, no-any-return]


def _usd(micros: int) -> str:
    """"$12.50", "-$5.00": the sign before the dollar, as people write it."""
    return f"-${usd_display(-micros)}" if micros < 0 else f"${usd_display(micros)}"


def _cap_limit(cap: CapSpend) -> str | None:
    # A cap of zero is a cap (it refuses every request), not the absence of one.
    return None if cap.cap_micros is None else _usd(cap.cap_micros)


class SpendAlertForm(forms.Form):
    thresholds = forms.CharField(
        label="Percentages of a cap",
        required=False,
        max_length=200,
        widget=forms.TextInput(attrs={"placeholder": "50, 80, 100"}),
        help_text=f"Whole numbers from 1 to {MAX_PERCENT}, separated by commas, at most {MAX_THRESHOLDS}: "
        "50, 80, 100. Empty turns alerts off.",
    )
    notify_owners = forms.BooleanField(label="Owners", required=False)
    notify_admins = forms.BooleanField(label="Admins", required=False)

    def clean_thresholds(self) -> list[int]:
        # Only the spelling is checked here; the service says which numbers it accepts.
        words = [word for word in re.split(r"[\s,;]+", self.cleaned_data["thresholds"]) if word]
        wrong = [word for word in words if not _NUMBER.fullmatch(word.removesuffix("%"))]
        if wrong:
            raise forms.ValidationError(
                f"{wrong[0][:20]!r} is not a percentage: write whole numbers from 1 to {MAX_PERCENT}, "
                "as in 50, 80, 100."
            )
        return [int(word.removesuffix("%")) for word in words]


def _alert_form_initial(current: SpendAlertSettings) -> dict[str, Any]:
    return {
        "thresholds": ", ".join(str(p) for p in current.thresholds),
        "notify_owners": current.notify_owners,
        "notify_admins": current.notify_admins,
    }


@require_http_methods(["GET", "HEAD", "POST"])
@member_required
def billing_overview(request: HttpRequest) -> HttpResponse:
    actor = _actor(request)
    organization = actor.organization
    alert_settings = spend_alert_settings_get(organization=organization)
    form = SpendAlertForm(initial=_alert_form_initial(alert_settings))
    status = 200
    if request.method == "POST":
        form = SpendAlertForm(request.POST)
        if form.is_valid():
            data = form.cleaned_data
            try:
                spend_alert_settings_set(
                    by=actor,
                    thresholds=data["thresholds"],
                    notify_owners=data["notify_owners"],
                    notify_admins=data["notify_admins"],
                )
            except ApiError as error:
                # A bad value goes beside its field; a refusal (a reader's try) at the top of the page, where
                # someone without the form sees it.
                if error.param:
                    add_service_error(form, error)
                else:
                    messages.error(request, error.message)
                status = error.status
            else:
                messages.success(request, "Spend alerts saved." if data["thresholds"] else "Spend alerts turned off.")
                return redirect(reverse("dashboard:billing") + "#alerts")
        else:
            status = 400
    now = timezone.now()
    month = month_start(now)
    summary = balance_summary(organization=organization, now=now)
    caps = cap_spend_list(organization=organization, month=month)
    credits = Paginator(credit_entry_list(organization=organization), CREDITS_PAGE).get_page(request.GET.get("page"))
    context = {
        "summary": summary,
        "prepaid": summary.billing_mode == "prepaid",
        "balance": _usd(summary.balance_micros),
        "credit_total": _usd(summary.credit_total_micros),
        "month_spend": _usd(summary.month_spend_micros),
        "month": month,
        "caps": [{"cap": cap, "limit": _cap_limit(cap), "spend": _usd(cap.spend_micros)} for cap in caps],
        "credits": credits,
        "credit_rows": [(entry, _usd(entry.amount_micros), _usd(entry.credit_total_after_micros)) for entry in credits],
        "statements": statement_months(organization=organization, now=now),
        "alert_settings": alert_settings,
        "alerts_sent": spend_alert_list(organization=organization, month=month),
        "form": form,
        "can_manage": actor.is_manager,
    }
    return render(request, "dashboard/billing/overview.html", context, status=status)


def _month_or_none(period: str) -> date | None:
    """The month a URL names as YYYY-MM, if it is one from 2000-01 to the current month (UTC)."""
    match = _MONTH.fullmatch(period)
    if match is None:
        return None
    year, number = int(match.group(1)), int(match.group(2))
    if year < FIRST_MONTH.year or not 1 <= number <= 12:
        return None
    month = date(year, number, 1)
    return month if month <= month_start(timezone.now()) else None


def _no_such_statement(request: HttpRequest, period: str) -> HttpResponse:
    context = {"period": period[:40], "first": FIRST_MONTH, "current": month_start(timezone.now())}
    return render(request, "dashboard/billing/no_statement.html", context, status=404)


def _statement_context(organization: Organization, month: date, *, printing: bool) -> dict[str, Any]:
    statement = monthly_statement(organization=organization, year=month.year, month=month.month)
    totals = statement.usage_totals
    current = month_start(timezone.now())
    previous = date(month.year - 1, 12, 1) if month.month == 1 else date(month.year, month.month - 1, 1)
    following = date(month.year + 1, 1, 1) if month.month == 12 else date(month.year, month.month + 1, 1)
    return {
        "layout": "dashboard/billing/print.html" if printing else "base.html",
        "printing": printing,
        "organization": organization,
        "statement": statement,
        "month": month,
        "period": f"{month:%Y-%m}",
        "last_day": date.fromordinal(following.toordinal() - 1),
        "opening": _usd(statement.opening_balance_micros),
        "credits_total": _usd(statement.credits_micros),
        "usage_total": _usd(totals.cost_micros),
        "closing": _usd(statement.closing_balance_micros),
        "credit_rows": [(entry, _usd(entry.amount_micros)) for entry in statement.credit_entries],
        "usage_rows": [(line.fields["model"], line.totals, _usd(line.totals.cost_micros))
                       for line in statement.usage_by_model],
        "totals": totals,
        "previous": f"{previous:%Y-%m}" if previous >= FIRST_MONTH else None,
        "following": f"{following:%Y-%m}" if following <= current else None,
        "generated_at": timezone.now(),
    }


@require_safe
@member_required
def statement_view(request: HttpRequest, period: str) -> HttpResponse:
    month = _month_or_none(period)
    if month is None:
        return _no_such_statement(request, period)
    context = _statement_context(_actor(request).organization, month, printing=False)
    return render(request, "dashboard/billing/statement.html", context)


@require_safe
@member_required
def statement_pdf_view(request: HttpRequest, period: str) -> HttpResponse:
    """The statement page in its print layout, as a PDF download."""
    month = _month_or_none(period)
    if month is None:
        return _no_such_statement(request, period)
    organization = _actor(request).organization
    html = render_to_string("dashboard/billing/statement.html", _statement_context(organization, month, printing=True))
    try:
        pdf = statement_pdf(html=html)
    except PdfUnavailable as error:
        return render(request, "dashboard/billing/no_pdf.html", {"message": error.message, "period": f"{month:%Y-%m}"},
                      status=error.status)
    response = HttpResponse(pdf, content_type="application/pdf")
    response["Content-Disposition"] = f'attachment; filename="keyway-statement-{organization.slug}-{month:%Y-%m}.pdf"'
    response["Cache-Control"] = "private, no-store"
    return response
