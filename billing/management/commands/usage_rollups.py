from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Q

from billing.models import BillingAccount, UsageEvent
from billing.rollups import rollups_check, rollups_rebuild
from platform_site.models import Organization


class Command(BaseCommand):
    help = (
        "Check the usage roll-ups (what the usage pages and APIs read) against the usage ledger, organization by "
        "organization; with --rebuild, recompute them from the ledger. The ledger writer keeps them exact by "
        "itself; this is for audits, and for a ledger restored from a backup without them."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--rebuild", action="store_true", help="Recompute the roll-ups from the ledger.")
        parser.add_argument("--organization", help="Only this organization (its slug or public id).")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["organization"]:
            wanted = options["organization"]
            organization = Organization.objects.filter(Q(slug=wanted) | Q(public_id=wanted)).first()
            if organization is None:
                raise CommandError(f"No organization {wanted!r}.")
            ids = [organization.pk]
        else:
            # Every organization that has a ledger: each has a billing account, made by its first write.
            ids = list(BillingAccount.objects.order_by("pk").values_list("pk", flat=True))
        differing = 0
        for organization_id in ids:
            if options["rebuild"]:
                read = rollups_rebuild(organization_id=organization_id)
                self.stdout.write(f"organization {organization_id}: rebuilt from {read} ledger rows")
                continue
            differences = rollups_check(organization_id=organization_id)
            if differences:
                differing += 1
                self.stdout.write(f"organization {organization_id}: {len(differences)} roll-up rows differ")
                for difference in differences[:20]:
                    self.stdout.write(f"  {difference.table} {difference.group}: stored {difference.stored}, "
                                      f"ledger {difference.expected}")
        if not options["rebuild"]:
            rows = UsageEvent.objects.filter(organization_id__in=ids).count()
            self.stdout.write(f"checked {len(ids)} organizations ({rows} ledger rows): {differing} differ")
            if differing:
                raise CommandError("The roll-ups differ from the ledger; run with --rebuild to recompute them.")
