from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from apikeys.exceptions import ApiKeyError
from apikeys.scopes import ALL_SCOPES
from apikeys.services import apikey_create
from platform_site.models import Organization


class Command(BaseCommand):
    help = "Create an API key and print its secret. The secret is printed this once and never again."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("organization", help="Organization slug.")
        parser.add_argument("--name", default="cli key")
        parser.add_argument("--scopes", default=",".join(ALL_SCOPES), help="Comma-separated scopes.")
        parser.add_argument("--models", default="", help="Comma-separated allowed models (empty: all).")
        parser.add_argument("--expires-in-days", type=int, default=None)
        parser.add_argument("--rpm", type=int, default=None, help="Requests per minute (default: the platform's).")
        parser.add_argument("--tpm", type=int, default=None, help="Tokens per minute (default: the platform's).")
        parser.add_argument(
            "--monthly-budget", type=Decimal, default=None, help="Spend cap per calendar month in USD (default: none)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            organization = Organization.objects.get(slug=options["organization"])
        except Organization.DoesNotExist:
            raise CommandError(f"No organization with slug {options['organization']!r}.") from None
        expires_at = None
        if options["expires_in_days"] is not None:
            expires_at = timezone.now() + timedelta(days=options["expires_in_days"])
        try:
            _, raw_key = apikey_create(
                organization=organization,
                name=options["name"],
                scopes=[s.strip() for s in options["scopes"].split(",") if s.strip()],
                allowed_models=[m.strip() for m in options["models"].split(",") if m.strip()],
                expires_at=expires_at,
                rpm_limit=options["rpm"],
                tpm_limit=options["tpm"],
                monthly_budget_micros=(
                    None if options["monthly_budget"] is None else int(options["monthly_budget"] * 1_000_000)
                ),
                actor_label="cli",
            )
        except ApiKeyError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(raw_key)
