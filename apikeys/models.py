"""API keys. The raw secret is never stored: only the public id and an HMAC of the secret under the pepper."""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.db import models

from platform_site.models import Organization, Project


class ApiKey(models.Model):
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="api_keys")
    # A project key belongs to a project of its organization; an admin key (scope `admin`, which no other
    # scope may join) belongs to the organization alone and has no project.
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    # The public part of the key (`sk-kw-<public_id>-<secret>`): safe to show in lists and logs.
    public_id = models.CharField(max_length=16, unique=True)
    # HMAC-SHA256 of the secret under settings.KEYWAY_KEY_PEPPER, hex. The secret itself is shown once.
    secret_hash = models.CharField(max_length=64)
    # After a rotation the previous secret keeps working until previous_secret_expires_at.
    previous_secret_hash = models.CharField(max_length=64, blank=True, default="")
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True)
    scopes = models.JSONField(default=list)
    # Public model ids this key may use; empty means every model of the catalog.
    allowed_models = models.JSONField(default=list, blank=True)
    # Per-key rate limits; null uses the platform default (KEYWAY_DEFAULT_RPM / KEYWAY_DEFAULT_TPM).
    rpm_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Requests per minute.")
    tpm_limit = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Tokens (input + output) per minute."
    )
    # Spend cap per calendar month (UTC) in micro-USD; null means no cap of its own (the organization's holds).
    monthly_budget_micros = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Spend cap per calendar month (UTC), micro-USD."
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    rotated_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"
        indexes = [models.Index(fields=["organization", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.name} (sk-kw-{self.public_id}-…)"

    @property
    def masked(self) -> str:
        return f"sk-kw-{self.public_id}-…"

    @property
    def is_admin(self) -> bool:
        return self.project_id is None

    def status_at(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"
