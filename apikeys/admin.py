"""Admin for API keys. Lists show the public id only; creating or rotating a key shows its secret once, on a
page rendered straight from the action (never through the session-backed messages framework)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from apikeys.exceptions import InvalidKeySettings
from apikeys.models import ApiKey
from apikeys.scopes import ADMIN, ALL_SCOPES, SCOPE_CHOICES
from apikeys.services import apikey_create, apikey_revoke, apikey_rotate, apikey_settings_clean, apikey_update


class ApiKeyForm(forms.ModelForm):
    scopes = forms.MultipleChoiceField(
        choices=SCOPE_CHOICES, widget=forms.CheckboxSelectMultiple, initial=list(ALL_SCOPES)
    )
    allowed_models = forms.CharField(
        required=False, help_text="Comma-separated public model ids; empty allows every model."
    )

    class Meta:
        model = ApiKey
        fields = ["organization", "name", "scopes", "allowed_models", "rpm_limit", "tpm_limit", "monthly_budget_micros",
                  "expires_at"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.initial["allowed_models"] = ", ".join(self.instance.allowed_models)

    def clean_allowed_models(self) -> list[str]:
        raw = self.cleaned_data.get("allowed_models") or ""
        return sorted({item.strip() for item in raw.split(",") if item.strip()})

    def key_settings(self) -> dict[str, Any]:
        """The settings the services take, from the cleaned form."""
        data = self.cleaned_data
        return {
            "name": data.get("name") or "", "scopes": data.get("scopes") or [],
            "allowed_models": data.get("allowed_models") or [], "rpm_limit": data.get("rpm_limit"),
            "tpm_limit": data.get("tpm_limit"), "monthly_budget_micros": data.get("monthly_budget_micros"),
        }

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        try:
            checked = apikey_settings_clean(**self.key_settings())
            if self.instance.pk and (checked["scopes"] == [ADMIN]) != (self.instance.scopes == [ADMIN]):
                raise InvalidKeySettings("An admin key stays an admin key, and a project key a project key.",
                                         param="scopes")
        except InvalidKeySettings as error:
            raise forms.ValidationError(error.message) from None
        return cleaned


def _show_secret_once(request: HttpRequest, key: ApiKey, raw_key: str, action: str) -> HttpResponse:
    context = {
        **admin.site.each_context(request),
        "title": f"API key {action}",
        "key": key,
        "raw_key": raw_key,
        "action": action,
    }
    response = TemplateResponse(request, "admin/apikeys/secret_once.html", context)
    response["Cache-Control"] = "no-store"
    return response


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    list_display = ["masked", "name", "organization", "scopes", "created_at", "last_used_at", "expires_at",
                    "revoked_at"]
    list_filter = ["organization"]
    search_fields = ["name", "public_id"]
    readonly_fields = ["public_id", "created_by", "created_at", "last_used_at", "rotated_at", "revoked_at",
                       "previous_secret_expires_at"]
    actions = ["rotate_keys", "revoke_keys"]

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> tuple[str, ...]:
        editable = ("organization", "name", "scopes", "allowed_models", "rpm_limit", "tpm_limit",
                    "monthly_budget_micros", "expires_at")
        # A key never moves to another organization: its ledger, limits and audit trail belong to the one
        # that created it.
        return editable if obj is None else editable[1:] + ("organization", *self.readonly_fields)

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[str]:
        return list(self.readonly_fields) if obj is None else ["organization", *self.readonly_fields]

    def save_model(self, request: HttpRequest, obj: ApiKey, form: forms.ModelForm, change: bool) -> None:
        assert isinstance(form, ApiKeyForm)
        settings = {**form.key_settings(), "expires_at": form.cleaned_data.get("expires_at")}
        staff = request.user if isinstance(request.user, User) else None
        if change:
            # Through the service: checked, audited, and invalidated on commit (not before it, when another
            # worker could cache the old row again).
            apikey_update(key=obj, actor=staff, **settings)
            return
        key, raw_key = apikey_create(organization=form.cleaned_data["organization"], created_by=staff, **settings)
        obj.pk = key.pk
        request._keyway_new_key = (key, raw_key)  # type: ignore[attr-defined]

    def response_add(self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None) -> HttpResponse:
        key, raw_key = request._keyway_new_key  # type: ignore[attr-defined]
        return _show_secret_once(request, key, raw_key, "created")

    @admin.action(description="Rotate selected keys (new secret; the old one works for the grace period)")
    def rotate_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> HttpResponse | None:
        if queryset.count() != 1:
            self.message_user(request, "Rotate one key at a time: its new secret is shown once.", messages.ERROR)
            return None
        key, raw_key = apikey_rotate(key=queryset.get(), actor=request.user)  # type: ignore[arg-type]
        return _show_secret_once(request, key, raw_key, "rotated")

    @admin.action(description="Revoke selected keys (final)")
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for key in queryset:
            apikey_revoke(key=key, actor=request.user)  # type: ignore[arg-type]
        self.message_user(request, f"Revoked {queryset.count()} key(s).", messages.SUCCESS)
