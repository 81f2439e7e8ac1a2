"""Django's Redis cache backend with one long-lived client per server, shared by the whole process.

Two costs of the stock backend land on every API request: it builds a new `redis.Redis` client for each
operation, and — because `django.core.cache.caches` is context-local under ASGI — each request's context
gets a fresh backend with fresh connection pools, so every request opened new TCP connections to Redis
(measured with bench/: ~4 ms of CPU per request with rate limits on). Here clients live in a module-level
registry keyed by server, so every backend instance of the process shares them (redis-py clients are
thread-safe over their pool).

Redis going away must not take the API down with it (README, "When a backing service fails"): every operation
goes through the Redis circuit breaker (platform_site.kernel.breaker). While Redis is unreachable, reads miss
and writes do nothing, at once: the key cache then reads the database, and /health reports the cache down.
The socket timeouts (KEYWAY_REDIS_TIMEOUT) bound what the first failing call waits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from django.core.cache.backends.redis import RedisCache, RedisCacheClient

from platform_site.kernel import breaker

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


def _guarded(name: str, unreachable: Callable[..., Any]) -> Callable[..., Any]:
    """The client's operation `name`, through the breaker; `unreachable(*args)` answers while Redis is down."""
    operation = getattr(RedisCacheClient, name)

    def guarded(self: RedisCacheClient, *args: Any, **kwargs: Any) -> Any:
        if not breaker.redis.allows():
            return unreachable(*args)
        try:
            result = operation(self, *args, **kwargs)
        except breaker.connection_errors() as error:
            breaker.redis.failed(error)
            return unreachable(*args)
        breaker.redis.succeeded()
        return result

    guarded.__name__ = name
    return guarded


def _missing_counter(key: Any, *args: Any) -> Any:
    raise ValueError(f"Key {key!r} not found (the cache is unreachable)")


# What each operation answers while Redis is unreachable: a miss, or a write that did not happen.
_UNREACHABLE: dict[str, Callable[..., Any]] = {
    "get": lambda key, default=None: default,
    "get_many": lambda keys: {},
    "has_key": lambda key: False,
    "set": lambda *args: None,
    "set_many": lambda data, *args: list(data),
    "add": lambda *args: False,
    "touch": lambda *args: False,
    "delete": lambda *args: False,
    "delete_many": lambda *args: None,
    "incr": _missing_counter,
    "clear": lambda: False,
}
for _name, _unreachable in _UNREACHABLE.items():
    setattr(_SharedClientRedisCacheClient, _name, _guarded(_name, _unreachable))


class SharedClientRedisCache(RedisCache):
    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._class = _SharedClientRedisCacheClient
