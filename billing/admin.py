"""Admin for plans, prices, accounts and the two ledgers.

The ledgers are append-only here too: usage rows are never added, changed or deleted by hand, and a credit
entry is only ever added, through billing.services.credit_add, so it carries the acting user and a reason and
moves the account's total in the same transaction. Account totals are never edited; they follow the ledgers.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.auth.models import User
from django.http import HttpRequest

from billing.models import BillingAccount, CreditEntry, Plan, Price, UsageEvent
from billing.money import micros_to_usd, usd_to_micros
from billing.services import billing_plan_set, credit_add
from platform_site.admin import ReadOnlyAdmin


def _usd(micros: int | None) -> str:
    return "—" if micros is None else f"{micros_to_usd(micros)} USD"


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = ["name", "billing_mode", "price_multiplier", "default_rpm", "default_tpm", "monthly_budget"]
    list_filter = ["billing_mode"]

    @admin.display(description="Monthly budget")
    def monthly_budget(self, obj: Plan) -> str:
        return _usd(obj.monthly_budget_micros)


@admin.register(Price)
class PriceAdmin(admin.ModelAdmin):
    list_display = ["model", "input_per_million_micros", "input_usd", "cached_input_per_million_micros",
                    "cached_input_usd", "output_per_million_micros", "output_usd", "updated_at"]
    search_fields = ["model"]
    readonly_fields = ["input_usd", "cached_input_usd", "output_usd", "updated_at"]
    fields = ["model", "input_per_million_micros", "input_usd", "cached_input_per_million_micros",
              "cached_input_usd", "output_per_million_micros", "output_usd", "updated_at"]

    @admin.display(description="Input, USD / 1M tokens")
    def input_usd(self, obj: Price) -> str:
        return _usd(obj.input_per_million_micros)

    @admin.display(description="Cached input, USD / 1M tokens")
    def cached_input_usd(self, obj: Price) -> str:
        return _usd(obj.cached_input_per_million_micros)

    @admin.display(description="Output, USD / 1M tokens")
    def output_usd(self, obj: Price) -> str:
        return _usd(obj.output_per_million_micros)


@admin.register(BillingAccount)
class BillingAccountAdmin(admin.ModelAdmin):
    list_display = ["organization", "plan", "credit_total", "usage_total", "balance", "monthly_budget", "updated_at"]
    list_filter = ["plan"]
    list_select_related = ["organization", "plan"]
    search_fields = ["organization__name", "organization__slug"]
    fields = ["organization", "plan", "monthly_budget_micros", "credit_total", "usage_total", "balance",
              "credit_version", "updated_at"]
    readonly_fields = ["organization", "credit_total", "usage_total", "balance", "credit_version", "updated_at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Every organization gets its account on first use (billing_account_for).
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: BillingAccount, form: forms.ModelForm, change: bool) -> None:
        # Never obj.save(): it would write back the totals as they were when the page was loaded, wiping out
        # any usage or credit recorded since. Only the two editable fields are written.
        if "plan" in form.changed_data:
            billing_plan_set(organization=obj.organization, plan=obj.plan, actor=_user(request))
        if "monthly_budget_micros" in form.changed_data:
            obj.save(update_fields=["monthly_budget_micros", "updated_at"])

    @admin.display(description="Credit total")
    def credit_total(self, obj: BillingAccount) -> str:
        return _usd(obj.credit_total_micros)

    @admin.display(description="Usage total")
    def usage_total(self, obj: BillingAccount) -> str:
        return _usd(obj.usage_total_micros)

    @admin.display(description="Balance")
    def balance(self, obj: BillingAccount) -> str:
        return _usd(obj.balance_micros)

    @admin.display(description="Monthly budget")
    def monthly_budget(self, obj: BillingAccount) -> str:
        return _usd(obj.monthly_budget_micros)


def _user(request: HttpRequest) -> User | None:
    user = request.user
    return user if isinstance(user, User) else None


class CreditEntryForm(forms.ModelForm):
    amount_usd = forms.DecimalField(
        label="Amount (USD)",
        max_digits=18,
        decimal_places=6,
        help_text="Positive adds credit, negative (adjustments only) takes it away. Up to 6 decimals: exact.",
    )

    class Meta:
        model = CreditEntry
        fields = ["organization", "kind", "reason"]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        amount: Decimal | None = cleaned.get("amount_usd")
        if amount is None:
            return cleaned
        try:
            cleaned["amount_micros"] = usd_to_micros(amount)
        except ValueError as exc:
            self.add_error("amount_usd", str(exc))
            return cleaned
        # credit_add refuses these too; checking here shows the refusal on the form instead of a server error.
        if cleaned["amount_micros"] == 0:
            self.add_error("amount_usd", "A credit change of zero changes nothing.")
        elif cleaned["amount_micros"] < 0 and cleaned.get("kind") == CreditEntry.Kind.TOPUP:
            self.add_error("amount_usd", "A top-up must be positive; use an adjustment to take credit away.")
        return cleaned


@admin.register(CreditEntry)
class CreditEntryAdmin(admin.ModelAdmin):
    """The credit ledger: read-only, except that staff may add entries (top-ups and adjustments)."""

    form = CreditEntryForm
    list_display = ["created_at", "organization", "kind", "amount", "reason", "actor_label", "credit_total_after"]
    list_filter = ["kind", "organization"]
    list_select_related = ["organization"]
    search_fields = ["reason", "organization__slug", "actor_label"]
    date_hierarchy = "created_at"
    readonly_fields = ["organization", "kind", "amount", "reason", "actor", "actor_label", "credit_total_after",
                       "created_at"]

    def get_fields(self, request: HttpRequest, obj: CreditEntry | None = None) -> tuple[str, ...]:
        return ("organization", "kind", "amount_usd", "reason") if obj is None else tuple(self.readonly_fields)

    def get_readonly_fields(self, request: HttpRequest, obj: CreditEntry | None = None) -> tuple[str, ...]:
        return () if obj is None else tuple(self.readonly_fields)

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: CreditEntry, form: forms.ModelForm, change: bool) -> None:
        entry = credit_add(
            organization=form.cleaned_data["organization"],
            amount_micros=form.cleaned_data["amount_micros"],
            reason=form.cleaned_data["reason"],
            kind=form.cleaned_data["kind"],
            actor=_user(request),
        )
        # The service wrote the row; the admin's object becomes that row, so the change log and the redirect
        # that follow point at it.
        for field in CreditEntry._meta.concrete_fields:
            setattr(obj, field.attname, getattr(entry, field.attname))

    @admin.display(description="Amount", ordering="amount_micros")
    def amount(self, obj: CreditEntry) -> str:
        return _usd(obj.amount_micros)

    @admin.display(description="Credit total after")
    def credit_total_after(self, obj: CreditEntry) -> str:
        return _usd(obj.credit_total_after_micros)


@admin.register(UsageEvent)
class UsageEventAdmin(ReadOnlyAdmin):
    """The usage ledger, read-only: rows come from metering alone."""

    list_display = ["created_at", "call_id", "request_id", "organization", "api_key", "endpoint", "model", "status",
                    "prompt_tokens", "cached_tokens", "completion_tokens", "cost", "latency_ms"]
    list_filter = ["organization", "model", "status", "endpoint"]
    list_select_related = ["organization", "api_key"]
    date_hierarchy = "created_at"
    search_fields = ["=call_id", "=request_id", "=session_id"]
    # The ledger grows with every request; counting all of it for each page would be the slowest query here.
    show_full_result_count = False

    def get_readonly_fields(self, request: HttpRequest, obj: object = None) -> list[str]:
        return [*super().get_readonly_fields(request, obj), "cost"]

    @admin.display(description="Cost", ordering="cost_micros")
    def cost(self, obj: UsageEvent) -> str:
        return _usd(obj.cost_micros)
