"""Reconciliation: the shared counters (billing.counters) checked against the ledger, and corrected.

The counters are a fast copy of what the ledger says, kept up by admissions and settlements. Some events can
make them drift: Redis restarted empty while calls were in flight, a worker stopped before it could send its
settlements, a hold whose lease nobody reaps, an operator's hand. Drift one way refuses requests that should
run; the other way lets an organization spend past its credit or cap. Reconciliation finds and corrects it:

- Leases of workers that are gone (not registered, no heartbeat) are reaped: their holds are given back.
- Each money counter — spend:{org}, this month's month:{org}, kmonth:{key}, pmonth:{project} — should be what
  the ledger charged (the account's usage total, or this month's charges of the organization, key or
  project, as the daily roll-ups written in the ledger's transactions sum them), plus the events settled but
  not yet written (in the shared usage stream, or journaled on this host while Redis was away:
  billing.ledger), plus the holds of calls in flight. A counter is only checked while none of its calls is
  in flight (no hold on it in any lease) and it did not move for longer than the ledger takes to write what
  was settled (KEYWAY_USAGE_FLUSH_INTERVAL): then every settled call it counts is in the ledger or the
  journal, and nothing is on its way. Busy counters are checked at their next quiet moment (a later run). The correction
  is a compare-and-set: a counter that moved meanwhile is left for the next run.
- credit:{org} should hold the account's credit total and version.

Each correction is logged (the counter and its drift, never a tenant's data beyond its id) and counted in the
metrics `keyway_counter_corrections` and `keyway_counter_drift_micros`. It runs every
KEYWAY_RECONCILE_INTERVAL seconds in one worker at a time (a Redis lock), and on demand with
`manage.py reconcile_counters`. Without Redis there is nothing to reconcile: the counters live in the one
process and start from the ledger.

The journals read are this host's (KEYWAY_USAGE_JOURNAL_DIR): another host's journal only holds what it
settled while Redis was away, which reaches the ledger within the same quiet window; one whose write keeps
failing there would look like drift until it is written, and is corrected back by the next run. With more than
_MOST_STREAMED events waiting in the stream (the database has been away for a while), the money counters are
left for a later run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import Sum

from billing import keys
from platform_site.kernel import metrics
from platform_site.kernel.orm import returns_connection

logger = logging.getLogger(__name__)

# KEYS: the counters, then the leases. Returns, per counter, its value (-1: missing) and the holds on it.
_SNAPSHOT = """
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do
  local value = redis.call('GET', KEYS[i])
  local held = 0
  for j = n + 1, #KEYS do held = held + tonumber(redis.call('HGET', KEYS[j], KEYS[i]) or '0') end
  out[#out + 1] = value and tonumber(value) or -1
  out[#out + 1] = held
end
return out
"""

# KEYS 1 the counter; ARGV 1 the value it had when read, 2 the value it should have. Returns 1 if corrected.
_CORRECT = """
local value = redis.call('GET', KEYS[1])
if not value or tonumber(value) ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"""

# KEYS 1 the credit hash; ARGV 1 total, 2 version as read, 3 total, 4 version from the ledger.
_CORRECT_CREDIT = """
if redis.call('HGET', KEYS[1], 't') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'v') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 't', ARGV[3], 'v', ARGV[4])
return 1
"""

# KEYS 1 the set of workers, 2 the worker's heartbeat, 3 its lease, 4 the shard's slices (billing.slices);
# ARGV 1 the worker. Reaps a lease whose worker is neither registered nor alive (it cannot take new holds:
# admission refuses unregistered workers).
_REAP_ORPHAN = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local held = redis.call('HGETALL', KEYS[3])
for i = 1, #held, 2 do
  local amount = tonumber(held[i + 1])
  if string.sub(held[i], 1, 2) == 'g|' then
    local name = string.sub(held[i], 3)
    if redis.call('HINCRBY', KEYS[4], name, -amount) <= 0 then redis.call('HDEL', KEYS[4], name) end
  elseif amount ~= 0 and redis.call('EXISTS', held[i]) == 1 then
    redis.call('INCRBY', held[i], -amount)
  end
end
redis.call('DEL', KEYS[3])
return 1
"""


@dataclass
class Report:
    checked: int = 0
    busy: int = 0
    corrected: list[tuple[str, int, int]] = field(default_factory=list)  # counter, was, now
    busy_counters: list[tuple[str, str]] = field(default_factory=list)  # counter, why
    reaped_leases: int = 0

    def line(self) -> str:
        drift = sum(abs(now - was) for _, was, now in self.corrected)
        return (f"Reconciled the billing counters: {self.checked} checked, {self.busy} busy (left for the next "
                f"run), {len(self.corrected)} corrected ({drift} micro-USD of drift), {self.reaped_leases} "
                "orphaned leases reaped")


def _kind(name: str) -> str:
    return name.split(":bill:", 1)[1].split(":", 1)[0]


async def _scan(client: Any, pattern: str) -> list[str]:
    return [name.decode() if isinstance(name, bytes) else name async for name in client.scan_iter(pattern, count=1000)]


