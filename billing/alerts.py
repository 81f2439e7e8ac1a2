"""Spend alerts: an e-mail to an organization's owners and admins when a calendar month's (UTC) spend reaches a
chosen percentage of a monthly cap, the organization's or one of its projects', once per cap, percentage and month.

How "once" holds across worker processes, a journal replayed after a crash, and a batch that straddles midnight
at the end of a month:
- the check runs after a usage batch has committed (billing.ledger calls `spend_alerts_after_usage` on the
  writer's thread, never on the event loop) and reads spend from the daily roll-ups that batch's transaction
  wrote, for each month the batch charged;
- deciding to send is one transaction: it locks the organization's alert settings (two workers deciding for one
  organization take turns), reads what was already alerted, and records the new alerts; the unique constraints on
  those rows are the backstop should two deciders ever race past the lock;
- the e-mail goes out only once that transaction has committed (transaction.on_commit), so a decision that rolls
  back sends nothing, and over SMTP from a thread of its own, so a slow mail server holds up no usage write.
  That makes alerts at most once, not at least once: a mail server that refuses a message after the commit
  loses that alert (it is logged) rather than risk sending it twice.

Cheap for everyone else: one query per batch finds which of the charged organizations have alerts on; the rest
cost nothing more, one with alerts but no cap three small reads, and one whose spend crossed nothing new five,
without a lock or a write.

Settings changes are services in the house sense (one transaction, an audit row); they live here with the reads
of the alert pages so that everything about alerts is in one module.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from django.conf import settings
from django.core.mail import EmailMessage, get_connection
from django.db import IntegrityError, transaction
from django.db.models import Sum
from django.template.loader import render_to_string
from django.utils import timezone

from billing.exceptions import BillingError
from billing.models import BillingAccount, SpendAlert, SpendAlertSettings, UsageDaily
from billing.money import usd_display
from platform_site.access import Actor
from platform_site.models import Membership, Organization, Project, Role
from platform_site.services import audit_log_record

logger = logging.getLogger(__name__)

MAX_THRESHOLDS = 10
MAX_PERCENT = 1000


def month_start(moment: datetime | date) -> date:
    """The first day of the calendar month (UTC) that `moment` falls in."""
    if isinstance(moment, datetime):
        moment = moment.astimezone(UTC).date()
    return moment.replace(day=1)


def _next_month(month: date) -> date:
    return date(month.year + 1, 1, 1) if month.month == 12 else date(month.year, month.month + 1, 1)


# --- Caps and what was spent against them --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CapSpend:
    """One monthly cap and a month's spend against it. `project` is None for the organization's own cap;
    `cap_micros` is None for a project without a cap (listed on the billing page, never alerted)."""

    project: Project | None
    cap_micros: int | None
    spend_micros: int

    @property
    def percent(self) -> int | None:
        """Whole percent of the cap spent, rounded down (so 100 means the cap is reached); None without a cap."""
        if not self.cap_micros:
            return None
        return self.spend_micros * 100 // self.cap_micros

    def reached(self, percent: int) -> bool:
        """Whether the spend has reached `percent` % of the cap, in exact integers."""
        return bool(self.cap_micros) and self.spend_micros * 100 >= percent * (self.cap_micros or 0)


def organization_cap(*, organization_id: int) -> int | None:
    """The organization's monthly cap (its account's own, else its plan's); None for none."""
    account = BillingAccount.objects.select_related("plan").filter(pk=organization_id).first()
    return account.effective_monthly_budget_micros if account is not None else None


def cap_spend_list(*, organization: Organization, month: date, capped_only: bool = False) -> list[CapSpend]:
    """The organization's cap and each active project's (projects without a cap too, unless `capped_only`), with
    the spend of `month` against each, from the daily roll-ups: the organization's first, projects by name."""
    cap = organization_cap(organization_id=organization.pk)
    projects = Project.objects.filter(organization=organization, archived_at__isnull=True)
    if capped_only:
        projects = projects.filter(monthly_budget_micros__gt=0)
    projects_listed = list(projects.order_by("-is_default", "name", "id"))
    if capped_only and not cap and not projects_listed:
        return []
    per_project = {
        row["project_id"]: int(row["total"] or 0)
        for row in UsageDaily.objects.filter(
            organization=organization, day__gte=month, day__lt=_next_month(month)
        ).values("project_id").annotate(total=Sum("cost_micros")).order_by()
    }
    spends = [] if capped_only and not cap else [CapSpend(None, cap, sum(per_project.values()))]
    return spends + [CapSpend(p, p.monthly_budget_micros, per_project.get(p.pk, 0)) for p in projects_listed]


# --- Settings ------------------------------------------------------------------------------------------------


