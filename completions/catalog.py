"""The model catalog as the hot path sees it: an in-process snapshot of enabled models and their providers.

The snapshot is rebuilt from the database at most every KEYWAY_CATALOG_LOCAL_TTL seconds, in the background
(stale-while-revalidate), so no request waits on the ORM except the very first one of a process.
`catalog_invalidate()` forces the next request of this process to rebuild it at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings

from completions.models import Model
from completions.providers.base import ChatProvider, ProviderConfig
from completions.providers.registry import provider_for
from platform_site.db import returns_connection


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    public_id: str
    upstream_model: str
    capabilities: frozenset[str]
    context_length: int
    created: int
    owned_by: str
    provider_config: ProviderConfig

    @property
    def provider(self) -> ChatProvider:
        return provider_for(self.provider_config)

    def as_openai(self) -> dict[str, object]:
        return {"id": self.public_id, "object": "model", "created": self.created, "owned_by": self.owned_by}


@dataclass(frozen=True, slots=True)
class Catalog:
    entries: dict[str, CatalogEntry]
    loaded_at: float


@returns_connection
def _build() -> Catalog:
    entries: dict[str, CatalogEntry] = {}
    for model in Model.objects.filter(enabled=True, provider__enabled=True).select_related("provider"):
        provider = model.provider
        entries[model.public_id] = CatalogEntry(
            public_id=model.public_id,
            upstream_model=model.upstream_model,
            capabilities=frozenset(model.capabilities),
            context_length=model.context_length,
            created=model.created,
            owned_by=model.owned_by,
            provider_config=ProviderConfig(
                name=provider.name,
                kind=provider.kind,
                base_url=provider.base_url,
                api_key=provider.api_key,
                extra_headers=tuple(sorted((str(k), str(v)) for k, v in provider.extra_headers.items())),
                timeout=provider.timeout_seconds,
            ),
        )
    return Catalog(entries=entries, loaded_at=time.monotonic())


_current: Catalog | None = None
_refreshing: asyncio.Task[None] | None = None


async def _refresh() -> None:
    global _current
    _current = await sync_to_async(_build, thread_sensitive=True)()


async def catalog() -> Catalog:
    global _refreshing
    current = _current
    if current is None:
        await _refresh()
        assert _current is not None
        return _current
    if time.monotonic() - current.loaded_at >= settings.KEYWAY_CATALOG_LOCAL_TTL and (
        _refreshing is None or _refreshing.done()
    ):
        _refreshing = asyncio.get_running_loop().create_task(_refresh())
    return current


def catalog_invalidate() -> None:
    global _current
    _current = None