_MOST_STREAMED = 200_000


def _unwritten(directory: Path, streamed: list[Any]) -> list[Any]:
    """The events in the usage stream (read before this) and this host's journals that the ledger does not
    hold yet: an event written between the two reads is in the ledger now, and counted from there once."""
    from billing.ledger import read_journals
    from billing.models import UsageEvent

    events = list({event.call_id: event for event in [*streamed, *read_journals(directory)]}.values())
    if not events:
        return []
    ids = [event.call_id for event in events]
    written: set[str] = set()
    for start in range(0, len(ids), 1000):
        written.update(UsageEvent.objects.filter(call_id__in=ids[start:start + 1000]).values_list("call_id", flat=True))
    return [event for event in events if event.call_id not in written]


@returns_connection
def _expected(
    counters: list[str], prefix: str, month: str, streamed: list[Any]
) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    """What the ledger (and the events on their way to it) say each counter should be; and each organization's
    credit (total, version)."""
    from apikeys.models import ApiKey
    from billing.models import BillingAccount, UsageDaily
    from platform_site.models import Project

    pending = _unwritten(Path(settings.KEYWAY_USAGE_JOURNAL_DIR), streamed)
    # Each counter by its kind and owner (organization, key or project): its name carries its shard.
    wanted: dict[str, dict[int, str]] = defaultdict(dict)
    for name in counters:
        wanted[_kind(name)][int(name.split(":bill:", 1)[1].split(":")[1])] = name
    expected: dict[str, int] = {}
    organizations = set(wanted["spend"]) | set(wanted["credit"])
    accounts = {row[0]: row[1:] for row in BillingAccount.objects.filter(organization_id__in=organizations)
                .values_list("organization_id", "usage_total_micros", "credit_total_micros", "credit_version")}
    for organization_id, name in wanted["spend"].items():
        expected[name] = accounts.get(organization_id, (0, 0, 0))[0]
    year, number = int(month[:4]), int(month[4:])
    # The month's charges from the daily roll-ups, which the ledger's own transactions keep equal to it (as the
    # counters are seeded: billing.metering._month_spend): a few rows per owner and day, where summing the
    # ledger read every call of the month. By organization first, the roll-ups' index.
    this_month = UsageDaily.objects.filter(day__gte=date(year, number, 1),
                                           day__lt=date(year + number // 12, number % 12 + 1, 1))
    organizations_of = {
        "month": {owner: owner for owner in wanted["month"]},
        "kmonth": dict(ApiKey.objects.filter(pk__in=list(wanted["kmonth"])).values_list("pk", "organization_id")),
        "pmonth": dict(Project.objects.filter(pk__in=list(wanted["pmonth"])).values_list("pk", "organization_id")),
    }
    for kind, column in (("month", "organization_id"), ("kmonth", "api_key_id"), ("pmonth", "project_id")):
        if not wanted[kind]:
            continue
        for name in wanted[kind].values():
            expected[name] = 0
        where = {"organization_id__in": set(organizations_of[kind].values()), f"{column}__in": list(wanted[kind])}
        rows = this_month.filter(**where).values(column).annotate(total=Sum("cost_micros")).values_list(column, "total")
        for owner, total in rows:
            expected[wanted[kind][owner]] = int(total or 0)
    for event in pending:
        in_month = time.strftime("%Y%m", time.gmtime(event.created_at)) == month
        organization = event.organization_id
        for name, applies in (
            (keys.spend(organization, prefix), True),
            (keys.month("month", organization, month, organization_id=organization, prefix=prefix), in_month),
            (keys.month("kmonth", event.api_key_id, month, organization_id=organization, prefix=prefix), in_month),
            (keys.month("pmonth", event.project_id, month, organization_id=organization, prefix=prefix), in_month),
        ):
            if applies and name in expected:
                expected[name] += event.cost_micros
    credits = {name: (accounts[organization_id][1], accounts[organization_id][2])
               for organization_id, name in wanted["credit"].items() if organization_id in accounts}
    return expected, credits


async def _reap_orphans(client: Any, prefix: str, report: Report) -> list[str]:
    """Reap the leases of workers that are gone; returns the leases left (live workers')."""
    script = client.register_script(_REAP_ORPHAN)
    live = []
    for lease in await _scan(client, keys.every("lease:*", prefix)):
        worker, shard = lease.split(":bill:lease:", 1)[1], keys.shard_in(lease)
        names = [keys.workers(shard, prefix), keys.alive(shard, worker, prefix), lease, keys.sliced(shard, prefix)]
        if int(await script(keys=names, args=[worker])):
            report.reaped_leases += 1
            logger.warning("Reaped the lease of worker %s, which is gone, and gave its holds back", worker)
        else:
            live.append(lease)
    return live


async def _snapshot(client: Any, counters: list[str], leases: list[str]) -> dict[str, tuple[int, int]]:
    """Each counter's value and the holds on it, read atomically (a few hundred counters of one shard, and the
    shard's leases, per script)."""
    script = client.register_script(_SNAPSHOT)
    found: dict[str, tuple[int, int]] = {}
    leases_of: defaultdict[int, list[str]] = defaultdict(list)
    for lease in leases:
        leases_of[keys.shard_in(lease)].append(lease)
    counters_of: defaultdict[int, list[str]] = defaultdict(list)
    for name in counters:
        counters_of[keys.shard_in(name)].append(name)
    for shard, names in counters_of.items():
        for start in range(0, len(names), 500):
            batch = names[start:start + 500]
            values = await script(keys=[*batch, *leases_of[shard]], args=[len(batch)])
            found.update({name: (int(values[2 * i]), int(values[2 * i + 1])) for i, name in enumerate(batch)})
    return found


async def reconcile(client: Any, *, prefix: str | None = None, quiet_seconds: float | None = None,
                    dry_run: bool = False) -> Report:
    """One pass over every counter (see the module's docstring). `client` is a redis.asyncio client."""
    prefix = prefix or settings.KEYWAY_CACHE_PREFIX
    if quiet_seconds is None:
        quiet_seconds = max(1.0, 4 * settings.KEYWAY_USAGE_FLUSH_INTERVAL)
    report = Report()
    if dry_run:
        leases = await _scan(client, keys.every("lease:*", prefix))
    else:
        leases = await _reap_orphans(client, prefix, report)
    month = time.strftime("%Y%m", time.gmtime())
    money = [name for pattern in ("spend:*", f"month:*:{month}", f"kmonth:*:{month}", f"pmonth:*:{month}")
             for name in await _scan(client, keys.every(pattern, prefix))]
    before = await _snapshot(client, money, leases)
    quiet = [name for name, (value, held) in before.items() if value >= 0 and held == 0]
    report.checked = len(money)
    report.busy = len(money) - len(quiet)
    report.busy_counters += [(name, f"{held} held by calls in flight") for name, (value, held) in before.items()
                             if value >= 0 and held != 0]
    credit_names = await _scan(client, keys.every("credit:*", prefix))
    credit_before = {}
    for name in credit_names:
        total, version = await client.hmget(name, "t", "v")
        credit_before[name] = (total, version)
    await asyncio.sleep(quiet_seconds)
    from billing.ledger import stream_events

    streamed = await stream_events(client, prefix, limit=_MOST_STREAMED)
    if streamed is None:
        report.busy += len(quiet)
        report.busy_counters += [(name, "the ledger is far behind the usage stream") for name in quiet]
        quiet, streamed = [], []
    # Off the ORM thread the serving requests use: the month's sums may take a moment on a large ledger.
    expected, credits = await sync_to_async(_expected, thread_sensitive=False)(
        [*quiet, *credit_names], prefix, month, streamed
    )
    after = await _snapshot(client, quiet, leases)
    correct = client.register_script(_CORRECT)
    for name in quiet:
        value, held = after[name]
        if (value, held) != before[name]:
            report.busy += 1
            report.busy_counters.append((name, f"moved from {before[name]} to {(value, held)} while checked"))
            continue
        want = expected.get(name)
        if want is None or want == value:
            continue
        if dry_run or int(await correct(keys=[name], args=[value, want])):
            report.corrected.append((name, value, want))
            if not dry_run:
                metrics.counter_corrected(_kind(name), want - value)
                logger.warning("Reconciled %s: the counter said %d, the ledger %d (drift %+d micro-USD)",
                               name, value, want, value - want)
    correct_credit = client.register_script(_CORRECT_CREDIT)
    report.checked += len(credit_before)
    for name, (total, version) in credit_before.items():
        if name not in credits or total is None or version is None:
            continue
        want_total, want_version = credits[name]
        if (int(total), int(version)) == (want_total, want_version):
            continue
        if dry_run or int(await correct_credit(keys=[name], args=[total, version, want_total, want_version])):
            report.corrected.append((name, int(total), want_total))
            if not dry_run:
                metrics.counter_corrected("credit", want_total - int(total))
                logger.warning("Reconciled %s: the counter said %s (version %s), the ledger %d (version %d)",
                               name, total.decode(), version.decode(), want_total, want_version)
    return report


async def reconcile_periodically(client: Any, worker: str) -> None:
    """Each worker runs this: every KEYWAY_RECONCILE_INTERVAL seconds, the one that takes the lock (which
    expires with the interval) runs a pass, so there is one pass per interval whatever the number of workers."""
    interval = settings.KEYWAY_RECONCILE_INTERVAL
    lock = f"{settings.KEYWAY_CACHE_PREFIX}:bill:reconciled"
    while interval > 0:
        await asyncio.sleep(interval / 4)
        try:
            if not await client.set(lock, worker, nx=True, ex=max(int(interval), 1)):
                continue
            report = await reconcile(client)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            # Redis or the database is away: the breakers say so; the next interval tries again.
            logger.warning("Reconciling the billing counters failed (%s); will try again", type(error).__name__)
            continue
        log = logger.warning if report.corrected or report.reaped_leases else logger.info
        log(report.line())