def spend_alert_settings_get(*, organization: Organization) -> SpendAlertSettings:
    """The organization's alert settings; an unsaved default (no alerts, owners and admins) when it has none."""
    found = SpendAlertSettings.objects.filter(organization=organization).first()
    return found or SpendAlertSettings(organization=organization)


def _valid_thresholds(thresholds: Sequence[int]) -> list[int]:
    for value in thresholds:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PERCENT:
            raise BillingError(
                f"Each percentage must be a whole number from 1 to {MAX_PERCENT}; {str(value)[:20]!r} is not.",
                param="thresholds",
            )
    chosen = sorted(set(thresholds))
    if len(chosen) > MAX_THRESHOLDS:
        raise BillingError(f"Choose at most {MAX_THRESHOLDS} percentages, not {len(chosen)}.", param="thresholds")
    return chosen


@transaction.atomic
def spend_alert_settings_set(
    *, by: Actor, thresholds: Sequence[int], notify_owners: bool, notify_admins: bool
) -> SpendAlertSettings:
    """Set the percentages of a cap that the organization is e-mailed at (none: no alerts) and which roles get
    the e-mails. Owners and admins only. Percentages already alerted this month are not alerted again."""
    by.require_manager("change spend alerts")
    chosen = _valid_thresholds(thresholds)
    if chosen and not (notify_owners or notify_admins):
        raise BillingError("Choose who gets the alerts: owners, admins or both.", param="notify_owners")
    row, _ = SpendAlertSettings.objects.select_for_update().get_or_create(organization=by.organization)
    before = {"thresholds": row.thresholds, "notify_owners": row.notify_owners, "notify_admins": row.notify_admins}
    row.thresholds, row.notify_owners, row.notify_admins = chosen, notify_owners, notify_admins
    row.save()
    after = {"thresholds": chosen, "notify_owners": notify_owners, "notify_admins": notify_admins}
    audit_log_record(
        organization=by.organization,
        action="billing.spend_alerts_set",
        target=by.organization.slug,
        by=by,
        details={"before": before, "after": after},
    )
    return row


def spend_alert_list(*, organization: Organization, month: date) -> list[SpendAlert]:
    """The alerts recorded for the organization's caps in `month`, newest first."""
    return list(SpendAlert.objects.filter(organization=organization, month=month).select_related("project"))


# --- Deciding and sending ------------------------------------------------------------------------------------


def _charged_months(events: Iterable[Any], now: datetime) -> dict[int, set[date]]:
    """Per organization charged by `events` (billing.services.SettledUsage), the months charged: this one and the
    one before only. The one before is a batch that straddled midnight at a month's end; anything older is a
    journal replayed long after, and an alert about a month long closed would only be noise."""
    current = month_start(now)
    previous = month_start(date.fromordinal(current.toordinal() - 1))
    charged: defaultdict[int, set[date]] = defaultdict(set)
    for event in events:
        if event.cost_micros > 0:
            month = month_start(datetime.fromtimestamp(event.created_at, tz=UTC))
            if month in (current, previous):
                charged[event.organization_id].add(month)
    return charged


def spend_alerts_after_usage(*, events: Sequence[Any], now: datetime | None = None) -> None:
    """The ledger writer's hook, after a batch has committed: alert the organizations it charged whose spend
    crossed a chosen percentage of a cap. Never raises: an alert that cannot be decided is logged, and the
    batch stays written (a raise here would make the writer retry a batch that is already in the ledger)."""
    try:
        charged = _charged_months(events, now or timezone.now())
        if not charged:
            return
        with_alerts = [
            row for row in SpendAlertSettings.objects.filter(organization_id__in=list(charged)) if row.thresholds
        ]
    except Exception:
        logger.exception("Could not look up spend alerts after a usage batch")
        return
    for row in with_alerts:
        for month in sorted(charged[row.organization_id]):
            try:
                spend_alerts_check(organization_id=row.organization_id, month=month, thresholds=row.thresholds)
            except Exception:
                logger.exception("Could not check the spend alerts of organization %s", row.organization_id)


@dataclass(frozen=True, slots=True)
class _Crossing:
    cap: CapSpend
    percents: list[int]


def _crossings(
    cap_spends: list[CapSpend], thresholds: Sequence[int], sent: set[tuple[int | None, int, int]]
) -> list[_Crossing]:
    crossings = []
    for cap in cap_spends:
        project_id = cap.project.pk if cap.project is not None else None
        new = [p for p in thresholds if cap.reached(p) and (project_id, cap.cap_micros or 0, p) not in sent]
        if new:
            crossings.append(_Crossing(cap, new))
    return crossings


def _sent(*, organization_id: int, month: date) -> set[tuple[int | None, int, int]]:
    return set(
        SpendAlert.objects.filter(organization_id=organization_id, month=month).values_list(
            "project_id", "cap_micros", "percent"
        )
    )


