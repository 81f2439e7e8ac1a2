from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from platform_site.services import organization_create


class Command(BaseCommand):
    help = "Create an organization, optionally with an existing user as its owner."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--slug", default="")
        parser.add_argument("--owner", help="Username of the owner.")

    def handle(self, *args: Any, **options: Any) -> None:
        owner = None
        if options["owner"]:
            try:
                owner = get_user_model().objects.get(username=options["owner"])
            except get_user_model().DoesNotExist:
                raise CommandError(f"No user named {options['owner']!r}.") from None
        organization = organization_create(
            name=options["name"], slug=options["slug"], owner=owner, actor_label="cli"
        )
        self.stdout.write(organization.slug)
