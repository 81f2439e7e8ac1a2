"""State changes of billing. Each is one transaction; credit changes also leave an audit row."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import F

from billing.exceptions import BillingError
from billing.models import BillingAccount, CreditEntry, Plan, UsageEvent
from platform_site.models import Organization
from platform_site.services import audit_log_record

# Called on commit of a credit change with (organization id, new credit total, credit version): the hot
# path's counters (billing.admission) register here; a lower-level module cannot be imported from here.
_credit_listeners: list[Callable[[int, int, int], None]] = []


def on_credit_change(listener: Callable[[int, int, int], None]) -> None:
    if listener not in _credit_listeners:
        _credit_listeners.append(listener)


def billing_account_for(*, organization_id: int) -> BillingAccount:
    """The organization's account, created on first use (every organization has exactly one)."""
    account, _ = BillingAccount.objects.select_related("plan").get_or_create(organization_id=organization_id)
    return account


@transaction.atomic
def credit_add(
    *,
    organization: Organization,
    amount_micros: int,
    reason: str,
    kind: str = CreditEntry.Kind.TOPUP,
    actor: User | None = None,
    actor_label: str = "",
) -> CreditEntry:
    """Add (or, with a negative amount, take away) prepaid credit. Staff only; the reason is required."""
    if not reason.strip():
        raise BillingError("A credit change needs a reason.")
    if kind not in CreditEntry.Kind.values:
        raise BillingError(f"Unknown credit entry kind {kind!r}.")
    if kind == CreditEntry.Kind.TOPUP and amount_micros <= 0:
        raise BillingError("A top-up must be a positive amount; use an adjustment to take credit away.")
    if amount_micros == 0:
        raise BillingError("A credit change of zero changes nothing.")
    billing_account_for(organization_id=organization.pk)
    account = BillingAccount.objects.select_for_update().get(pk=organization.pk)
    account.credit_total_micros += amount_micros
    entry = CreditEntry.objects.create(
        organization=organization,
        kind=kind,
        amount_micros=amount_micros,
        reason=reason.strip(),
        actor=actor if actor is not None and actor.is_authenticated else None,
        actor_label=actor_label or (str(actor) if actor is not None else "system"),
        credit_total_after_micros=account.credit_total_micros,
    )
    account.credit_version = entry.pk
    account.save(update_fields=["credit_total_micros", "credit_version", "updated_at"])
    audit_log_record(
        organization=organization,
        action=f"credit.{kind}",
        target=organization.slug,
        actor=actor,
        actor_label=actor_label,
        details={"amount_micros": amount_micros, "reason": entry.reason},
    )
    total, version = account.credit_total_micros, entry.pk
    transaction.on_commit(lambda: [listener(organization.pk, total, version) for listener in _credit_listeners])
    return entry


@transaction.atomic
def billing_plan_set(
    *, organization: Organization, plan: Plan | None, actor: User | None = None, actor_label: str = ""
) -> BillingAccount:
    billing_account_for(organization_id=organization.pk)
    account = BillingAccount.objects.select_for_update().get(pk=organization.pk)
    account.plan = plan
    account.save(update_fields=["plan", "updated_at"])
    audit_log_record(
        organization=organization,
        action="billing.plan_set",
        target=organization.slug,
        actor=actor,
        actor_label=actor_label,
        details={"plan": plan.name if plan is not None else None},
    )
    return account


@dataclass(slots=True)
class SettledUsage:
    """A settled request as the ledger writer receives it (from memory or from a journal file)."""

    request_id: str
    organization_id: int
    api_key_id: int | None
    endpoint: int
    model: str
    deployment_id: int | None
    provider: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_micros: int
    status: int
    usage_source: int
    latency_ms: int
    ttft_ms: int | None
    created_at: float  # Unix seconds

    def as_row(self) -> tuple[object, ...]:
        return (
            self.request_id, self.organization_id, self.api_key_id, self.endpoint, self.model, self.deployment_id,
            self.provider, self.prompt_tokens, self.cached_tokens, self.completion_tokens, self.cost_micros,
            self.status, self.usage_source, self.latency_ms, self.ttft_ms, self.created_at,
        )

    @classmethod
    def from_row(cls, row: list[object] | tuple[object, ...]) -> SettledUsage:
        return cls(*row)  # type: ignore[arg-type]


@transaction.atomic
def usage_events_write(events: Iterable[SettledUsage]) -> int:
    """Write a batch of settled requests and charge their organizations, in one transaction.

    Idempotent on the request id: an event already in the ledger (a journal replayed after a crash that hit
    between this commit and the journal's deletion) is skipped and charged nothing, so replaying any batch
    any number of times charges each request exactly once. Returns how many events were new.
    """
    unique = {event.request_id: event for event in events}
    if not unique:
        return 0
    organization_ids = sorted({event.organization_id for event in unique.values()})
    existing_accounts = set(
        BillingAccount.objects.filter(pk__in=organization_ids).values_list("pk", flat=True)
    )
    for organization_id in organization_ids:
        if organization_id not in existing_accounts:
            BillingAccount.objects.get_or_create(organization_id=organization_id)
    # Lock the accounts in a fixed order: two writers holding overlapping batches (a live worker and one
    # replaying a dead worker's journal) then take turns, and the second sees the first one's rows.
    list(BillingAccount.objects.select_for_update().filter(pk__in=organization_ids).order_by("pk").values("pk"))
    seen = set(UsageEvent.objects.filter(request_id__in=list(unique)).values_list("request_id", flat=True))
    fresh = [event for request_id, event in unique.items() if request_id not in seen]
    UsageEvent.objects.bulk_create(
        [
            UsageEvent(
                request_id=event.request_id,
                organization_id=event.organization_id,
                api_key_id=event.api_key_id,
                endpoint=event.endpoint,
                model=event.model,
                deployment_id=event.deployment_id,
                provider=event.provider,
                prompt_tokens=event.prompt_tokens,
                cached_tokens=event.cached_tokens,
                completion_tokens=event.completion_tokens,
                cost_micros=event.cost_micros,
                status=event.status,
                usage_source=event.usage_source,
                latency_ms=event.latency_ms,
                ttft_ms=event.ttft_ms,
                created_at=datetime.fromtimestamp(event.created_at, tz=UTC),
            )
            for event in fresh
        ],
        batch_size=500,
    )
    charges: defaultdict[int, int] = defaultdict(int)
    for event in fresh:
        charges[event.organization_id] += event.cost_micros
    for organization_id, amount in charges.items():
        if amount:
            BillingAccount.objects.filter(pk=organization_id).update(
                usage_total_micros=F("usage_total_micros") + amount
            )
    return len(fresh)
