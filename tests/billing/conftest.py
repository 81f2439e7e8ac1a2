"""Fixtures of the billing tests that run against this machine's Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

REDIS_URL = "redis://127.0.0.1:6379/14"


@pytest.fixture
async def own_redis(settings: Any) -> AsyncIterator[Any]:
    """Billing on this machine's Redis, under a key prefix of the test's own (deleted afterwards); yields a
    client of that Redis. Skips where there is no Redis."""
    import redis.asyncio

    probe = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        await probe.ping()
    except Exception:  # noqa: BLE001
        pytest.skip("no Redis on 127.0.0.1:6379")
    settings.REDIS_URL = REDIS_URL
    settings.KEYWAY_CACHE_PREFIX = f"test-{uuid.uuid4().hex[:8]}"
    yield probe
    for name in [name async for name in probe.scan_iter(f"{settings.KEYWAY_CACHE_PREFIX}:*")]:
        await probe.delete(name)
    await probe.aclose()
