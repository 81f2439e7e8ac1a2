from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apikeys import keyformat
from apikeys.models import ApiKey
from apikeys.services import apikey_revoke


class Command(BaseCommand):
    help = "Revoke an API key for good, by its public id or its full secret."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key", help="Public id (the part after sk-kw-) or the whole key.")

    def handle(self, *args: Any, **options: Any) -> None:
        given = options["key"].strip()
        parsed = keyformat.parse_key(given)
        public_id = parsed[0] if parsed else given.removeprefix(keyformat.PREFIX).split("-")[0]
        try:
            key = ApiKey.objects.select_related("organization").get(public_id=public_id)
        except ApiKey.DoesNotExist:
            raise CommandError(f"No API key with public id {public_id!r}.") from None
        apikey_revoke(key=key, actor_label="cli")
        self.stdout.write(f"revoked {key.masked}")
