"""The dashboard's forms. They parse and validate what a person typed; the services decide what may be done."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from django import forms
from django.utils import timezone

from apikeys.scopes import ALL_SCOPES, CONNECTORS, KEY_SCOPES, READ_ONLY_SCOPES, SCOPE_LABELS
from apikeys.services import MAX_RPM, MAX_TPM
from billing.money import usd_to_micros
from billing.services import RATE_LIMIT_FIELDS
from platform_site.models import Role

PERMISSION_CHOICES = [
    ("all", "All — every model endpoint (not usage and billing)"),
    ("restricted", "Restricted — only the endpoints chosen below"),
    ("read_only", "Read only — list models and read usage"),
]
GRACE_CHOICES = [
    ("0", "End it now"),
    ("3600", "1 hour"),
    ("86400", "24 hours"),
    ("604800", "7 days"),
    ("2592000", "30 days"),
]
ROLE_CHOICES = [(role.value, role.label) for role in Role]


class OrganizationForm(forms.Form):
    name = forms.CharField(label="Organization name", max_length=200)


class ProjectForm(forms.Form):
    name = forms.CharField(label="Project name", max_length=100)


class ProjectBudgetForm(forms.Form):
    monthly_budget = forms.DecimalField(
        label="Monthly budget (USD)",
        min_value=Decimal("0.01"),
        max_digits=12,
        decimal_places=2,
        help_text="Requests from the project's keys are refused once this calendar month's (UTC) spend would pass it.",
    )

    def budget_micros(self) -> int:
        return usd_to_micros(self.cleaned_data["monthly_budget"])


# A project's limits on one model, as the form names them (the field suffix) and as the services do.
RATE_LIMIT_INPUTS = [
    ("rpm", "max_requests_per_1_minute", "Requests per minute"),
    ("tpm", "max_tokens_per_1_minute", "Tokens per minute"),
    ("rpd", "max_requests_per_1_day", "Requests per day"),
]


class RateLimitsForm(forms.Form):
    """A project's limits on every model: one row of three optional numbers per model. An empty field is the
    platform default (no daily limit); the default shows as the field's placeholder."""

    def __init__(self, *args: Any, limits: list[Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.rows: list[tuple[Any, list[forms.BoundField]]] = []
        for index, limit in enumerate(limits):
            bound = []
            for suffix, name, label in RATE_LIMIT_INPUTS:
                key = f"{index}-{suffix}"
                default = getattr(limit, name) if limit.own[name] is None else None
                self.fields[key] = forms.IntegerField(
                    label=f"{label} for {limit.model}",
                    required=False,
                    min_value=1,
                    max_value=RATE_LIMIT_FIELDS[name],
                    initial=limit.own[name],
                    widget=forms.NumberInput(
                        attrs={"placeholder": f"{default:,}" if default else "None", "inputmode": "numeric"}
                    ),
                )
                bound.append(self[key])
            self.rows.append((limit, bound))

    def changes(self) -> dict[str, dict[str, int | None]]:
        """Per model, the fields whose value differs from what the project has now."""
        changed: dict[str, dict[str, int | None]] = {}
        for index, limit in enumerate(self.limits):
            for suffix, name, _ in RATE_LIMIT_INPUTS:
                value = self.cleaned_data.get(f"{index}-{suffix}")
                if value != limit.own[name]:
                    changed.setdefault(limit.model, {})[name] = value
        return changed


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(label="Name", max_length=100, help_text="A name to tell this key from others.")
    project = forms.ChoiceField(label="Project")
    permissions = forms.ChoiceField(
        label="Permissions", choices=PERMISSION_CHOICES, initial="all", widget=forms.RadioSelect
    )
    scopes = forms.MultipleChoiceField(
        label="Endpoints this key may call",
        choices=[(scope, SCOPE_LABELS[scope]) for scope in KEY_SCOPES],
        required=False,
        widget=forms.CheckboxSelectMultiple,
    )
    models = forms.MultipleChoiceField(
        label="Allowed models",
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="None chosen: every model of the catalog.",
    )
    rpm = forms.IntegerField(label="Requests per minute (RPM)", required=False, min_value=1, max_value=MAX_RPM)
    tpm = forms.IntegerField(label="Tokens per minute (TPM)", required=False, min_value=1, max_value=MAX_TPM)
    monthly_budget = forms.DecimalField(
        label="Monthly budget (USD)", required=False, min_value=Decimal("0.000001"), max_digits=14, decimal_places=6
    )
    expires_on = forms.DateField(
        label="Expires on",
        required=False,
        widget=forms.DateInput(attrs={"type": "date"}),
        help_text="The key stops working at the end of this day (UTC). Empty: never expires.",
    )
    connectors = forms.MultipleChoiceField(
        label="Connectors this key may run",
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="With the Connectors endpoint only; each must be of the key's project.",
    )

    def __init__(
        self,
        *args: Any,
        projects: list[tuple[str, str]],
        models: list[str],
        connectors: list[tuple[str, list[tuple[str, str]]]] | None = None,
        **kwargs: Any,
    ) -> None:
        """`connectors` are the choices of connectors, grouped by project name; none for those who may not
        give a key connectors (owners and admins may)."""
        super().__init__(*args, **kwargs)
        self.fields["project"].choices = projects  # type: ignore[attr-defined]
        self.fields["models"].choices = [(model, model) for model in models]  # type: ignore[attr-defined]
        self.fields["connectors"].choices = connectors or []  # type: ignore[attr-defined]

    def clean_expires_on(self) -> datetime | None:
        day = self.cleaned_data.get("expires_on")
        if day is None:
            return None
        moment = datetime.combine(day, time.max, tzinfo=UTC)
        if moment <= timezone.now():
            raise forms.ValidationError("Choose a day from today on.")
        return moment

    def chosen_scopes(self) -> list[str]:
        permissions = self.cleaned_data["permissions"]
        if permissions == "all":
            return list(ALL_SCOPES)
        if permissions == "read_only":
            return list(READ_ONLY_SCOPES)
        return list(self.cleaned_data.get("scopes") or [])

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if cleaned.get("permissions") == "restricted" and not cleaned.get("scopes"):
            self.add_error("scopes", "Choose at least one endpoint for a restricted key.")
        if cleaned.get("connectors") and "permissions" in cleaned and CONNECTORS not in self.chosen_scopes():
            self.add_error("connectors", "Choose the Connectors endpoint too, or no connectors.")
        return cleaned

    def budget_micros(self) -> int | None:
        budget = self.cleaned_data.get("monthly_budget")
        return None if budget is None else usd_to_micros(budget)


class AdminKeyCreateForm(forms.Form):
    name = forms.CharField(label="Name", max_length=100)
    expires_in_days = forms.IntegerField(
        label="Expires after (days)", required=False, min_value=1, max_value=365, help_text="Empty: never expires."
    )

    def expires_at(self) -> datetime | None:
        days = self.cleaned_data.get("expires_in_days")
        return None if days is None else timezone.now() + timedelta(days=days)


class RotateForm(forms.Form):
    grace = forms.ChoiceField(
        label="Keep the current secret working for",
        choices=GRACE_CHOICES,
        initial="86400",
        help_text="Deployed clients keep working with the old secret until then, so you can switch them over.",
    )

    def grace_period(self) -> timedelta:
        return timedelta(seconds=int(self.cleaned_data["grace"]))


class InviteForm(forms.Form):
    email = forms.EmailField(label="E-mail address")
    role = forms.ChoiceField(label="Role", choices=ROLE_CHOICES, initial=Role.MEMBER)


class RoleForm(forms.Form):
    role = forms.ChoiceField(label="Role", choices=ROLE_CHOICES)


class AuditFilterForm(forms.Form):
    action = forms.ChoiceField(label="Event", required=False)
    actor = forms.CharField(label="Actor", required=False, max_length=200)
    project = forms.ChoiceField(label="Project", required=False)
    since = forms.DateField(label="From", required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(label="To", required=False, widget=forms.DateInput(attrs={"type": "date"}))

    def __init__(self, *args: Any, actions: list[str], projects: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["action"].choices = [("", "All events"), *[(a, a) for a in actions]]  # type: ignore[attr-defined]
        self.fields["project"].choices = [("", "All projects"), *projects]  # type: ignore[attr-defined]


class ApiKeyFilterForm(forms.Form):
    q = forms.CharField(label="Search", required=False, max_length=100)
    project = forms.ChoiceField(label="Project", required=False)
    status = forms.ChoiceField(
        label="Status",
        required=False,
        choices=[("", "Any status"), ("active", "Active"), ("expired", "Expired"), ("revoked", "Revoked")],
    )
    permissions = forms.ChoiceField(
        label="Permissions",
        required=False,
        choices=[("", "Any permissions"), ("All", "All"), ("All + usage", "All + usage"), ("Restricted", "Restricted"),
                 ("Read only", "Read only")],
    )

    def __init__(self, *args: Any, projects: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["project"].choices = [("", "All projects"), *projects]  # type: ignore[attr-defined]


class UsageFilterForm(forms.Form):
    """The usage page's range and filters. Projects and keys are chosen by public id among the organization's
    own; anything else is not a choice, so the form is invalid and the page shows the defaults."""

    MAX_DAYS = 366

    start = forms.DateField(label="From", required=False, widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(label="To", required=False, widget=forms.DateInput(attrs={"type": "date"}))
    project = forms.ChoiceField(label="Project", required=False)
    api_key = forms.ChoiceField(label="API key", required=False)
    model = forms.ChoiceField(label="Model", required=False)
    breakdown = forms.ChoiceField(
        label="Break down by",
        required=False,
        choices=[("model", "Model"), ("key", "API key"), ("project", "Project"), ("endpoint", "Endpoint")],
    )

    def __init__(
        self,
        *args: Any,
        projects: list[tuple[int, str, str]],
        keys: list[tuple[int, str, str]],
        models: list[str],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.project_ids = {public_id: pk for pk, public_id, _ in projects}
        self.key_ids = {public_id: pk for pk, public_id, _ in keys}
        self.fields["project"].choices = [("", "All projects"), *[(p, n) for _, p, n in projects]]  # type: ignore[attr-defined]
        self.fields["api_key"].choices = [("", "All keys"), *[(p, f"{n} ({p})") for _, p, n in keys]]  # type: ignore[attr-defined]
        self.fields["model"].choices = [("", "All models"), *[(m, m) for m in models]]  # type: ignore[attr-defined]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if "start" not in data or "end" not in data:
            return data  # a date that did not parse already has its error
        for name in ("start", "end"):
            value = data[name]
            if value is not None and not date(2000, 1, 1) <= value <= date(9000, 12, 31):
                self.add_error(name, "Choose a date from 2000 to 9000.")
                return data
        # Left empty: up to today, from the first of the last day's month.
        end = data["end"] = data["end"] or timezone.now().date()
        start = data["start"] = data["start"] or end.replace(day=1)
        if start > end:
            self.add_error("start", "The range starts after it ends.")
        elif (end - start).days + 1 > self.MAX_DAYS:
            self.add_error("end", f"A range is at most {self.MAX_DAYS} days.")
        return data
