"""The counters that admit a request: rate limits, prepaid credit and monthly spend caps, in one step.

Admission is one atomic step per request — a Lua script on Redis, shared by every worker process, or the
same logic in this process when there is no REDIS_URL (the embedded default runs one process). It counts
the request against the key's RPM, checks the key's TPM, and reserves the request's worst-case cost against
the organization's credit and both monthly caps. Because check and reservation are one atomic step,
concurrent requests cannot together overshoot a balance or cap by more than what is already reserved.

The rate windows are the key's (its RPM and TPM) and its project's for the requested model (OpenAI's project
rate limits: RPM, TPM and, where set, requests per UTC day), all counted in the same step; a request must fit
under every one of them. An admitted request's token estimate (its prompt and its output limit, as OpenAI
counts it) is added to the token windows in that step, so concurrent requests cannot all fit under a TPM
that only their sum exceeds; settlement replaces the estimate by what was used.

Counters, all in micro-USD except the rate windows (each name after the key prefix and the organization's
shard tag, which make them Redis Cluster-safe: billing.keys):
- spend:{org}        everything ever charged or reserved: written usage + settled-but-unwritten + open holds.
                     Seeded from the account's usage total the first time it is needed.
- credit:{org}       the credit total with its version (the newest credit entry's id); every admission
                     carries the worker's copy and the counter keeps the newest, so a top-up reaches Redis
                     on the next request without any extra round trip.
- month:{org}:{M}, kmonth:{key}:{M}, pmonth:{project}:{M}
                     this calendar month's charged + reserved, only where a cap exists; seeded from the
                     ledger on first use (the only case that costs a query).
Settlement replaces a hold by the real cost; those adjustments (and TPM token counts) are sent on the event
loop's next turn, together with everything else settled meanwhile, so under load many requests share one
round trip; a call that settles while no other is under way is sent at once (no other could join it). The
scripts run on billing.lean_redis's client, on one Redis (its docstring says why). Until they are sent, a hold
counts at its worst case: the counters err on the side of refusing.
The same step appends each settled call's usage event to the shared usage stream (usage:{prefix}, a Redis
Stream that billing.ledger's consumer group writes to the ledger): the charge on the counters and the event
that writes it down land together or not at all. An answer waits for that step (`recorded()`), so a host
that is lost after it answered has nothing of its own that the ledger still needs. Where the step fails
(Redis away), the events go to this host's journal instead, which this host writes itself (billing.ledger).

Leased admission (billing.slices): the admission script may also grant a slice of the room left, for more
requests like this one, which this worker then admits in process (`_take`) until one does not fit; what is
left goes back with the settlements. The exactness rules are in billing.slices.

Holds of a worker that dies: each worker process keeps a lease (lease:{worker}, what it holds on each
counter) and a heartbeat. Any live worker's heartbeat reaps the leases of workers whose heartbeat expired,
releasing their holds in one atomic script, so a crashed worker cannot lock an organization out for good.
A request whose worker's lease was reaped while it ran (a worker stalled past the heartbeat) settles at its
full cost, because its hold was already released: nothing is released twice.

Redis going away (README, "When a backing service fails"): every call goes through the Redis circuit breaker
(platform_site.kernel.breaker) and raises breaker.Unavailable at once while Redis is down; metering decides
what that means for the request (fail closed, or serve unlimited). Settlements that cannot be sent are kept
and sent again, under the same batch id, once Redis answers. A Redis that comes back empty is noticed by the
first admission (this worker is no longer in the set of workers): the worker registers under a new name, so
holds released later against the old lease are added back to the counters, which are seeded from the ledger
anew; what drifts meanwhile is corrected by reconciliation (billing.reconcile).

Measured with bench/: django-ratelimit through Django's cache API cost ~2.4 ms of CPU per request on Redis,
which alone broke the 1.5 ms budget; this is one asynchronous round trip (~0.1 ms of CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import secrets
import socket
import time
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from billing import connections, keys, slices
from billing.ledger import ledger, write_stream_periodically
from billing.ratelimits import WINDOW
from billing.services import SettledUsage
from platform_site.kernel import breaker, metrics
from platform_site.kernel.conf import settings  # Django's, read faster (the module says why)
from platform_site.kernel.loops import PerLoop

T = TypeVar("T")

logger = logging.getLogger(__name__)

ADMITTED = 0
REFUSED_REQUESTS = 1
REFUSED_TOKENS = 2
REFUSED_CREDIT = 3
REFUSED_ORG_BUDGET = 4
REFUSED_KEY_BUDGET = 5
REFUSED_PROJECT_REQUESTS = 6
REFUSED_PROJECT_TOKENS = 7
REFUSED_PROJECT_DAY = 8
REFUSED_PROJECT_BUDGET = 9
NEEDS_ORG_MONTH = -1
NEEDS_KEY_MONTH = -2
NEEDS_PROJECT_MONTH = -3
NEEDS_REGISTRATION = -4
SLICED_ELSEWHERE = 10  # refused while the counter had room out in slices: nothing counted, ask again

DAY = 24 * 3600
_MONTH_TTL = 40 * 24 * 3600

# KEYS: 1 requests window, 2 tokens window, 3 spend, 4 credit, 5 org month, 6 key month, 7 project month,
#       8 project requests window, 9 project tokens window, 10 project requests day, 11 the worker's lease,
#       12 the set of workers, 13 the shard's slices (what each counter has out in workers' slices)
# ARGV: 1 window ttl, 2 rpm (0: no rate limits), 3 tpm, 4 estimated tokens, 5 hold, 6 prepaid (1/0),
#       7 spend seed (-1: not metered), 8 credit total, 9 credit version, 10 org cap (-1: none), 11 key cap
#       (-1: none), 12 project cap (-1: none), 13 project rpm (0: no project limits), 14 project tpm,
#       15 project requests per day (0: none), 16 day ttl, 17 the worker, 18 the most requests a slice may be
#       for (0: no slice), 19 whether a refusal may wait for slices out in other workers (1/0)
# Returns the status, then the key's requests and tokens this minute, the project's, and the project's day
# (this request counted, its slice not), then how many more requests like this one the slice is for.
# A worker missing from the set (Redis restarted empty, or the worker was reaped) must register again first.
# A refusal on a counter that has room out in slices (billing.slices) counts nothing and says so (status 10)
# when it may wait: the slices come back within their lifetime, and the request is asked again.
_ADMIT = """
if redis.call('SISMEMBER', KEYS[12], ARGV[17]) == 0 then return {-4, 0, 0, 0, 0, 0, 0} end
local org_cap = tonumber(ARGV[10])
local key_cap = tonumber(ARGV[11])
local project_cap = tonumber(ARGV[12])
if org_cap >= 0 and redis.call('EXISTS', KEYS[5]) == 0 then return {-1, 0, 0, 0, 0, 0, 0} end
if key_cap >= 0 and redis.call('EXISTS', KEYS[6]) == 0 then return {-2, 0, 0, 0, 0, 0, 0} end
if project_cap >= 0 and redis.call('EXISTS', KEYS[7]) == 0 then return {-3, 0, 0, 0, 0, 0, 0} end
local requests, tokens, prequests, ptokens, pday = 0, 0, 0, 0, 0
local counted = {}
local function refuse(status, key)
  if ARGV[19] == '1' and tonumber(redis.call('HGET', KEYS[13], key) or '0') > 0 then
    for _, name in ipairs(counted) do redis.call('DECR', name) end
    return {10, 0, 0, 0, 0, 0, 0}
  end
  return {status, requests, tokens, prequests, ptokens, pday, 0}