def spend_alerts_check(*, organization_id: int, month: date, thresholds: Sequence[int]) -> list[SpendAlert]:
    """Record and e-mail (after commit) every alert that `month`'s spend has earned and that was not sent yet;
    returns the alerts recorded. A cap that crossed several percentages since the last check gets one e-mail,
    naming the highest; all of them are recorded, so the lower ones never come later."""
    organization = Organization.objects.get(pk=organization_id)
    cap_spends = cap_spend_list(organization=organization, month=month, capped_only=True)
    if not cap_spends:
        return []
    # Without the lock first: almost every batch crosses nothing new, and then takes no lock and writes nothing.
    if not _crossings(cap_spends, thresholds, _sent(organization_id=organization_id, month=month)):
        return []
    with transaction.atomic():
        settings_row = SpendAlertSettings.objects.select_for_update().filter(pk=organization_id).first()
        if settings_row is None or not settings_row.thresholds:
            return []
        crossings = _crossings(cap_spends, settings_row.thresholds, _sent(organization_id=organization_id, month=month))
        recipients = spend_alert_recipients(organization=organization, settings=settings_row)
        recorded: list[SpendAlert] = []
        messages: list[EmailMessage] = []
        for crossing in crossings:
            # An alert is e-mailed by whoever records it: a percentage another decider recorded first is its to send.
            attempts = [_record(organization, month, crossing.cap, p, len(recipients)) for p in crossing.percents]
            new = [alert for alert in attempts if alert is not None]
            if new:
                recorded.extend(new)
                messages.extend(_messages(organization, month, crossing.cap, max(a.percent for a in new), recipients))
        if messages:
            transaction.on_commit(lambda: _deliver(messages))
    return recorded


def _record(organization: Organization, month: date, cap: CapSpend, percent: int, recipients: int) -> SpendAlert | None:
    try:
        with transaction.atomic():
            return SpendAlert.objects.create(
                organization=organization,
                project=cap.project,
                month=month,
                percent=percent,
                cap_micros=cap.cap_micros or 0,
                spend_micros=cap.spend_micros,
                recipients=recipients,
            )
    except IntegrityError:
        return None


def spend_alert_recipients(*, organization: Organization, settings: SpendAlertSettings) -> list[tuple[str, str]]:
    """(address, role) of each active member whose role gets the alerts, one per address. Only members: an alert
    tells what the organization spends, so it never goes to an address nobody in the organization signed up with."""
    roles = [role for role, wanted in ((Role.OWNER, settings.notify_owners), (Role.ADMIN, settings.notify_admins))
             if wanted]
    rows = (
        Membership.objects.filter(organization=organization, role__in=roles, user__is_active=True)
        .exclude(user__email="")
        .order_by("user__email")
        .values_list("user__email", "role")
    )
    seen: dict[str, tuple[str, str]] = {}
    for email, role in rows:
        seen.setdefault(email.lower(), (email, role))
    return list(seen.values())


def _messages(
    organization: Organization, month: date, cap: CapSpend, percent: int, recipients: list[tuple[str, str]]
) -> list[EmailMessage]:
    context = {
        "organization": organization,
        "project": cap.project,
        "month": month,
        "percent": percent,
        "spent_percent": cap.percent,
        "spend_usd": usd_display(cap.spend_micros),
        "cap_usd": usd_display(cap.cap_micros or 0),
        "billing_url": f"{settings.KEYWAY_DASHBOARD_URL}/billing" if settings.KEYWAY_DASHBOARD_URL else "",
    }
    subject = " ".join(render_to_string("emails/spend_alert_subject.txt", context).split())
    messages = []
    for address, role in recipients:
        body = render_to_string("emails/spend_alert.txt", {**context, "role": Role(role).label.lower()})
        messages.append(EmailMessage(subject, body, settings.DEFAULT_FROM_EMAIL, [address]))
    return messages


_mailer: ThreadPoolExecutor | None = None  # made on the first alert sent over the network, not at import


def _deliver(messages: list[EmailMessage]) -> None:
    """After the commit. Over SMTP, on a thread of its own: the ledger writer runs this, and on SQLite the
    writer is the thread every ORM call of the process shares, so a mail server that hangs must not hold it
    for EMAIL_TIMEOUT. The console, file and test back-ends send at once."""
    global _mailer
    if settings.EMAIL_BACKEND != "django.core.mail.backends.smtp.EmailBackend":
        _send(messages)
        return
    if _mailer is None:
        _mailer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spend-alert-mail")
    _mailer.submit(_send, messages)


def _send(messages: list[EmailMessage]) -> None:
    # The alert is recorded as sent whatever happens here.
    try:
        get_connection().send_messages(messages)
    except Exception:
        logger.exception("Sending %d spend alert e-mails failed; they are not retried", len(messages))
