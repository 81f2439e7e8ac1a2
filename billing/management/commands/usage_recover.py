from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from billing.ledger import drain_stream, recover_orphans


class Command(BaseCommand):
    help = (
        "Write the usage journals of worker processes that died into the usage ledger, and, with Redis, every "
        "event waiting in the shared usage stream, those that lost workers had read included (idempotent: "
        "events already written are skipped). Running servers do this by themselves."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        replayed = recover_orphans()
        line = f"{replayed} usage event(s) replayed from orphaned journals"
        if settings.REDIS_URL:
            # Everything, even what a live worker is writing right now: the writer is idempotent on the call id.
            line += f"; {drain_stream(claim_idle=0)} written from the usage stream"
        self.stdout.write(line + ".")
