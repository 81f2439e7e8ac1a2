from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from billing.ledger import recover_orphans


class Command(BaseCommand):
    help = (
        "Write the usage journals of worker processes that died into the usage ledger (idempotent: events "
        "already written are skipped). Running servers do this by themselves every minute."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        replayed = recover_orphans()
        self.stdout.write(f"{replayed} usage event(s) replayed from orphaned journals.")
