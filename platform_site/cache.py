"""Django's Redis cache backend with one long-lived client per server, shared by the whole process.

Two costs of the stock backend land on every API request: it builds a new `redis.Redis` client for each
operation, and — because `django.core.cache.caches` is context-local under ASGI — each request's context
gets a fresh backend with fresh connection pools, so every request opened new TCP connections to Redis
(measured with bench/: ~4 ms of CPU per request with rate limits on). Here clients live in a module-level
registry keyed by server, so every backend instance of the process shares them (redis-py clients are
thread-safe over their pool).
"""

from __future__ import annotations

import threading
from typing import Any

from django.core.cache.backends.redis import RedisCache, RedisCacheClient

_clients: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()


class _SharedClientRedisCacheClient(RedisCacheClient):
    def get_client(self, key: Any = None, *, write: bool = False) -> Any:
        index = self._get_connection_pool_index(write)  # type: ignore[attr-defined]
        registry_key = (self._servers[index], repr(sorted(self._pool_options.items())))  # type: ignore[attr-defined]
        client = _clients.get(registry_key)
        if client is None:
            with _lock:
                client = _clients.get(registry_key)
                if client is None:
                    client = self._client(connection_pool=self._get_connection_pool(write))  # type: ignore[attr-defined]
                    _clients[registry_key] = client
        return client


class SharedClientRedisCache(RedisCache):
    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._class = _SharedClientRedisCacheClient
