from __future__ import annotations

from django.apps import AppConfig


class DashboardConfig(AppConfig):
    """The web dashboard and the management API: surfaces for people and admin tools, over the services of
    every app below (tenancy, keys, billing, the catalog)."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "dashboard"
