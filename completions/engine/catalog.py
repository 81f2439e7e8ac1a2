"""The model catalog as the hot path sees it: an in-process snapshot of enabled models and their providers.

The snapshot is rebuilt from the database at most every KEYWAY_CATALOG_LOCAL_TTL seconds, in the background
(stale-while-revalidate), so no request waits on the ORM except the very first one of a process.
`catalog_invalidate()` forces the next request of this process to rebuild it at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.db.models import Prefetch

from completions.models import Deployment, Model, Provider
from completions.providers.base import ChatProvider, ProviderConfig
from completions.providers.registry import provider_for
from platform_site.kernel.conf import settings  # Django's, read faster (the module says why)
from platform_site.kernel.singleflight import SingleFlight


@dataclass(frozen=True, slots=True)
class DeploymentEntry:
    id: int
    upstream_model: str
    weight: int
    priority: int
    timeout: float | None
    provider_config: ProviderConfig
    # Request fields beyond the endpoint's allow-list that the operator lets through to this deployment.
    extra_fields: frozenset[str] = frozenset()

    @property
    def provider(self) -> ChatProvider:
        return provider_for(self.provider_config)

    @property
    def provider_name(self) -> str:
        return self.provider_config.name


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    public_id: str
    capabilities: frozenset[str]
    context_length: int
    created: int
    owned_by: str
    deployments: tuple[DeploymentEntry, ...]
    # How to count tokens an upstream did not report (completions/tokenizers.py); "" when there is no way.
    tokenizer: str = ""

    def as_openai(self) -> dict[str, object]:
        return {"id": self.public_id, "object": "model", "created": self.created, "owned_by": self.owned_by}


@dataclass(frozen=True, slots=True)
class Catalog:
    entries: dict[str, CatalogEntry]
    loaded_at: float


def _provider_config(provider: Provider) -> ProviderConfig:
    return ProviderConfig(
        name=provider.name,
        kind=provider.kind,
        base_url=provider.base_url,
        api_key=provider.api_key,
        extra_headers=tuple(sorted((str(k), str(v)) for k, v in provider.extra_headers.items())),
        timeout=provider.timeout_seconds,
    )


def _build() -> Catalog:
    configs: dict[int, ProviderConfig] = {}
    entries: dict[str, CatalogEntry] = {}
    deployments = Prefetch(
        "deployments",
        queryset=Deployment.objects.filter(enabled=True, provider__enabled=True).select_related("provider"),
    )
    for model in Model.objects.filter(enabled=True).prefetch_related(deployments):
        routes = []
        for deployment in model.deployments.all():
            config = configs.get(deployment.provider_id)
            if config is None:
                config = configs[deployment.provider_id] = _provider_config(deployment.provider)
            routes.append(
                DeploymentEntry(
                    id=deployment.id,
                    upstream_model=deployment.upstream_model,
                    weight=deployment.weight,
                    priority=deployment.priority,
                    timeout=deployment.timeout_seconds,
                    provider_config=config,
                    extra_fields=frozenset(deployment.extra_fields),
                )
            )
        if not routes:
            continue  # A model with nothing enabled to serve it is not offered.
        entries[model.public_id] = CatalogEntry(
            public_id=model.public_id,
            capabilities=frozenset(model.capabilities),
            context_length=model.context_length,
            created=model.created,
            owned_by=model.owned_by,
            deployments=tuple(routes),
            tokenizer=model.tokenizer,
        )
    return Catalog(entries=entries, loaded_at=time.monotonic())


def _load(_: None) -> Catalog:
    return _build()


def _ttl() -> float:
    return float(settings.KEYWAY_CATALOG_LOCAL_TTL)


_snapshot: SingleFlight[None, Catalog] = SingleFlight(_load, ttl=_ttl, stale_while_revalidate=True)


async def catalog() -> Catalog:
    """The current snapshot. One rebuild at a time per process: a cold start under load waits on a single
    query, and a stale snapshot keeps serving while its replacement is built."""
    return await _snapshot.get(None)


def catalog_invalidate() -> None:
    """Make this process's next request rebuild the snapshot (on commit of a catalog change)."""
    _snapshot.invalidate()
