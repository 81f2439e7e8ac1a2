from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest

from completions.engine.catalog import catalog_invalidate
from completions.models import Deployment, Model, Provider


class ProviderForm(forms.ModelForm):
    base_url = forms.URLField(required=False, max_length=500, assume_scheme="https")
    # Write-only: the stored key is encrypted and never rendered back into the page.
    api_key = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="Leave empty to keep the current key. Stored encrypted.",
    )
    clear_api_key = forms.BooleanField(required=False, help_text="Remove the stored key.")

    class Meta:
        model = Provider
        fields = ["name", "kind", "base_url", "extra_headers", "timeout_seconds", "enabled"]

    def save(self, commit: bool = True) -> Any:
        provider = super().save(commit=False)
        if self.cleaned_data.get("clear_api_key"):
            provider.set_api_key("")
        elif self.cleaned_data.get("api_key"):
            provider.set_api_key(self.cleaned_data["api_key"])
        if commit:
            provider.save()
        return provider


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    form = ProviderForm
    list_display = ["name", "kind", "base_url", "has_api_key", "enabled"]

    @admin.display(boolean=True, description="API key set")
    def has_api_key(self, obj: Provider) -> bool:
        return bool(obj.api_key_encrypted)

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
