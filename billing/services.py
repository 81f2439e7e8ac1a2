"""State changes of billing. Each is one transaction; credit changes also leave an audit row."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.contrib.auth.models import User
from django.db import connection, transaction
from django.db.models import F

from apikeys.services import MAX_RPM, MAX_TPM
from billing.exceptions import BillingError
from billing.limits import forget_project_limits
from billing.models import MICROS_PER_USD, BillingAccount, CreditEntry, Plan, ProjectRateLimit, UsageEvent
from billing.rollups import rollups_add
from platform_site.access import Actor
from platform_site.models import Organization, Project
from platform_site.services import audit_log_record, project_lock_for_change

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


# The fields of a project rate limit that Keyway enforces, with the largest value each accepts.
RATE_LIMIT_FIELDS = {
    "max_requests_per_1_minute": MAX_RPM,
    "max_tokens_per_1_minute": MAX_TPM,
    "max_requests_per_1_day": MAX_RPM,
}
# Larger than any organization should ever be refused for, small enough for every counter's arithmetic.
MAX_BUDGET_MICROS = 10**9 * MICROS_PER_USD


def rate_limit_id(model: str) -> str:
    """OpenAI names a project's limit on a model `rl-<model>`."""
    return f"rl-{model}"


@transaction.atomic
def project_rate_limit_set(
    *, by: Actor, project: Project, model: str, changes: dict[str, int | None]
) -> ProjectRateLimit:
    """Change a project's ceilings on one model. Each field of `changes` (RATE_LIMIT_FIELDS) becomes a whole
    number from 1 up, or None to go back to the platform default (no daily limit); fields not named stay as
    they are. Owners and admins only. Every worker enforces the change within KEYWAY_BILLING_LOCAL_TTL."""
    project = project_lock_for_change(by=by, project=project, what="change rate limits")
    for name, value in changes.items():
        if name not in RATE_LIMIT_FIELDS:
            raise BillingError(f"Unknown rate limit field '{name}'.", param=name, code="unknown_parameter")
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= RATE_LIMIT_FIELDS[name]
        ):
            raise BillingError(
                f"'{name}' must be a whole number from 1 to {RATE_LIMIT_FIELDS[name]}, or null for the default.",
                param=name,
            )
    row, _ = ProjectRateLimit.objects.get_or_create(project=project, model=model)
    for name, value in changes.items():
        setattr(row, name, value)
    row.save()
    audit_log_record(
        organization=by.organization,
        action="rate_limit.updated",
        target=rate_limit_id(model),
        project=project,
        by=by,
        details={"changes_requested": changes},
    )
    transaction.on_commit(lambda: forget_project_limits(project.pk))
    return row


@transaction.atomic
def project_budget_set(*, by: Actor, project: Project, monthly_budget_micros: int | None) -> Project:
    """Set (or, with None, remove) a project's spend cap per calendar month (UTC), over all of its keys.
    Owners and admins only. Every worker enforces the change within KEYWAY_BILLING_LOCAL_TTL."""
    project = project_lock_for_change(by=by, project=project, what="change project budgets")
    if monthly_budget_micros is not None and not 0 < monthly_budget_micros <= MAX_BUDGET_MICROS:
        raise BillingError(
            f"A monthly budget must be above zero and at most {MAX_BUDGET_MICROS // MICROS_PER_USD} USD.",
            param="monthly_budget_usd",
        )
    project.monthly_budget_micros = monthly_budget_micros
    project.save(update_fields=["monthly_budget_micros"])
    audit_log_record(
        organization=by.organization,
        action="project.updated",
        target=project.public_id,
        project=project,
        by=by,
        details={"changes_requested": {"monthly_budget_micros": monthly_budget_micros}},
    )
    transaction.on_commit(lambda: forget_project_limits(project.pk))
    return project


@dataclass(slots=True)
class SettledUsage:
    """A settled call as the ledger writer receives it (from memory or from a journal file)."""

    call_id: str
    request_id: str
    session_id: str
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
    project_id: int | None = None  # last: journals written before projects end at created_at

    def as_row(self) -> tuple[object, ...]:
        # Plain ints where the callers pass IntegerChoices members: a row of strings and numbers only is one the
        # garbage collector stops tracking (billing.ledger keeps rows for seconds).
        return (
            self.call_id, self.request_id, self.session_id, self.organization_id,
            self.api_key_id, int(self.endpoint), self.model, self.deployment_id,
            self.provider, self.prompt_tokens, self.cached_tokens, self.completion_tokens, self.cost_micros,
            int(self.status), int(self.usage_source), self.latency_ms, self.ttft_ms, self.created_at, self.project_id,
        )

    @classmethod
    def from_row(cls, row: list[object] | tuple[object, ...]) -> SettledUsage:
        if len(row) == _LEGACY_ROW_LENGTH:
            # A journal written before calls had ids of their own: one call per request, named by it.
            row = (row[0], row[0], "", *row[1:])
        return cls(*row)  # type: ignore[arg-type]


