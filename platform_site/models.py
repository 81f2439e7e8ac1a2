"""Tenancy: organizations, their projects, who belongs to them, who is invited, and what was done in them.

Every tenant object has a random public id in OpenAI's style (`org-…`, `proj_…`, `user-…`, `invite-…`): the
management API and the dashboard's URLs use it, never the database key, so ids reveal nothing about how many
tenants, users or projects the platform has.
"""

from __future__ import annotations

import secrets
import string
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q

_ID_ALPHABET = string.ascii_lowercase + string.digits


def _random_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def new_organization_id() -> str:
    return _random_id("org-")


def new_project_id() -> str:
    return _random_id("proj_")


def new_user_id() -> str:
    return _random_id("user-")


def new_invite_id() -> str:
    return _random_id("invite-")


class Organization(models.Model):
    public_id = models.CharField(max_length=40, unique=True, default=new_organization_id)
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    # When set, the platform chooses the model for every chat request of this organization and the request's
    # `model` field is ignored (seed 000). Stores a public model id of the catalog.
    pinned_model = models.CharField(max_length=128, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Role(models.TextChoices):
    """An organization role. Owners and admins manage everything but owners; members manage the keys they
    created; readers see."""

    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    MEMBER = "member", "Member"
    READER = "reader", "Reader"


class Membership(models.Model):
    Role = Role

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [models.UniqueConstraint(fields=["organization", "user"], name="one_membership_per_user")]

    def __str__(self) -> str:
        return f"{self.user} in {self.organization} ({self.role})"


class Profile(models.Model):
    """What Keyway adds to a Django user: the public id the management API names them by."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="keyway_profile")
    public_id = models.CharField(max_length=40, unique=True, default=new_user_id)

    def __str__(self) -> str:
        return self.public_id


class Project(models.Model):
    """A project of an organization. API keys, their limits and budgets belong to a project; every
    organization has exactly one default project, which cannot be archived."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="projects")
    public_id = models.CharField(max_length=40, unique=True, default=new_project_id)
    name = models.CharField(max_length=100)
    is_default = models.BooleanField(default=False)
    # Spend cap per calendar month (UTC) over all of the project's keys, in micro-USD; null: no cap of its own
    # (the organization's and each key's still apply). Per-model rate limits are billing.ProjectRateLimit.
    monthly_budget_micros = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Spend cap per calendar month (UTC), micro-USD."
    )
    archived_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-is_default", "name", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization"], condition=Q(is_default=True), name="one_default_project_per_organization"
            )
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def status(self) -> str:
        return "archived" if self.archived_at is not None else "active"

    @property
    def monthly_budget_usd(self) -> Decimal | None:
        return None if self.monthly_budget_micros is None else Decimal(self.monthly_budget_micros) / 1_000_000


class Invitation(models.Model):
    """An invitation to join an organization, sent by e-mail as a link. The link's token is shown once (in
    the e-mail) and only its SHA-256 is kept, so a database reader cannot accept an invitation."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="invitations")
    public_id = models.CharField(max_length=40, unique=True, default=new_invite_id)
    email = models.EmailField()
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.email} to {self.organization}"

    def status_at(self, now: object) -> str:
        if self.accepted_at is not None:
            return "accepted"
        return "expired" if self.expires_at <= now else "pending"  # type: ignore[operator]


class AuditLog(models.Model):
    """An append-only record of a state change. Never holds a secret.

    `action` uses OpenAI's audit event types where one exists (`api_key.created`, `project.archived`, …), so
    the management API can serve the rows as OpenAI's audit log objects; Keyway's own events (credits,
    plans) have names of their own and appear on the dashboard's audit page only.
    """

    # PROTECT: the audit trail outlives nothing it records by accident of a cascade.
    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="audit_log")
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    # Who acted when there is no user: "cli", "admin", "system", or the admin key's masked form.
    actor_label = models.CharField(max_length=64, blank=True, default="")
    # The public id of the API key that acted (management API calls made with an admin key).
    actor_api_key = models.CharField(max_length=16, blank=True, default="")
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    action = models.CharField(max_length=64)
    target = models.CharField(max_length=200, blank=True, default="")
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["organization", "-created_at"]),
            models.Index(fields=["organization", "action"]),
        ]

    def __str__(self) -> str:
        return f"{self.action} {self.target}"
