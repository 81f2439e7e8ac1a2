from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from agents.sessions import sessions_purge


class Command(BaseCommand):
    help = "Delete chat sessions idle longer than KEYWAY_SESSIONS_RETENTION_DAYS (run it daily, e.g. from cron)."

    def handle(self, *args: Any, **options: Any) -> None:
        deleted = sessions_purge()
        days = settings.KEYWAY_SESSIONS_RETENTION_DAYS
        self.stdout.write(f"Deleted {deleted} sessions idle for more than {days} days.")
