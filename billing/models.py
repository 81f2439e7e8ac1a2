"""Money and usage. All amounts are integer micro-USD (1 USD = 1,000,000), all token counts integers.

Two append-only ledgers hold the truth: `UsageEvent` (one row per metered request, idempotent on the request
id) and `CreditEntry` (top-ups and adjustments). `BillingAccount` keeps their running totals, updated in the
same transaction as the rows that change them, so an organization's balance is always
credit_total − usage_total and always equals what the two ledgers add up to.
"""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models

from apikeys.models import ApiKey
from platform_site.models import Organization, Project

MICROS_PER_USD = 1_000_000


class Plan(models.Model):
    """What an organization is sold: prepaid or postpaid, a price multiplier and default limits."""

    class Mode(models.TextChoices):
        PREPAID = "prepaid", "Prepaid (requests need credit)"
        POSTPAID = "postpaid", "Postpaid (no balance check; billed afterwards)"

    name = models.SlugField(max_length=64, unique=True)
    billing_mode = models.CharField(max_length=16, choices=Mode.choices, default=Mode.PREPAID)
    # Applied to every price at settlement: 1.2 charges 20 % over list prices, 0.5 half.
    price_multiplier = models.DecimalField(
        max_digits=8, decimal_places=4, default=Decimal(1), validators=[MinValueValidator(Decimal(0))]
    )
    default_rpm = models.PositiveIntegerField(null=True, blank=True, help_text="Per key, when the key sets none.")
    default_tpm = models.PositiveIntegerField(null=True, blank=True, help_text="Per key, when the key sets none.")
    monthly_budget_micros = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Organization spend cap per calendar month (UTC), micro-USD."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class BillingAccount(models.Model):
    """An organization's money: its plan, its own cap, and the running totals of its two ledgers."""

    # PROTECT here and on every ledger: deleting an organization must never delete what it was charged (an
    # organization with a ledger cannot be deleted; it is deactivated instead).
    organization = models.OneToOneField(
        Organization, on_delete=models.PROTECT, primary_key=True, related_name="billing_account"
    )
    plan = models.ForeignKey(Plan, null=True, blank=True, on_delete=models.PROTECT, related_name="accounts")
    monthly_budget_micros = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Overrides the plan's organization cap (micro-USD per month)."
    )
    credit_total_micros = models.BigIntegerField(default=0)
    usage_total_micros = models.BigIntegerField(default=0)
    # The id of the newest credit entry included in credit_total_micros: lets the hot path's shared counters
    # take a newer total and never an older one, whatever order workers learn of them in.
    credit_version = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.organization} account"

    @property
    def balance_micros(self) -> int:
        return self.credit_total_micros - self.usage_total_micros

    @property
    def billing_mode(self) -> str:
        """The plan's mode; an organization without a plan is billed as KEYWAY_DEFAULT_BILLING_MODE."""
        return self.plan.billing_mode if self.plan is not None else settings.KEYWAY_DEFAULT_BILLING_MODE

    @property
    def effective_monthly_budget_micros(self) -> int | None:
        """The account's own cap, else its plan's; None for no cap."""
        if self.monthly_budget_micros is not None:
            return self.monthly_budget_micros
        return self.plan.monthly_budget_micros if self.plan is not None else None


class ProjectRateLimit(models.Model):
    """A project's ceiling on one model, shared by all of the project's keys (OpenAI's project rate limits).

    A model without a row, or a null field, takes the platform default (KEYWAY_PROJECT_RPM, KEYWAY_PROJECT_TPM;
    no daily limit). Each key's own RPM and TPM apply as well: a request must fit under both.
    """

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="rate_limits")
    model = models.CharField(max_length=128, help_text="Public model id, as in /v1/models.")
    max_requests_per_1_minute = models.PositiveIntegerField(null=True, blank=True)
    max_tokens_per_1_minute = models.PositiveBigIntegerField(null=True, blank=True)
    max_requests_per_1_day = models.PositiveIntegerField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model"]
        constraints = [models.UniqueConstraint(fields=["project", "model"], name="one_rate_limit_per_project_model")]

    def __str__(self) -> str:
        return f"{self.project} {self.model}"


