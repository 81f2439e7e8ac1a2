from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest

from completions.engine.catalog import catalog_invalidate
from completions.models import Deployment, Model, Provider
from completions.providers.upstream_http import check_header


class ProviderForm(forms.ModelForm):
    base_url = forms.URLField(required=False, max_length=500, assume_scheme="https")
    # Write-only: the stored key is encrypted and never rendered back into the page.
    api_key = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="Leave empty to keep the current key. Stored encrypted.",
    )
    clear_api_key = forms.BooleanField(required=False, help_text="Remove the stored key.")
    # Write-only as well: headers often carry credentials, so they are stored encrypted and only their names
    # are ever shown.
    extra_headers = forms.JSONField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text='Headers sent with every call, as {"Name": "value"}. Leave empty to keep the current ones.',
    )
    clear_extra_headers = forms.BooleanField(required=False, help_text="Remove the stored headers.")

    class Meta:
        model = Provider
        fields = ["name", "kind", "base_url", "timeout_seconds", "enabled"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        names = sorted(self.instance.extra_headers) if self.instance.pk else []
        if names:
            self.fields["extra_headers"].help_text += f" Stored now: {', '.join(names)}."
        self.initial["extra_headers"] = None

    def clean_extra_headers(self) -> dict[str, str] | None:
        headers = self.cleaned_data.get("extra_headers")
        if headers in (None, "", {}):
            return None
        if not isinstance(headers, dict) or not all(
            isinstance(name, str) and isinstance(value, str) for name, value in headers.items()
        ):
            raise forms.ValidationError('Give an object of header names and string values, e.g. {"X-Org": "42"}.')
        for name, value in headers.items():
            try:
                check_header(name, value)
            except ValueError as error:
                raise forms.ValidationError(f"This header cannot be sent: {error}.") from None
        return headers

    def save(self, commit: bool = True) -> Any:
        provider = super().save(commit=False)
        if self.cleaned_data.get("clear_api_key"):
            provider.set_api_key("")
        elif self.cleaned_data.get("api_key"):
            provider.set_api_key(self.cleaned_data["api_key"])
        if self.cleaned_data.get("clear_extra_headers"):
            provider.set_extra_headers({})
        elif self.cleaned_data.get("extra_headers"):
            provider.set_extra_headers(self.cleaned_data["extra_headers"])
        if commit:
            provider.save()
        return provider


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    form = ProviderForm
    list_display = ["name", "kind", "base_url", "has_api_key", "header_names", "enabled"]

    @admin.display(boolean=True, description="API key set")
    def has_api_key(self, obj: Provider) -> bool:
        return bool(obj.api_key_encrypted)

    @admin.display(description="Extra headers")
    def header_names(self, obj: Provider) -> str:
        return ", ".join(sorted(obj.extra_headers))

    def save_model(self, request: HttpRequest, obj: Provider, form: forms.ModelForm, change: bool) -> None:
        super().save_model(request, obj, form, change)
        catalog_invalidate()


class DeploymentInline(admin.TabularInline):
    model = Deployment
    extra = 0


@admin.register(Model)
class ModelAdmin(admin.ModelAdmin):
    list_display = ["public_id", "deployment_list", "context_length", "tokenizer", "enabled"]
    list_filter = ["enabled"]
    search_fields = ["public_id", "deployments__upstream_model"]
    inlines = [DeploymentInline]

    @admin.display(description="Deployments")
    def deployment_list(self, obj: Model) -> str:
        return ", ".join(f"{d.provider.name}:{d.upstream_model}" for d in obj.deployments.all())

    def get_queryset(self, request: HttpRequest) -> Any:
        return super().get_queryset(request).prefetch_related("deployments__provider")

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        catalog_invalidate()
