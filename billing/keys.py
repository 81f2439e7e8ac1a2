"""The names of the Redis keys that admission, settlement and the usage stream share, with their hash tags.

A Lua script, and a transaction, may only touch keys of one hash slot on a Redis Cluster; on a single Redis
every key is in the same place anyway. So every key carries the hash tag of a *shard*, `{s<k>}`: an
organization's counters (its spend, credit and caps, its keys' and projects' rate windows) are in shard
`organization id mod KEYWAY_REDIS_SHARDS`, and each shard has its own set of workers, worker heartbeats and
leases, usage stream and settlement marks. Each script then touches one shard:
- an admission, one organization's counters and the admitting worker's lease in that shard;
- a settlement batch, one script per shard it has calls in;
- a heartbeat, one script per shard, each reaping the workers gone from that shard.

One shard, the default, keeps everything in one slot. On a cluster (billing.connections), a multiple of the
number of primaries spreads organizations over them. Changing the number of shards renames every counter: do it
with every worker stopped; the counters are seeded anew from the ledger.
"""

from __future__ import annotations

from platform_site.kernel.conf import settings  # Django's, read faster (the module says why)


def shards() -> range:
    return range(settings.KEYWAY_REDIS_SHARDS)


def shard_of(organization_id: int) -> int:
    return organization_id % settings.KEYWAY_REDIS_SHARDS


def shard_prefix(shard: int, prefix: str | None = None) -> str:
    """What every key of the shard starts with: the key prefix and the shard's hash tag."""
    return f"{prefix or settings.KEYWAY_CACHE_PREFIX}:{{s{shard}}}"


def shard_in(name: str) -> int:
    """The shard a key of this module's belongs to."""
    return int(name.split(":{s", 1)[1].split("}", 1)[0])


def usage_stream(shard: int, prefix: str | None = None) -> str:
    """The shard's Redis Stream of settled calls on their way to the ledger."""
    return f"{shard_prefix(shard, prefix)}:bill:usage"


def workers(shard: int, prefix: str | None = None) -> str:
    """The set of registered workers: a worker missing from it may not take holds in the shard."""
    return f"{shard_prefix(shard, prefix)}:bill:workers"


def alive(shard: int, worker: str, prefix: str | None = None) -> str:
    """A worker's heartbeat, which expires when the worker stops beating."""
    return f"{shard_prefix(shard, prefix)}:bill:alive:{worker}"


def lease(shard: int, worker: str, prefix: str | None = None) -> str:
    """What a worker holds on each of the shard's counters."""
    return f"{shard_prefix(shard, prefix)}:bill:lease:{worker}"


def sliced(shard: int, prefix: str | None = None) -> str:
    """How much of each of the shard's counters is out in workers' admission slices (billing.slices)."""
    return f"{shard_prefix(shard, prefix)}:bill:sliced"


def settled(shard: int, batch: str, prefix: str | None = None) -> str:
    """The mark of a settlement batch applied in the shard."""
    return f"{shard_prefix(shard, prefix)}:bill:settled:{batch}"


def spend(organization_id: int, prefix: str | None = None) -> str:
    return f"{shard_prefix(shard_of(organization_id), prefix)}:bill:spend:{organization_id}"


def credit(organization_id: int, prefix: str | None = None) -> str:
    return f"{shard_prefix(shard_of(organization_id), prefix)}:bill:credit:{organization_id}"


def month(kind: str, owner: int | None, month: str, *, organization_id: int, prefix: str | None = None) -> str:
    """A monthly cap's counter: `month` (the organization's), `kmonth` (a key's) or `pmonth` (a project's)."""
    return f"{shard_prefix(shard_of(organization_id), prefix)}:bill:{kind}:{owner}:{month}"


def every(pattern: str, prefix: str | None = None) -> str:
    """A SCAN pattern for billing keys of every shard: `every("lease:*")`."""
    return f"{prefix or settings.KEYWAY_CACHE_PREFIX}:{{s*}}:bill:{pattern}"