_LEGACY_ROW_LENGTH = 16
# The columns of as_row(), in its order; created_at is turned from Unix seconds into the database's form.
_USAGE_COLUMNS = (
    "call_id", "request_id", "session_id", "organization_id",
    "api_key_id", "endpoint", "model", "deployment_id", "provider",
    "prompt_tokens", "cached_tokens", "completion_tokens", "cost_micros", "status", "usage_source",
    "latency_ms", "ttft_ms", "created_at", "project_id",
)
_CREATED_AT = _USAGE_COLUMNS.index("created_at")
# Rows per INSERT statement on SQLite: 19 parameters a row stays well under its limit.
_ROWS_PER_STATEMENT = 1000


def _insert_new_events(events: list[SettledUsage]) -> list[str]:
    """INSERT the events, skipping those already in the ledger; the call ids of the rows inserted.

    On PostgreSQL, one statement whose parameters are a column each (`unnest` of 19 arrays): its text is the same
    for every batch. Rows of placeholders made psycopg parse a query with 19 placeholders per event, a new one
    for every batch size: 78-106 µs of CPU per event (bench: 500-event batches), on the thread that shares
    the GIL with the event loop; by columns it is a few. The arrays go in binary, bound by the server
    (platform_site.database.server_bound). SQLite has no arrays: rows of placeholders there.
    """
    table = connection.ops.quote_name(UsageEvent._meta.db_table)
    names = ", ".join(connection.ops.quote_name(column) for column in _USAGE_COLUMNS)
    adapt = connection.ops.adapt_datetimefield_value
    rows: list[list[Any]] = []
    for event in events:
        values = list(event.as_row())
        values[_CREATED_AT] = adapt(datetime.fromtimestamp(event.created_at, tz=UTC))
        rows.append(values)
    # No conflict target: on PostgreSQL the unique key is (call_id, created_at), the ledger being partitioned by
    # month (billing.partitions); on SQLite it is call_id. An event keeps its created_at wherever it is replayed
    # from, so either way a call conflicts with itself.
    if connection.vendor == "postgresql":
        from platform_site.database.server_bound import first_column

        arrays = ", ".join(f"%b::{_column_type(column)}[]" for column in _USAGE_COLUMNS)
        columns = [list(column) for column in zip(*rows, strict=True)]
        statement = (f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays}) "  # noqa: S608 - column types
                     "ON CONFLICT DO NOTHING RETURNING call_id")
        return first_column(statement, columns)
    row = "(" + ", ".join(["%s"] * len(_USAGE_COLUMNS)) + ")"
    inserted: list[str] = []
    with connection.cursor() as cursor:
        for start in range(0, len(rows), _ROWS_PER_STATEMENT):
            batch = rows[start : start + _ROWS_PER_STATEMENT]
            cursor.execute(
                f"INSERT INTO {table} ({names}) VALUES {', '.join([row] * len(batch))} "  # noqa: S608
                "ON CONFLICT DO NOTHING RETURNING call_id",
                [value for values in batch for value in values],
            )
            inserted.extend(call_id for (call_id,) in cursor.fetchall())
    return inserted


@functools.cache
def _column_type(column: str) -> str:
    """The PostgreSQL type of a usage_events column's array (`bigint`, `varchar`, ...), without a length: an
    explicit cast to varchar(64) cuts a longer value silently, where the INSERT's own assignment refuses it
    (and the event is set aside, whole)."""
    field = next(field for field in UsageEvent._meta.concrete_fields if field.column == column)
    return str(field.db_type(connection)).split("(", 1)[0]


@transaction.atomic
def usage_events_write(events: Iterable[SettledUsage]) -> int:
    """Write a batch of settled calls and charge their organizations, in one transaction.

    Idempotent on the call id: an event already in the ledger (a journal replayed after a crash that hit
    between this commit and the journal's deletion) is skipped and charged nothing, so replaying any batch
    any number of times charges each call exactly once. Returns how many events were new.

    `INSERT … ON CONFLICT DO NOTHING RETURNING` (`_insert_new_events`): the database says which rows it
    inserted, and only those are charged; two writers holding the same event (a live
    worker and one replaying a journal) cannot both insert it. Measured with bench/: the ORM's bulk_create
    plus an existence query cost several times more CPU per event, on the thread that shares the GIL with
    the event loop.
    """
    by_call = {event.call_id: event for event in events}
    unique = list(by_call.values())
    if not unique:
        return 0
    for organization_id in sorted({event.organization_id for event in unique}):
        BillingAccount.objects.get_or_create(organization_id=organization_id)
    inserted = _insert_new_events(unique)
    new = [by_call[call_id] for call_id in inserted]
    charges: defaultdict[int, int] = defaultdict(int)
    for event in new:
        charges[event.organization_id] += event.cost_micros
    # The roll-ups the usage pages read, in this transaction: they hold exactly what the ledger holds.
    rollups_add(new)
    # In a fixed order, so two writers charging overlapping organizations cannot deadlock.
    for organization_id in sorted(charges):
        if charges[organization_id]:
            BillingAccount.objects.filter(pk=organization_id).update(
                usage_total_micros=F("usage_total_micros") + charges[organization_id]
            )
    return len(new)
