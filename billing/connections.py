"""Billing's Redis clients: one Redis, or a Redis Cluster.

Billing's keys (the counters, leases and heartbeats, the usage streams: billing.keys) can live on a Redis of
their own, `KEYWAY_BILLING_REDIS_URL`, and that one may be a Redis Cluster (`KEYWAY_BILLING_REDIS_CLUSTER=1`,
the URL naming any of its nodes): every key billing touches carries a shard's hash tag, so every script and
transaction stays in one slot, and KEYWAY_REDIS_SHARDS spreads organizations over the slots (a multiple of the
number of primaries). The cache, the channel layer and the realtime sessions stay on `REDIS_URL`: their
clients do not speak the cluster protocol. Without `KEYWAY_BILLING_REDIS_URL`, billing uses `REDIS_URL`; with
no `REDIS_URL` at all, billing keeps its counters in the process (the embedded default).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings


def url() -> str:
    return settings.KEYWAY_BILLING_REDIS_URL or settings.REDIS_URL


def async_client(*, timeout: float, pool_size: int, blocking: bool = True) -> Any:
    """A redis.asyncio client for this event loop. No retries: a call that timed out may still have run, and
    only the caller knows whether running it twice is safe (billing.counters). On one Redis, a blocking pool
    (a burst waits for a connection instead of failing), with a PING before using a connection idle for a
    while; on a cluster, a pool of that size for each node."""
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    if settings.KEYWAY_BILLING_REDIS_CLUSTER:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(
            url(), max_connections=pool_size, socket_connect_timeout=timeout, socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=30,
        )
    if not blocking:
        return redis.asyncio.Redis.from_url(url(), socket_timeout=timeout, socket_connect_timeout=timeout)
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url(), max_connections=pool_size, timeout=max(2.0, 4 * timeout), socket_connect_timeout=timeout,
        socket_timeout=timeout, retry=Retry(NoBackoff(), 0), health_check_interval=30,
    )
    return redis.asyncio.Redis(connection_pool=pool)


def scripts_client(*, timeout: float, pool_size: int) -> Any:
    """billing.lean_redis's client for the hot scripts, on one Redis that it can reach as redis-py would; None
    on a cluster, or a URL it leaves to redis-py (a unix socket, query options)."""
    from billing import lean_redis

    if settings.KEYWAY_BILLING_REDIS_CLUSTER or not lean_redis.supports(url()):
        return None
    return lean_redis.LeanRedis(url(), timeout=timeout, pool_size=pool_size)


def sync_client(*, timeout: float, connect_timeout: float) -> Any:
    """A synchronous client (the usage stream's consumer, on the ledger's writer thread)."""
    import redis

    if settings.KEYWAY_BILLING_REDIS_CLUSTER:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url(), socket_timeout=timeout, socket_connect_timeout=connect_timeout)
    return redis.Redis.from_url(url(), socket_timeout=timeout, socket_connect_timeout=connect_timeout)


async def drop_idle_connections(client: Any) -> None:
    """After a failed call: the idle connections are as dead as that one if Redis restarted, so each next call
    opens a fresh one. A cluster client replaces a node's connections itself when the node fails."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        await pool.disconnect(inuse_connections=False)
