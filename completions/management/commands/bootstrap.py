"""`make run`'s set-up step: default catalog, demo organization, and one API key printed once."""

from __future__ import annotations

import os
import secrets
from typing import Any

from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser

from apikeys.models import ApiKey
from apikeys.services import apikey_create
from billing.ledger import recover_orphans
from completions.services import catalog_ensure_default, provider_upsert_openai_compatible
from platform_site.models import Organization, Role
from platform_site.services import membership_set, organization_create

DEMO_EMAIL = "demo@keyway.localhost"

SNIPPET = """
  from openai import OpenAI

  client = OpenAI(base_url="{base_url}", api_key="{key}")
  reply = client.chat.completions.create(
      model="{model}",
      messages=[{{"role": "user", "content": "Say hello in three words."}}],
      max_tokens=24,
  )
  print(reply.choices[0].message.content)
"""


class Command(BaseCommand):
    help = "Create the default catalog and a demo organization; print an API key only if it has none yet."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")

    def handle(self, *args: Any, **options: Any) -> None:
        # Usage that a server stopped by a crash left in its journal goes into the ledger before `make run`
        # serves again (running servers also replay orphaned journals by themselves).
        replayed = recover_orphans()
        if replayed:
            self.stdout.write(f"Replayed {replayed} usage event(s) left in the journal by a stopped server.")
        model = catalog_ensure_default()
        upstream_url = os.environ.get("KEYWAY_UPSTREAM_BASE_URL", "")
        if upstream_url:
            provider_upsert_openai_compatible(
                name=os.environ.get("KEYWAY_UPSTREAM_NAME", "upstream"),
                base_url=upstream_url,
                api_key=os.environ.get("KEYWAY_UPSTREAM_API_KEY", ""),
                models=[m.strip() for m in os.environ.get("KEYWAY_UPSTREAM_MODELS", "").split(",") if m.strip()],
                tokenizer=os.environ.get("KEYWAY_UPSTREAM_TOKENIZER", ""),
            )
        organization = Organization.objects.filter(slug="demo").first()
        if organization is None:
            organization = organization_create(name="Demo", slug="demo", actor_label="bootstrap")
        self._demo_user(organization, options["base_url"])
        if ApiKey.objects.filter(organization=organization).exists():
            self.stdout.write("Demo organization ready; its API key was printed when it was created.")
            return
        _, raw_key = apikey_create(organization=organization, name="demo key", actor_label="bootstrap")
        model_id = model.public_id if model is not None else "your-model"
        self.stdout.write(self.style.SUCCESS("Your demo API key (shown once, store it now):"))
        self.stdout.write(f"\n  {raw_key}\n")
        self.stdout.write("Try it with the official OpenAI SDK (pip install openai):")
        self.stdout.write(SNIPPET.format(base_url=options["base_url"], key=raw_key, model=model_id))
        self.stdout.write(
            "The Responses and Conversations APIs too (README → Responses and Conversations):\n"
            f'  client.responses.create(model="{model_id}", input="Say hello", max_output_tokens=24).output_text\n'
            f'The same key opens a realtime session (pip install "openai[realtime]"):\n'
            f'  async with AsyncOpenAI(...).realtime.connect(model="{model_id}") as connection: ...\n'
            "  (README → Realtime)\n"
        )

    def _demo_user(self, organization: Organization, base_url: str) -> None:
        """The dashboard's demo owner, with a generated password printed this once (its e-mail is verified,
        so it signs in at once). A later run leaves it alone and prints nothing secret."""
        users = get_user_model()
        if users.objects.filter(email__iexact=DEMO_EMAIL).exists():
            self.stdout.write(f"Dashboard: sign in as {DEMO_EMAIL} (its password was printed when it was created).")
            return
        password = secrets.token_urlsafe(12)
        user = users.objects.create_user(username="demo", email=DEMO_EMAIL, password=password)
        EmailAddress.objects.create(user=user, email=DEMO_EMAIL, verified=True, primary=True)
        membership_set(organization=organization, user=user, role=Role.OWNER, actor_label="bootstrap")
        dashboard = base_url.removesuffix("/v1").rstrip("/") + "/"
        self.stdout.write(self.style.SUCCESS("Dashboard sign-in (the password is shown once, store it now):"))
        self.stdout.write(f"\n  {dashboard}accounts/login/\n  e-mail:   {DEMO_EMAIL}\n  password: {password}\n")