class Price(models.Model):
    """List prices of one public model, per million tokens, in micro-USD (2.50 USD / 1M → 2500000)."""

    model = models.CharField(max_length=128, unique=True, help_text="Public model id, as in /v1/models.")
    input_per_million_micros = models.PositiveBigIntegerField(default=0)
    cached_input_per_million_micros = models.PositiveBigIntegerField(default=0)
    output_per_million_micros = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model"]

    def __str__(self) -> str:
        return self.model


class CreditEntry(models.Model):
    """A change to an organization's prepaid credit, by staff, with a reason. Append-only."""

    class Kind(models.TextChoices):
        TOPUP = "topup", "Top-up"
        ADJUSTMENT = "adjustment", "Adjustment"

    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="credit_entries")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    amount_micros = models.BigIntegerField()
    reason = models.CharField(max_length=500)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    actor_label = models.CharField(max_length=64, blank=True, default="")
    # The account's credit total once this entry was applied.
    credit_total_after_micros = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]
        verbose_name_plural = "credit entries"
        indexes = [models.Index(fields=["organization", "created_at"])]

    def __str__(self) -> str:
        return f"{self.kind} {self.amount_micros / MICROS_PER_USD:+.6f} USD"


class UsageEvent(models.Model):
    """One metered model call. Written in batches off the hot path, at most once per call id.

    A call is one admission and one settlement; one HTTP request, WebSocket connection or agent run may make
    several, so the request id (and the session or connection id, where there is one) groups them.
    """

    class Endpoint(models.IntegerChoices):
        CHAT = 1, "chat.completions"
        EMBEDDINGS = 2, "embeddings"
        RESPONSES = 3, "responses"
        REALTIME = 4, "realtime"

    class Status(models.IntegerChoices):
        OK = 1, "ok"
        ERROR = 2, "error"
        CLIENT_DISCONNECTED = 3, "client_disconnected"
        INCOMPLETE = 4, "incomplete"

    class UsageSource(models.IntegerChoices):
        """Which streaming rule produced the token counts."""

        REPORTED = 1, "reported by the upstream"
        COUNTED = 2, "counted with the model's tokenizer"
        ESTIMATED = 3, "estimated (no tokenizer for the model)"
        NONE = 4, "nothing produced"

    call_id = models.CharField(max_length=64, unique=True)
    request_id = models.CharField(max_length=64, db_index=True)
    # The WebSocket connection, agent run or conversation the call belongs to; "" for a plain request.
    session_id = models.CharField(max_length=64, blank=True, default="")
    # No index of their own: those of Meta.indexes, which start with them, serve every lookup by them (and the
    # checks of a deleted parent); one more index per row written is one more page to update.
    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="+", db_index=False)
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
                                db_index=False)
    # The key's project when the call was made (keys never move between projects; kept here so that usage
    # and project budgets are read without a join, and survive the key).
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
                                db_index=False)
    endpoint = models.PositiveSmallIntegerField(choices=Endpoint.choices)
    model = models.CharField(max_length=128)
    deployment_id = models.PositiveIntegerField(null=True, blank=True)
    provider = models.CharField(max_length=64, blank=True, default="")
    prompt_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost_micros = models.BigIntegerField(default=0)
    status = models.PositiveSmallIntegerField(choices=Status.choices)
    usage_source = models.PositiveSmallIntegerField(choices=UsageSource.choices)
    latency_ms = models.PositiveIntegerField(default=0)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True, help_text="Time to first token (streams).")
    # When the request was admitted (not when its row was written, which may be a moment later): the
    # calendar month of a request is the one its reservation was counted in.
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["organization", "created_at"]),
            models.Index(fields=["api_key", "created_at"]),
            models.Index(fields=["project", "created_at"]),
        ]

    def __str__(self) -> str:
        return self.call_id

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class UsageRollup(models.Model):
    """What the usage pages and APIs read: the ledger summed per period and per (project, key, model,
    endpoint), written in the same transaction as the ledger rows it sums (billing.rollups), so the two
    always agree and no report ever scans the ledger.

    `project_id` and `api_key_id` are plain numbers, 0 for none, not foreign keys: a unique constraint does
    not match NULLs (so an upsert could not find the row), and a roll-up keeps the id of a key deleted since.
    """

    # No index of its own: each table's unique constraint starts with it (a second index would only cost
    # writes and space: 92 MB at ten million calls).
    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="+", db_index=False)
    project_id = models.BigIntegerField(default=0)
    api_key_id = models.BigIntegerField(default=0)
    model = models.CharField(max_length=128)
    endpoint = models.PositiveSmallIntegerField(choices=UsageEvent.Endpoint.choices)
    requests = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0, help_text="Calls that ended in an error (status error).")
    prompt_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cost_micros = models.BigIntegerField(default=0)
    latency_ms = models.BigIntegerField(default=0, help_text="The sum of the calls' latencies.")

    class Meta:
        abstract = True


