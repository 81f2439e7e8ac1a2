from __future__ import annotations

import asyncio
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from billing import connections
from billing.reconcile import Report, reconcile


class Command(BaseCommand):
    help = (
        "Check the shared billing counters in Redis (spend, monthly caps, credit, open holds) against the usage "
        "ledger, and correct the ones that drifted. Running servers do this by themselves every "
        "KEYWAY_RECONCILE_INTERVAL seconds."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="Report the drift without correcting it.")
        parser.add_argument("--quiet-seconds", type=float, default=None,
                            help="How long a counter must stay still to be checked (default: from the ledger's "
                                 "flush interval, at least 1 s).")

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.REDIS_URL:
            self.stdout.write("No REDIS_URL: the counters live in the server's one process, seeded from the "
                              "ledger; there is nothing to reconcile.")
            return
        report = asyncio.run(self._run(dry_run=options["dry_run"], quiet_seconds=options["quiet_seconds"]))
        for name, was, now in report.corrected:
            verb = "would correct" if options["dry_run"] else "corrected"
            self.stdout.write(f"{verb} {name}: {was} -> {now} (drift {was - now:+d})")
        for name, why in report.busy_counters:
            self.stdout.write(f"busy {name}: {why}")
        self.stdout.write(report.line())

    async def _run(self, *, dry_run: bool, quiet_seconds: float | None) -> Report:
        client = connections.async_client(timeout=10, pool_size=4, blocking=False)
        try:
            return await reconcile(client, dry_run=dry_run, quiet_seconds=quiet_seconds)
        finally:
            await client.aclose()