end
local rpm = tonumber(ARGV[2])
local estimate = tonumber(ARGV[4])
local prpm = tonumber(ARGV[13])
local prpd = tonumber(ARGV[15])
if rpm > 0 then
  requests = redis.call('INCR', KEYS[1])
  counted[1] = KEYS[1]
  if requests == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
  tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
  if requests > rpm then return refuse(1, KEYS[1]) end
  if tokens + estimate > tonumber(ARGV[3]) then return refuse(2, KEYS[2]) end
  if prpm > 0 then
    prequests = redis.call('INCR', KEYS[8])
    counted[2] = KEYS[8]
    if prequests == 1 then redis.call('EXPIRE', KEYS[8], ARGV[1]) end
    ptokens = tonumber(redis.call('GET', KEYS[9]) or '0')
    if prequests > prpm then return refuse(6, KEYS[8]) end
    if ptokens + estimate > tonumber(ARGV[14]) then return refuse(7, KEYS[9]) end
  end
  if prpd > 0 then
    pday = redis.call('INCR', KEYS[10])
    counted[#counted + 1] = KEYS[10]
    if pday == 1 then redis.call('EXPIRE', KEYS[10], ARGV[16]) end
    if pday > prpd then return refuse(8, KEYS[10]) end
  end
end
local hold = tonumber(ARGV[5])
local metered = tonumber(ARGV[7]) >= 0
local prepaid = ARGV[6] == '1'
local credit = 0
if metered then redis.call('SET', KEYS[3], ARGV[7], 'NX') end
if prepaid then
  local version = tonumber(redis.call('HGET', KEYS[4], 'v') or '-1')
  if tonumber(ARGV[9]) > version then redis.call('HSET', KEYS[4], 't', ARGV[8], 'v', ARGV[9]) end
  credit = tonumber(redis.call('HGET', KEYS[4], 't'))
  if tonumber(redis.call('GET', KEYS[3])) + hold > credit then return refuse(3, KEYS[3]) end
end
local caps = {{org_cap, 5, 4}, {key_cap, 6, 5}, {project_cap, 7, 9}}
for _, cap in ipairs(caps) do
  if cap[1] >= 0 and tonumber(redis.call('GET', KEYS[cap[2]])) + hold > cap[1] then
    return refuse(cap[3], KEYS[cap[2]])
  end
end
if metered then
  redis.call('INCRBY', KEYS[3], hold)
  redis.call('HINCRBY', KEYS[11], KEYS[3], hold)
end
for _, cap in ipairs(caps) do
  if cap[1] >= 0 then
    redis.call('INCRBY', KEYS[cap[2]], hold)
    redis.call('HINCRBY', KEYS[11], KEYS[cap[2]], hold)
  end
end
if rpm > 0 then
  -- Admitted: its estimate (prompt and output limit) counts in the token windows now; settlement corrects it.
  tokens = redis.call('INCRBY', KEYS[2], estimate)
  redis.call('EXPIRE', KEYS[2], 120)
  if prpm > 0 then
    ptokens = redis.call('INCRBY', KEYS[9], estimate)
    redis.call('EXPIRE', KEYS[9], 120)
  end
end
-- The slice: room for n more requests like this one on every counter it counts against, n at most a
-- 1/(4 x workers) share of the room left on the tightest one, so that every worker could take as much and
-- none near a limit (then n is 0, and every request comes here).
local n = tonumber(ARGV[18])
if n == 0 then return {0, requests, tokens, prequests, ptokens, pday, 0} end
local spread = 4 * math.max(1, redis.call('SCARD', KEYS[12]))
local function fit(room, each)
  if each > 0 then n = math.min(n, math.floor(room / (each * spread))) end
end
local sliced = {}
if rpm > 0 then
  fit(rpm - requests, 1)
  fit(tonumber(ARGV[3]) - tokens, estimate)
  sliced[#sliced + 1] = {1, 1}
  sliced[#sliced + 1] = {2, estimate}
  if prpm > 0 then
    fit(prpm - prequests, 1)
    fit(tonumber(ARGV[14]) - ptokens, estimate)
    sliced[#sliced + 1] = {8, 1}
    sliced[#sliced + 1] = {9, estimate}
  end
  if prpd > 0 then
    fit(prpd - pday, 1)
    sliced[#sliced + 1] = {10, 1}
  end
end
if metered then
  if prepaid then fit(credit - tonumber(redis.call('GET', KEYS[3])), hold) end
  sliced[#sliced + 1] = {3, hold}
  for _, cap in ipairs(caps) do
    if cap[1] >= 0 then
      fit(cap[1] - tonumber(redis.call('GET', KEYS[cap[2]])), hold)
      sliced[#sliced + 1] = {cap[2], hold}
    end
  end
end
if n <= 0 then return {0, requests, tokens, prequests, ptokens, pday, 0} end
for _, counter in ipairs(sliced) do
  local name, amount = KEYS[counter[1]], n * counter[2]
  if amount > 0 then
    redis.call('INCRBY', name, amount)
    -- Money counters: the slice is a hold in the lease (reaped with it); each counter's share out in slices
    -- is in the shard's hash, and in the lease, so that reaping takes it off.
    if counter[1] >= 3 and counter[1] <= 7 then redis.call('HINCRBY', KEYS[11], name, amount) end
    redis.call('HINCRBY', KEYS[13], name, amount)
    redis.call('HINCRBY', KEYS[11], 'g|' .. name, amount)
  end
end
return {0, requests, tokens, prequests, ptokens, pday, n}
"""

# Settlements: ARGV[1] = n; KEYS[1..n] are counters moved by ARGV[1+i] (cost − hold, summed) where they exist
# (token windows are created, with their expiry). Then, per lease j (KEYS[n+j]), ARGV lists how much of each
# counter its settled holds were: taken off the lease, or — where the lease was reaped meanwhile, which
# already gave the holds back — added back to the counter, so that counter ends at +cost. A field "g|counter"
# is a slice given back (billing.slices): taken off the lease and the shard's slices (the third KEY from the
# end). Then ARGV gives the number of usage events and each event, appended to the usage stream (the KEY
# before last). The last KEY marks
# the batch as applied: a batch sent again after an answer that never came (a timeout after Redis ran it) is
# not applied twice. The mark lasts 15 minutes: a batch is sent again at the first answer from Redis after
# the failure, which comes after the first sending ran (one key a batch; a day's marks were millions of keys).
_SETTLE = """
if not redis.call('SET', KEYS[#KEYS], 1, 'NX', 'EX', 900) then
  return 1
end
local n = tonumber(ARGV[1])
for i = 1, n do
  local key, amount = KEYS[i], tonumber(ARGV[1 + i])
  if string.find(key, ':rl:tok:', 1, true) then
    redis.call('INCRBY', key, amount)
    redis.call('EXPIRE', key, 120)
  elseif redis.call('EXISTS', key) == 1 then
    redis.call('INCRBY', key, amount)
  end
end
local at = n + 2
for j = n + 1, #KEYS - 3 do
  local lease = KEYS[j]
  local alive = redis.call('EXISTS', lease) == 1
  local fields = tonumber(ARGV[at])
  for f = 1, fields do
    local counter, hold = ARGV[at + 2 * f - 1], tonumber(ARGV[at + 2 * f])
    if string.sub(counter, 1, 2) == 'g|' then
      -- A slice given back: its counter's share out in slices (already taken off where the lease was reaped).
      if alive then
        if redis.call('HINCRBY', lease, counter, -hold) <= 0 then redis.call('HDEL', lease, counter) end
        local name = string.sub(counter, 3)
        if redis.call('HINCRBY', KEYS[#KEYS - 2], name, -hold) <= 0 then redis.call('HDEL', KEYS[#KEYS - 2], name) end
      end
    elseif alive then
      redis.call('HINCRBY', lease, counter, -hold)
    elseif redis.call('EXISTS', counter) == 1 then
      redis.call('INCRBY', counter, hold)
    end
  end
  at = at + 1 + 2 * fields
end
for e = 1, tonumber(ARGV[at]) do
  redis.call('XADD', KEYS[#KEYS - 1], '*', 'e', ARGV[at + e])
end
return 0
"""

# Gives back everything a worker's lease holds, and forgets the worker.
_REAP_FUNCTION = """
local function reap(workers, prefix, worker)
  local lease = prefix .. ':bill:lease:' .. worker
  local held = redis.call('HGETALL', lease)
  for i = 1, #held, 2 do
    local amount = tonumber(held[i + 1])
    if string.sub(held[i], 1, 2) == 'g|' then
      local sliced, name = prefix .. ':bill:sliced', string.sub(held[i], 3)
      if redis.call('HINCRBY', sliced, name, -amount) <= 0 then redis.call('HDEL', sliced, name) end
    elseif amount ~= 0 and redis.call('EXISTS', held[i]) == 1 then
      redis.call('INCRBY', held[i], -amount)
    end
  end
  redis.call('DEL', lease)
  redis.call('SREM', workers, worker)
end
"""

# Heartbeat and reaping, in one shard: KEYS 1 the shard's set of workers, 2 this worker's heartbeat there;
# ARGV 1 this worker, 2 ttl, 3 the shard's key prefix (billing.keys), 4 whether this worker registered before.
# Returns whether this worker was still registered: one that had registered and no longer is was reaped, and
# must take a new name and lease (it is not registered again under the old one).
_HEARTBEAT = _REAP_FUNCTION + """
local member = redis.call('SISMEMBER', KEYS[1], ARGV[1])
if member == 0 and ARGV[4] == '1' then return 0 end
redis.call('SET', KEYS[2], 1, 'EX', ARGV[2])
redis.call('SADD', KEYS[1], ARGV[1])
for _, worker in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[3] .. ':bill:alive:' .. worker) == 0 then reap(KEYS[1], ARGV[3], worker) end
end
return member
"""

# A clean stop, in one shard: KEYS 1 the shard's set of workers, 2 this worker's heartbeat there; ARGV 1 this
# worker, 2 the shard's key prefix.
_RETIRE = _REAP_FUNCTION + """
reap(KEYS[1], ARGV[2], ARGV[1])
redis.call('DEL', KEYS[2])
return 0
"""

# Seeds: SET NX each counter to its value from the ledger, with the month expiry.
_SEED = """
for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i], 'NX', 'EX', ARGV[#ARGV]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class Ask:
    """One admission: which counters, and the numbers to check and reserve."""

    keys: tuple[str, ...]  # the ten of names()
    rpm: int  # 0: rate limits off
    tpm: int
    estimated_tokens: int
    hold: int
    prepaid: bool
    spend_seed: int  # -1: not metered
    credit_total: int
    credit_version: int
    org_cap: int  # -1: none
    key_cap: int  # -1: none
    project_cap: int = -1  # -1: none
    project_rpm: int = 0  # 0: no project limits (rate limits off, or a key without a project)
    project_tpm: int = 0
    project_rpd: int = 0  # 0: no daily limit
    shard: int = 0  # the organization's (billing.keys), which every one of `keys` is in

    def argv(self) -> list[int]:
        return [
            WINDOW + 1, self.rpm, self.tpm, self.estimated_tokens, self.hold, int(self.prepaid), self.spend_seed,
            self.credit_total, self.credit_version, self.org_cap, self.key_cap, self.project_cap,
            self.project_rpm, self.project_tpm, self.project_rpd, DAY + 60,
        ]


@dataclass(frozen=True, slots=True)
class Counted:
    """What one admission found: its status, the key's and the project's windows after counting this request,
    and the lease holding its reservation."""

    status: int
    requests: int = 0
    tokens: int = 0
    project_requests: int = 0
    project_tokens: int = 0
    project_day: int = 0
    lease: str = ""


def names(
    *, organization_id: int, key_public_id: str, key_id: int, project_id: int | None, model: str, now: float
) -> tuple[str, ...]:
    prefix = keys.shard_prefix(keys.shard_of(organization_id))
    window = int(now) // WINDOW
    month = time.strftime("%Y%m", time.gmtime(now))
    # Project windows are per model; their token window keeps ":rl:tok:" so settlement creates it like the key's.
    scope = f"p:{project_id}:{model}"
    return (
        f"{prefix}:rl:req:{key_public_id}:{window}",
        f"{prefix}:rl:tok:{key_public_id}:{window}",
        f"{prefix}:bill:spend:{organization_id}",
        f"{prefix}:bill:credit:{organization_id}",
        f"{prefix}:bill:month:{organization_id}:{month}",
        f"{prefix}:bill:kmonth:{key_id}:{month}",
        f"{prefix}:bill:pmonth:{project_id}:{month}",
        f"{prefix}:rl:req:{scope}:{window}",
        f"{prefix}:rl:tok:{scope}:{window}",
        f"{prefix}:rl:day:{scope}:{int(now) // DAY}",
    )


def _heartbeat_ttl() -> int:
    return max(1, math.ceil(3 * settings.KEYWAY_WORKER_HEARTBEAT_INTERVAL))


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


Releases = dict[str, dict[str, int]]  # lease -> counter -> settled holds


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _RedisCounters:
    def __init__(self) -> None:
        # No retries (billing.connections): a call that timed out may still run on Redis, and a retry would then
        # reserve twice while the caller learns of one (a hold nobody settles); a failure is the breaker's to
        # count and the worker's to resolve (a new lease, below).
        self.client = connections.async_client(timeout=settings.KEYWAY_REDIS_TIMEOUT,
                                               pool_size=settings.KEYWAY_REDIS_POOL_SIZE)
        # The scripts run on billing.lean_redis's client where it can reach Redis (its docstring says why);
        # everything else on redis-py's.
        self.scripts = connections.scripts_client(timeout=settings.KEYWAY_REDIS_TIMEOUT,
                                                  pool_size=settings.KEYWAY_REDIS_POOL_SIZE)
        register = self.client.register_script if self.scripts is None else self.scripts.script
        self.admit_script = register(_ADMIT)
        self.settle_script = register(_SETTLE)
        self.seed_script = register(_SEED)
        self.heartbeat_script = register(_HEARTBEAT)
        self.retire_script = register(_RETIRE)
        self.prefix = settings.KEYWAY_CACHE_PREFIX
        self.worker = _worker_name()
        self.registered = False
        self.registering: asyncio.Task[None] | None = None
        self.heartbeats: asyncio.Task[None] | None = None
        self.reconciler: asyncio.Task[None] | None = None
        self.usage_writer: asyncio.Task[None] | None = None
        # Names this worker gave up, whose leases are still to reap (a timeout left them uncertain).
        self.retiring: list[str] = []
        self.renaming: asyncio.Task[None] | None = None
        # This worker's admission slices (billing.slices), by the counters they are for.
        self.slices: dict[tuple[str, ...], slices.Slice] = {}
        # The counters of admissions on their way that ask for a slice, and what resolves (to the number of
        # requests the slice granted is for) once it is in place.
        self.asking: dict[tuple[str, ...], asyncio.Future[int]] = {}

    def lease(self, shard: int) -> str:
        return keys.lease(shard, self.worker, self.prefix)

    async def heartbeat(self) -> None:
        """Say this worker is alive, and give back the holds of workers that are not, in every shard."""
        members = await asyncio.gather(*(
            self.heartbeat_script(
                keys=[keys.workers(shard, self.prefix), keys.alive(shard, self.worker, self.prefix)],
                args=[self.worker, _heartbeat_ttl(), keys.shard_prefix(shard, self.prefix), int(self.registered)],
            )
            for shard in keys.shards()
        ))
        if self.registered and not all(int(member) for member in members):
            # Stalled past the heartbeat and reaped: requests admitted before settle against the old lease
            # (at full cost, their holds already given back); new ones take a new lease.
            logger.warning("Worker %s was taken for dead and reaped; continuing under a new name", self.worker)
            self.worker = _worker_name()
            self.registered = False
            await self.heartbeat()
        self.registered = True

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(settings.KEYWAY_WORKER_HEARTBEAT_INTERVAL)
            try:
                await self._guard(self.heartbeat())
                if self.retiring:
                    await self._guard(self._renamed())
                if _resend or _unsent or _releases:
                    await _send()  # settlements kept through an outage, now that Redis answers
            except breaker.Unavailable:
                pass  # the breaker logged it, once
            except Exception:
                logger.exception("Billing heartbeat failed; will retry")

    async def _guard(self, call: Awaitable[T]) -> T:
        """A call to Redis through the breaker: breaker.Unavailable at once while Redis is down, or when the
        call fails to reach it."""
        if not breaker.redis.allows():
            if inspect.iscoroutine(call):
                call.close()
            elif isinstance(call, asyncio.Future):
                call.add_done_callback(_retrieve)  # nobody awaits it now: its failure is not news
            raise breaker.Unavailable
        try:
            result = await call
        except breaker.connection_errors() as error:
            breaker.redis.failed(error)
            # The idle connections are as dead as this one if Redis restarted: dropped now, so that after
            # the breaker's pause each call opens a fresh one instead of failing on a stale one.
            with contextlib.suppress(Exception):
                await connections.drop_idle_connections(self.client)
                if self.scripts is not None:
                    await self.scripts.drop_idle()
            raise breaker.Unavailable from error
        breaker.redis.succeeded()
        return result

    async def _register(self) -> None:
        from billing.reconcile import reconcile_periodically

        await self.heartbeat()
        loop = asyncio.get_running_loop()
        self.heartbeats = loop.create_task(self._beat())
        self.reconciler = loop.create_task(reconcile_periodically(self.client, self.worker))
        self.usage_writer = loop.create_task(write_stream_periodically())

    async def start(self) -> None:
        """Register this worker (and start writing the usage stream to the ledger) before the first request."""
        if self.heartbeats is None:
            # Registered before the first hold, so a worker that dies holding anything is always reapable;
            # once, however many first requests arrive together.
            if self.registering is None or self.registering.done() and self.registering.exception() is not None:
                self.registering = asyncio.get_running_loop().create_task(self._register())
            await self._guard(asyncio.shield(self.registering))

    async def admit(self, ask: Ask) -> Counted:
        """The lease in the result is the one holding the hold (the one a settlement must give it back to)."""
        if self.slices:
            counted = self._take(ask)
            if counted is not None:
                return counted
        while (refill := self.asking.get(ask.keys)) is not None:
            # A slice for these counters is on its way: taken from when it comes, rather than each admission
            # arriving meanwhile going to Redis on its own (15-17 % of admissions at concurrency 32 did). Waited
            # for again while the last one brought room; near a limit (no slice granted), on to Redis.
            if not await asyncio.shield(refill):
                break
            counted = self._take(ask)
            if counted is not None:
                return counted
        if self.heartbeats is None:
            await self.start()
        if self.retiring:
            await self._guard(self._renamed())
        waiting_until = 0.0
        while True:
            loop = asyncio.get_running_loop()
            may_wait = not waiting_until or loop.time() < waiting_until
            # One slice asked for at a time for the same counters: a burst that reaches Redis together would
            # otherwise take a slice each, which nobody uses once the burst is in.
            asking = ask.keys not in self.asking
            if asking:
                self.asking[ask.keys] = loop.create_future()
            granted = 0
            try:
                counted, granted = await self._admit_in_redis(ask, may_wait, asking)
                if granted:
                    self._hold(ask, counted, granted, loop)
            finally:
                if asking:
                    self.asking.pop(ask.keys).set_result(granted)  # in place: those waiting take from it
            metrics.admission_round_trip()
            if counted.status != SLICED_ELSEWHERE:
                break
            # Refused on a counter with room out in slices, this worker's or another's: counted nothing. Ours
            # go back now; the others' within their lifetime. Asked again until they are back.
            lifetime = settings.KEYWAY_ADMISSION_SLICE_SECONDS
            waiting_until = waiting_until or loop.time() + 3 * lifetime
            self.give_back_all()
            await asyncio.sleep(lifetime / 4)
        if _resend:
            settle_later({})  # Redis answers again: send what was kept through the outage now
        return counted

    async def _admit_in_redis(self, ask: Ask, may_wait: bool, asking: bool) -> tuple[Counted, int]:
        """One admission script (again under a new name where Redis lost this worker's), asking for a slice or
        not: what it counted, and how many requests the slice it granted is for."""
        for _ in range(2):
            lease = self.lease(ask.shard)
            try:
                status, requests, tokens, project_requests, project_tokens, project_day, granted = (
                    int(value) for value in await self._guard(self.admit_script(
                        keys=[*ask.keys, lease, keys.workers(ask.shard, self.prefix),
                              keys.sliced(ask.shard, self.prefix)],
                        args=[*ask.argv(), self.worker, settings.KEYWAY_ADMISSION_SLICE if asking else 0,
                              int(may_wait)],
                    ))
                )
            except breaker.Unavailable as error:
                if error.__cause__ is not None and self.lease(ask.shard) == lease:
                    # The call failed after it may have been sent (a timeout): Redis may still run it and
                    # reserve a hold nobody will settle. This name is retired before the next admission: its
                    # lease reaped (that hold with it; calls in flight settle as reaped ones do, exactly), and
                    # a late run of that admission refused, its worker no longer registered.
                    self.retiring.append(self.worker)
                    self.worker = _worker_name()
                    self.registered = False
                raise
            if status != NEEDS_REGISTRATION:
                break
            # Redis lost this worker (restarted empty, or reaped it): a new name and lease, then admit again.
            # Once, however many admissions found it out together.
            if self.lease(ask.shard) == lease:
                logger.warning("Worker %s is not registered in Redis (restarted, or reaped); registering again",
                               self.worker)
                self.retiring.append(self.worker)
                self.worker = _worker_name()
                self.registered = False
            await self._guard(self._renamed())
        if status == NEEDS_REGISTRATION:
            raise breaker.Unavailable
        return Counted(status, requests, tokens, project_requests, project_tokens, project_day, lease), granted

    def _hold(self, ask: Ask, counted: Counted, granted: int, loop: asyncio.AbstractEventLoop) -> None:
        """Keep the slice an admission was granted (for `granted` more requests like it)."""
        held = slices.Slice(
            ask, lease=counted.lease, requests=granted,
            counted=(counted.requests, counted.tokens, counted.project_requests, counted.project_tokens,
                     counted.project_day),
            expires=loop.time() + settings.KEYWAY_ADMISSION_SLICE_SECONDS,
        )
        older = self.slices.get(ask.keys)
        if older is not None and older.lease == held.lease and older.terms == held.terms:
            del self.slices[ask.keys]
            held.merge(older)  # admissions that went to Redis together, each with a slice
        else:
            self._give_back(ask.keys)
        self.slices[ask.keys] = held
        loop.call_at(held.expires, self._expire, ask.keys, held)

    def _take(self, ask: Ask) -> Counted | None:
        """Admit from this worker's slice for the request's counters, without a round trip; or None, having
        given back a slice that does not fit it."""
        held = self.slices.get(ask.keys)
        if held is None:
            return None
        lease = self.lease(ask.shard)
        counted = held.take(ask, lease, asyncio.get_running_loop().time())
        if counted is None:
            self._give_back(ask.keys)
            return None
        requests, tokens, project_requests, project_tokens, project_day = counted
        return Counted(ADMITTED, requests, tokens, project_requests, project_tokens, project_day, lease)

    def _expire(self, names: tuple[str, ...], held: slices.Slice) -> None:
        if self.slices.get(names) is held:
            self._give_back(names)

    def _give_back(self, names: tuple[str, ...]) -> None:
        """Give back what is left of a slice, with its share out in slices. A slice of a lease this worker no
        longer has is dropped: reaping that lease gave it all back."""
        held = self.slices.pop(names, None)
        if held is None or held.lease != self.lease(keys.shard_in(held.lease)):
            return
        amounts, released = held.given_back(names)
        settle_later(amounts, lease=held.lease, released=released)

    def give_back_all(self) -> None:
        for names in list(self.slices):
            self._give_back(names)

    async def _renamed(self) -> None:
        """Retire the names this worker gave up (reap their leases, forget them) and register the new one;
        once, however many admissions wait for it."""
        if self.renaming is None or self.renaming.done():
            self.renaming = asyncio.get_running_loop().create_task(self._rename())
        await asyncio.shield(self.renaming)

    async def _retire(self, worker: str) -> None:
        await asyncio.gather(*(
            self.retire_script(keys=[keys.workers(shard, self.prefix), keys.alive(shard, worker, self.prefix)],
                               args=[worker, keys.shard_prefix(shard, self.prefix)])
            for shard in keys.shards()
        ))

    async def _rename(self) -> None:
        for old in list(self.retiring):
            await self._retire(old)
            self.retiring.remove(old)
        if not self.registered:
            await self.heartbeat()

    async def settle(self, amounts: dict[str, int], releases: Releases, batch: str,
                     events: Sequence[SettledUsage] = ()) -> None:
        """One script per shard the batch has calls in, each marked applied on its own: a batch sent again
        after a failure is applied where it was not, once."""
        calls = []
        for shard, (shard_amounts, shard_releases, shard_events) in _by_shard(amounts, releases, events).items():
            names, args = _settlement(shard, self.prefix, shard_amounts, shard_releases, batch, shard_events)
            calls.append(self._guard(self.settle_script(keys=names, args=args)))
        if len(calls) == 1:
            await calls[0]  # the usual case (one shard): no task of its own, as gather would make
            return
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    def begin_settle(self, amounts: dict[str, int], releases: Releases, batch: str,
                     events: Sequence[SettledUsage]) -> Awaitable[None] | None:
        """`settle`, its script written to Redis before this returns, for a caller with work of its own to do
        meanwhile; await what it returns. None, with nothing sent, unless the batch is in one shard and the
        scripts' client has a connection free (then `settle` it as usual)."""
        begin = getattr(self.settle_script, "begin", None)
        if begin is None or not breaker.redis.allows():
            return None
        by_shard = _by_shard(amounts, releases, events)
        if len(by_shard) != 1:
            return None
        ((shard, (shard_amounts, shard_releases, shard_events)),) = by_shard.items()
        names, args = _settlement(shard, self.prefix, shard_amounts, shard_releases, batch, shard_events)
        started = begin(keys=names, args=args)
        return None if started is None else self._guard(started)

    async def seed(self, values: dict[str, int]) -> None:
        await self._guard(self.seed_script(keys=list(values), args=[*values.values(), _MONTH_TTL]))

    async def read(self, name: str) -> int | None:
        value = await self._guard(self.client.get(name))
        return None if value is None else int(value)

    async def close(self) -> None:
        for task in (self.heartbeats, self.reconciler, self.usage_writer):
            if task is not None:
                task.cancel()
        if self.registered:
            await self._retire(self.worker)
        await self.client.aclose()
        if self.scripts is not None:
            await self.scripts.aclose()


def _by_shard(amounts: dict[str, int], releases: Releases, events: Sequence[SettledUsage]
              ) -> dict[int, tuple[dict[str, int], Releases, list[SettledUsage]]]:
    """A settlement batch's parts, by the shard they are in."""
    by_shard: defaultdict[int, tuple[dict[str, int], Releases, list[SettledUsage]]] = defaultdict(
        lambda: ({}, {}, [])
    )
    for name, amount in amounts.items():
        by_shard[keys.shard_in(name)][0][name] = amount
    for lease, held in releases.items():
        by_shard[keys.shard_in(lease)][1][lease] = held
    for event in events:
        by_shard[keys.shard_of(event.organization_id)][2].append(event)
    return by_shard


def _settlement(shard: int, prefix: str, amounts: dict[str, int], releases: Releases, batch: str,
                events: Sequence[SettledUsage]) -> tuple[list[str], list[str | int | bytes]]:
    """The settlement script's keys and arguments for one shard's part of a batch."""
    names: list[str] = [*amounts, *releases, keys.sliced(shard, prefix), keys.usage_stream(shard, prefix),
                        keys.settled(shard, batch, prefix)]
    args: list[str | int | bytes] = [len(amounts), *amounts.values()]
    for held in releases.values():
        args.append(len(held))
        for counter, hold in held.items():
            args += [counter, hold]
    args.append(len(events))
    args += [orjson.dumps(event.as_row()) for event in events]
    return names, args


class _LocalCounters:
    """The same steps as the Lua scripts, for a single process without Redis."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.credit: dict[str, tuple[int, int]] = {}

    async def admit(self, ask: Ask) -> Counted:
        return self._admit(ask)

    def _admit(self, ask: Ask) -> Counted:
        (requests_key, tokens_key, spend_key, credit_key, org_month, key_month, project_month,
         project_requests_key, project_tokens_key, project_day_key) = ask.keys
        values = self.values
        if ask.org_cap >= 0 and org_month not in values:
            return Counted(NEEDS_ORG_MONTH)
        if ask.key_cap >= 0 and key_month not in values:
            return Counted(NEEDS_KEY_MONTH)
        if ask.project_cap >= 0 and project_month not in values:
            return Counted(NEEDS_PROJECT_MONTH)
        requests = tokens = project_requests = project_tokens = project_day = 0
        if ask.rpm > 0:
            if len(values) > 100_000:
                self._forget_old_windows()
            requests = values[requests_key] = values.get(requests_key, 0) + 1
            tokens = values.get(tokens_key, 0)
            if requests > ask.rpm:
                return Counted(REFUSED_REQUESTS, requests, tokens)
            if tokens + ask.estimated_tokens > ask.tpm:
                return Counted(REFUSED_TOKENS, requests, tokens)
            if ask.project_rpm > 0:
                project_requests = values[project_requests_key] = values.get(project_requests_key, 0) + 1
                project_tokens = values.get(project_tokens_key, 0)
                if project_requests > ask.project_rpm:
                    return Counted(REFUSED_PROJECT_REQUESTS, requests, tokens, project_requests, project_tokens)
                if project_tokens + ask.estimated_tokens > ask.project_tpm:
                    return Counted(REFUSED_PROJECT_TOKENS, requests, tokens, project_requests, project_tokens)
            if ask.project_rpd > 0:
                project_day = values[project_day_key] = values.get(project_day_key, 0) + 1
                if project_day > ask.project_rpd:
                    return Counted(
                        REFUSED_PROJECT_DAY, requests, tokens, project_requests, project_tokens, project_day
                    )
        counted = (requests, tokens, project_requests, project_tokens, project_day)
        if ask.spend_seed >= 0:
            values.setdefault(spend_key, ask.spend_seed)
        if ask.prepaid:
            if ask.credit_version > self.credit.get(credit_key, (0, -1))[1]:
                self.credit[credit_key] = (ask.credit_total, ask.credit_version)
            if values[spend_key] + ask.hold > self.credit[credit_key][0]:
                return Counted(REFUSED_CREDIT, *counted)
        caps = ((ask.org_cap, org_month, REFUSED_ORG_BUDGET), (ask.key_cap, key_month, REFUSED_KEY_BUDGET),
                (ask.project_cap, project_month, REFUSED_PROJECT_BUDGET))
        for cap, name, refusal in caps:
            if cap >= 0 and values[name] + ask.hold > cap:
                return Counted(refusal, *counted)
        if ask.spend_seed >= 0:
            values[spend_key] += ask.hold
        for cap, name, _ in caps:
            if cap >= 0:
                values[name] += ask.hold
        if ask.rpm > 0:
            tokens = values[tokens_key] = values.get(tokens_key, 0) + ask.estimated_tokens
            if ask.project_rpm > 0:
                project_tokens = values[project_tokens_key] = values.get(project_tokens_key, 0) + ask.estimated_tokens
            counted = (requests, tokens, project_requests, project_tokens, project_day)
        return Counted(ADMITTED, *counted)

    lease = ""  # one process: its holds die with it, and the counters are seeded anew from the ledger

    async def settle(self, amounts: dict[str, int], releases: Releases, batch: str,
                     events: Sequence[SettledUsage] = ()) -> None:
        # In process nothing is ambiguous: a call that raised applied nothing. Events never come here: without
        # Redis they are journaled when settled (`settle_later`).
        for name, amount in amounts.items():
            if ":rl:tok:" in name or name in self.values:
                self.values[name] = self.values.get(name, 0) + amount

    async def seed(self, values: dict[str, int]) -> None:
        for name, value in values.items():
            self.values.setdefault(name, value)

    async def read(self, name: str) -> int | None:
        return self.values.get(name)

    async def close(self) -> None:
        return None

    def _forget_old_windows(self) -> None:
        now = int(time.time())
        minute, day = f":{now // WINDOW}", f":{now // DAY}"
        self.values = {
            name: value
            for name, value in self.values.items()
            if ":rl:" not in name or name.endswith(day if ":rl:day:" in name else minute)
        }


async def _close_store(counters: _RedisCounters) -> None:
    await counters.close()


# One store per event loop: redis.asyncio connections belong to the loop that opened them.
_stores: PerLoop[_RedisCounters] = PerLoop("billing counters (Redis)", _RedisCounters, _close_store)
_local = _LocalCounters()


def store() -> Any:
    if not settings.REDIS_URL:
        return _local
    return _stores.get()


_unsent: defaultdict[str, int] = defaultdict(int)
_releases: defaultdict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
# Usage events settled since the last batch was built (with Redis only), and the future their batch resolves.
_events: list[SettledUsage] = []
_recorded: asyncio.Future[None] | None = None
# Futures of batches being sent: `recorded()` waits for the last one when nothing new is queued, `flush()` for
# all.
_in_flight: list[asyncio.Future[None]] = []
# Batches whose sending failed: (batch id, amounts, releases), sent again as they were (their events went to
# the journal).
_resend: list[tuple[str, dict[str, int], dict[str, dict[str, int]]]] = []
_sender: asyncio.Task[None] | None = None


def settle_later(
    amounts: dict[str, int],
    *,
    lease: str = "",
    released: dict[str, int] | None = None,
    event: SettledUsage | None = None,
    alone: bool = False,
) -> None:
    """Queue a settlement: counter moves (cost − hold, a request's tokens), the holds it gives back to its
    lease, and its usage event. Sent on the loop's next turn with everything else settled meanwhile, or, when
    the caller says it is `alone` (no other call of this process is under way, so none could join its batch),
    written to Redis before this returns: the caller's last steps then run while Redis works. Safe to call
    where awaiting is not (a `finally` of a cancelled stream)."""
    global _sender
    if event is not None and not settings.REDIS_URL:
        ledger.record(event)  # one process: its own journal, written by itself
        event = None
    elif event is not None:
        _events.append(event)
    try:
        for name, amount in amounts.items():
            if amount:
                _unsent[name] += amount
        if lease and released:
            for name, hold in released.items():
                if hold:
                    _releases[lease][name] += hold
        if not _unsent and not _releases and not _resend and not _events:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # No loop (shutdown): the hold stays at its worst case, or the reaper gives it back; an event goes
            # to the journal, which this host writes (or a later process replays).
            _journal_events()
            return
        if _sender is None or _sender.done() or _sender.get_loop() is not loop:
            _sender = loop.create_task(_send_soon(_begin() if alone else None))
    finally:
        if event is not None:
            ledger.keep(event)  # until the ledger has it, whatever becomes of Redis


async def recorded() -> None:
    """Wait until the usage events settled so far in this process are in the shared usage stream (or, where
    Redis failed, in this host's journal). Never raises; returns at once without Redis (the journal line was
    written when the call settled)."""
    global _recorded
    if _events:
        if _recorded is None:
            _recorded = asyncio.get_running_loop().create_future()
        waiting = _recorded
    elif _in_flight:
        waiting = _in_flight[-1]
    else:
        return
    await asyncio.shield(waiting)


def unsent(name: str) -> int:
    return _unsent.get(name, 0) + sum(amounts.get(name, 0) for _, amounts, _ in _resend)


# Batches taken from the queue to send (batch id, amounts, releases, events), and the future resolved once they
# are sent; the first of them possibly already written to Redis (_begin).
_Batch = tuple[str, dict[str, int], dict[str, dict[str, int]], list[SettledUsage]]
_Taken = tuple[list[_Batch], asyncio.Future[None]]


def _begin() -> tuple[_Taken, Awaitable[None] | None] | None:
    """The queued settlements taken as one batch and, where the store can, written to Redis now (see
    settle_later); None, with nothing taken, when batches that failed wait to go first."""
    if _resend or not settings.REDIS_URL:
        return None
    taken = _take()
    batch, amounts, releases, events = taken[0][0]
    try:
        first = store().begin_settle(amounts, releases, batch, events)
    except Exception:  # noqa: BLE001 - sent the usual way by the sender, which reports what fails
        first = None
    return taken, first


async def _send_soon(begun: tuple[_Taken, Awaitable[None] | None] | None = None) -> None:
    # One turn of the loop: every request settling in this turn rides along in the same round trip (unless a
    # batch was begun already). Then again for what settled while that round trip was under way (`settle_later`
    # did not start another sender meanwhile), until nothing is queued: the last settlements of a burst are
    # never left waiting.
    if begun is None:
        await asyncio.sleep(0)
    while True:
        try:
            taken, first = begun or (None, None)
            begun = None
            await _send(taken, first)
        except Exception as error:
            # Kept, and sent again by the next admission or heartbeat once Redis answers; events settled
            # meanwhile go to the journal now, so that no answer waits for Redis to come back.
            if not isinstance(error, breaker.Unavailable):
                logger.exception("Sending settlements failed; they are kept and sent again")
            _journal_events()
            return
        if not _unsent and not _releases and not _events:
            return


def _journal_events(events: list[SettledUsage] | None = None) -> None:
    """Events that could not reach the usage stream: into this host's journal, which this host writes to the
    ledger itself. Written at most twice if Redis did run the batch after all (a timeout): the ledger keeps
    one (it is idempotent on the call id)."""
    global _recorded
    if events is None:
        events = list(_events)
        _events.clear()
        if _recorded is not None and not _recorded.done():
            _recorded.set_result(None)
        _recorded = None
    for event in events:
        ledger.record(event)


async def flush() -> None:
    """Give back this worker's admission slices, and send them with the queued settlements and usage events
    (on shutdown, before seeding a counter from the ledger, and by tests): then the counters hold exactly
    what is charged and held by calls in flight."""
    if settings.REDIS_URL:
        store().give_back_all()
    # Batches another task is sending: applied (or kept to send again, below) before this returns.
    loop = asyncio.get_running_loop()
    for batch in [batch for batch in _in_flight if batch.get_loop() is loop]:
        await asyncio.shield(batch)
    await _send()


def _take() -> _Taken:
    """The batches to send now: those that failed before, then everything queued since."""
    global _recorded
    batches: list[_Batch] = [(batch, amounts, releases, []) for batch, amounts, releases in _resend]
    _resend.clear()
    # Resolved once this send is over, for `recorded()` and `flush()` to wait on.
    done = _recorded or asyncio.get_running_loop().create_future()
    _recorded = None
    _in_flight.append(done)
    if _unsent or _releases or _events:
        releases = {lease: dict(held) for lease, held in _releases.items()}
        batches.append((secrets.token_hex(12), dict(_unsent), releases, list(_events)))
        _unsent.clear()
        _releases.clear()
        _events.clear()
    return batches, done


async def _send(taken: _Taken | None = None, first: Awaitable[None] | None = None) -> None:
    """Send the queued settlements and usage events (or those `taken` already, the first batch begun as
    `first`)."""
    batches, done = taken if taken is not None else _take()
    try:
        for position, (batch, amounts, releases, events) in enumerate(batches):
            try:
                if position == 0 and first is not None:
                    await first
                else:
                    await store().settle(amounts, releases, batch, events)
            except BaseException:
                # Not lost on a passing Redis error, and not applied twice if Redis did run it before the error
                # (a timeout): sent again as it was, under the same batch id, on the next flush. The events go
                # to the journal now, so that an answer waiting for them need not wait for Redis.
                for failed, failed_amounts, failed_releases, failed_events in batches[position:]:
                    _resend.append((failed, failed_amounts, failed_releases))
                    _journal_events(failed_events)
                raise
    finally:
        _in_flight.remove(done)
        if not done.done():
            done.set_result(None)


async def flush_at_shutdown() -> None:
    """On shutdown, before this loop's Redis client is closed (platform_site.kernel.loops): send what is
    queued."""
    try:
        await flush()
    except breaker.Unavailable:
        # The holds stay in this worker's lease, which a live worker reaps once the heartbeat expires; the
        # costs never sent are a drift that reconciliation corrects from the ledger.
        logger.error("Could not send %d settlement batches at shutdown: Redis is unreachable", len(_resend))


def reset() -> None:
    """Forget the in-process counters and queued settlements (tests)."""
    global _recorded
    _local.values.clear()
    _local.credit.clear()
    _unsent.clear()
    _releases.clear()
    _resend.clear()
    _events.clear()
    _in_flight.clear()
    _recorded = None
