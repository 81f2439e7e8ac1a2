"""`make run`'s set-up step: default catalog, demo organization, and one API key printed once."""

from __future__ import annotations

import os
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from apikeys.models import ApiKey
from apikeys.services import apikey_create
from billing.ledger import recover_orphans
from completions.services import catalog_ensure_default, provider_upsert_openai_compatible
from platform_site.models import Organization
from platform_site.services import organization_create

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
        if ApiKey.objects.filter(organization=organization).exists():
            self.stdout.write("Demo organization ready; its API key was printed when it was created.")
            return
        _, raw_key = apikey_create(organization=organization, name="demo key", actor_label="bootstrap")
        model_id = model.public_id if model is not None else "your-model"
        self.stdout.write(self.style.SUCCESS("Your demo API key (shown once, store it now):"))
        self.stdout.write(f"\n  {raw_key}\n")
        self.stdout.write("Try it with the official OpenAI SDK (pip install openai):")
        self.stdout.write(SNIPPET.format(base_url=options["base_url"], key=raw_key, model=model_id))