class UsageDaily(UsageRollup):
    """The ledger per UTC day: dashboards, the billing API, statements and monthly spend."""

    day = models.DateField()

    class Meta:
        verbose_name_plural = "usage per day"
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "day", "project_id", "api_key_id", "model", "endpoint"],
                name="one_usage_daily_per_group",
            )
        ]

    def __str__(self) -> str:
        return f"{self.day} {self.model}"


class UsageHourly(UsageRollup):
    """The ledger per UTC hour: the Admin API's bucket_width=1h."""

    hour = models.DateTimeField()

    class Meta:
        verbose_name_plural = "usage per hour"
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "hour", "project_id", "api_key_id", "model", "endpoint"],
                name="one_usage_hourly_per_group",
            )
        ]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H}h {self.model}"


class UsageLatencyDaily(models.Model):
    """How many calls of a day and group took a latency in one histogram bucket (billing.rollups.LATENCY_BOUNDS_MS):
    the latency percentiles of any range and filter, from a few rows."""

    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="+", db_index=False)
    day = models.DateField()
    project_id = models.BigIntegerField(default=0)
    api_key_id = models.BigIntegerField(default=0)
    model = models.CharField(max_length=128)
    endpoint = models.PositiveSmallIntegerField(choices=UsageEvent.Endpoint.choices)
    bucket = models.PositiveSmallIntegerField()
    requests = models.BigIntegerField(default=0)

    class Meta:
        verbose_name_plural = "usage latency per day"
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "day", "project_id", "api_key_id", "model", "endpoint", "bucket"],
                name="one_usage_latency_per_group",
            )
        ]
        # Covers the unfiltered percentiles of a range (the usage page's default): read from the index alone,
        # not from a table row per group and bucket (a year of a large tenant: 320 ms -> 60 ms on SQLite).
        indexes = [models.Index(fields=["organization", "day", "bucket", "requests"], name="usage_latency_by_bucket")]

    def __str__(self) -> str:
        return f"{self.day} {self.model} bucket {self.bucket}"


class SpendAlertSettings(models.Model):
    """At which percentages of a monthly cap an organization is e-mailed, and which of its roles are (billing.alerts).
    No row, or no percentages: no alerts."""

    organization = models.OneToOneField(
        Organization, on_delete=models.CASCADE, primary_key=True, related_name="spend_alert_settings"
    )
    # Whole percentages, ascending and distinct, each from 1 to 1000 (billing.alerts validates them): [50, 80, 100].
    thresholds = models.JSONField(default=list, blank=True)
    notify_owners = models.BooleanField(default=True)
    notify_admins = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "spend alert settings"

    def __str__(self) -> str:
        return f"{self.organization} spend alerts"


class SpendAlert(models.Model):
    """The first time a calendar month's (UTC) spend reached `percent` % of a cap: the organization's (no project)
    or a project's. Written in the transaction that decides to e-mail, so the unique constraints make an alert go
    out at most once, whichever worker or journal replay gets there first. A changed cap is a new cap."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    month = models.DateField(help_text="The first day of the calendar month (UTC).")
    percent = models.PositiveSmallIntegerField()
    cap_micros = models.PositiveBigIntegerField()
    spend_micros = models.BigIntegerField(help_text="The month's spend when the alert was decided.")
    recipients = models.PositiveSmallIntegerField(default=0, help_text="How many addresses it was sent to.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["organization", "month"])]
        # Two partial constraints rather than one: a unique constraint never matches NULLs, so one over `project`
        # would let the organization's own cap be alerted any number of times.
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "month", "cap_micros", "percent"],
                condition=models.Q(project__isnull=True),
                name="one_spend_alert_per_organization_cap",
            ),
            models.UniqueConstraint(
                fields=["project", "month", "cap_micros", "percent"],
                condition=models.Q(project__isnull=False),
                name="one_spend_alert_per_project_cap",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.percent}% of {self.cap_micros / MICROS_PER_USD:.2f} USD in {self.month:%Y-%m}"
