from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from conversations.services import responses_purge


class Command(BaseCommand):
    help = "Delete stored responses older than KEYWAY_RESPONSES_RETENTION_DAYS (run it daily, e.g. from cron)."

    def handle(self, *args: Any, **options: Any) -> None:
        deleted = responses_purge()
        self.stdout.write(f"Deleted {deleted} stored responses older than "
                          f"{settings.KEYWAY_RESPONSES_RETENTION_DAYS} days.")
