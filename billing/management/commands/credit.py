from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing.exceptions import BillingError
from billing.models import CreditEntry
from billing.money import micros_to_usd, usd_to_micros
from billing.services import billing_account_for, credit_add
from platform_site.models import Organization


class Command(BaseCommand):
    help = (
        "Add prepaid credit to an organization (a top-up), or with --adjustment add or take away credit "
        "(a negative amount). Prints the new credit total and balance."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("organization", help="Organization slug.")
        # A string, not a float: the amount is converted to micro-USD exactly, through Decimal.
        parser.add_argument("amount", help="Amount in USD, e.g. 25 or 0.50 (negative with --adjustment).")
        parser.add_argument("--reason", required=True, help="Why; kept in the credit ledger and the audit log.")
        parser.add_argument(
            "--adjustment", action="store_true", help="Record an adjustment instead of a top-up (may be negative)."
        )
        parser.add_argument("--user", help="Username of the staff member acting (default: recorded as 'cli').")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            organization = Organization.objects.get(slug=options["organization"])
        except Organization.DoesNotExist:
            raise CommandError(f"No organization with slug {options['organization']!r}.") from None
        try:
            amount_micros = usd_to_micros(options["amount"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        actor = None
        if options["user"]:
            try:
                actor = get_user_model().objects.get(username=options["user"])
            except get_user_model().DoesNotExist:
                raise CommandError(f"No user named {options['user']!r}.") from None
            # The ledger says which staff member changed the credit; a customer's account cannot be named.
            if not actor.is_staff:
                raise CommandError(f"{actor.get_username()!r} is not a staff user.")
        kind = CreditEntry.Kind.ADJUSTMENT if options["adjustment"] else CreditEntry.Kind.TOPUP
        try:
            entry = credit_add(
                organization=organization,
                amount_micros=amount_micros,
                reason=options["reason"],
                kind=kind,
                actor=actor,
                actor_label="" if actor is not None else "cli",
            )
        except BillingError as exc:
            raise CommandError(exc.message) from None
        account = billing_account_for(organization_id=organization.pk)
        self.stdout.write(
            f"{entry.get_kind_display()} of {micros_to_usd(entry.amount_micros)} USD for {organization.slug}. "
            f"Credit total: {micros_to_usd(account.credit_total_micros)} USD; "
            f"balance: {micros_to_usd(account.balance_micros)} USD."
        )
