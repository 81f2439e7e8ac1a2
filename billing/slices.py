"""Leased admission: slices of the room under a request's limits, which a worker spends without a round trip.

An admission that goes to Redis (billing.counters) may take, in the same script, a slice: room for n more
requests like it on every counter it counts against — its key's and project's rate windows, the
organization's spend and each monthly cap. The slice is counted in Redis at once, as if those n requests had
been admitted, so that the sum of what every worker admits never passes a limit. The worker then admits the
next requests of the same key, project and model from the slice, in process, until one of them does not fit
in what is left; then the next admission goes to Redis, and the rest of the slice is given back. Admissions for
the same counters that arrive while it is on its way wait for the slice it brings, rather than each making a
round trip of its own; where it brings none (near a limit), they go on to Redis.

Exactness near a limit (the proofs of issue 4: of more requests than a limit allows, exactly the allowed
number is served, across processes and hosts) rests on three rules:
- **Slices shrink with the room.** n is at most a 1/(4 x workers) share of the room left on the tightest
  counter, and at most KEYWAY_ADMISSION_SLICE. Near a limit n is 0: every request goes to Redis, as before.
- **Slices are short.** Each is given back within KEYWAY_ADMISSION_SLICE_SECONDS of its grant, used or not
  (and is no longer used after that, even by a worker that stalled past it).
- **A refusal waits for them.** Redis keeps, per counter, how much of it is out in slices (the shard's
  `bill:sliced` hash). A request refused on a counter that still has room out in slices counts nothing and
  is asked again once they are back (at most 3 lifetimes); only then is a refusal final, and counted as one.

A slice's money is a hold in the worker's lease, like a request's, and its share of each counter is in the
lease too (fields `g|counter`): a worker that dies gives back everything it had out when its lease is reaped.
Rate-window slices are not in the lease (what was spent from them cannot be told apart): those of a dead
worker stay counted until their minute ends, which errs on the side of refusing.

What admitting from a slice reports in the rate-limit headers is the window as Redis counted it at the grant,
less what is left of the slice: this worker's view, as exact as the last round trip.

Measured with bench/hotpath_bench.py (PostgreSQL + Redis; function calls per request are deterministic, the
CPU is this machine's on a noisy day): a JSON chat at concurrency 32 makes 1,995 calls instead of 2,367 and
takes 1.91 ms of CPU instead of 2.80; at concurrency 1, 2,393 calls instead of 3,181. bench/targets.py counts
the admissions that took no round trip at c=32: 77-82 %.
"""

from __future__ import annotations

from typing import Any

# The ten counters of billing.counters.names(), by position.
REQUESTS, TOKENS, SPEND, CREDIT, ORG_MONTH, KEY_MONTH, PROJECT_MONTH, PROJECT_REQUESTS, PROJECT_TOKENS, PROJECT_DAY = (
    range(10)
)
# Those whose slice is a hold in the worker's lease.
MONEY = (SPEND, ORG_MONTH, KEY_MONTH, PROJECT_MONTH)
# Rate-limit windows reported in the headers.
_REPORTED = (REQUESTS, TOKENS, PROJECT_REQUESTS, PROJECT_TOKENS, PROJECT_DAY)


def demands(ask: Any) -> tuple[int, ...]:
    """What one request takes from each of the ten counters (as the admission script counts it)."""
    rated = ask.rpm > 0
    project = rated and ask.project_rpm > 0
    hold = ask.hold if ask.spend_seed >= 0 else 0
    return (
        1 if rated else 0,
        ask.estimated_tokens if rated else 0,
        hold,
        0,
        hold if ask.org_cap >= 0 else 0,
        hold if ask.key_cap >= 0 else 0,
        hold if ask.project_cap >= 0 else 0,
        1 if project else 0,
        ask.estimated_tokens if project else 0,
        1 if rated and ask.project_rpd > 0 else 0,
    )


def terms(ask: Any) -> tuple[int, ...]:
    """The limits a slice was granted under: a request under other limits (changed meanwhile, a credit top-up
    or adjustment) goes to Redis."""
    return (ask.rpm, ask.tpm, ask.prepaid, ask.spend_seed >= 0, ask.credit_version, ask.org_cap, ask.key_cap,
            ask.project_cap, ask.project_rpm, ask.project_tpm, ask.project_rpd)


class Slice:
    """Room for more requests, granted to one worker's lease, until `expires` (loop time)."""

    __slots__ = ("lease", "terms", "expires", "granted", "left", "counted")

    def __init__(self, ask: Any, *, lease: str, requests: int, counted: tuple[int, ...], expires: float) -> None:
        each = demands(ask)
        self.lease = lease
        self.terms = terms(ask)
        self.expires = expires
        self.granted = [requests * amount for amount in each]
        self.left = list(self.granted)
        # Each reported window as Redis counted it with the slice: the granting request's count, plus the slice.
        self.counted = [count + self.granted[index] for count, index in zip(counted, _REPORTED, strict=True)]

    def take(self, ask: Any, lease: str, now: float) -> tuple[int, ...] | None:
        """Admit one request from the slice: its windows as this worker counts them (as the script returns
        them), or None where it does not fit, the slice expired, or it was granted under other limits or
        another lease."""
        if now >= self.expires or lease != self.lease or terms(ask) != self.terms:
            return None
        each = demands(ask)
        left = self.left
        for index in range(10):
            if each[index] > left[index]:
                return None
        for index in range(10):
            left[index] -= each[index]
        return tuple(count - left[index] for count, index in zip(self.counted, _REPORTED, strict=True))

    def merge(self, older: Slice) -> None:
        """Take in what is left of an older slice for the same counters (granted while this one's request was
        on its way): one slice, given back once, no later than the older would have been."""
        if older.lease != self.lease or older.terms != self.terms:
            raise ValueError("slices of other leases or limits are given back, not merged")
        for index in range(10):
            self.left[index] += older.left[index]
            self.granted[index] += older.granted[index]
        self.expires = min(self.expires, older.expires)

    def given_back(self, names: tuple[str, ...]) -> tuple[dict[str, int], dict[str, int]]:
        """What giving the rest back settles: the counter moves, and what comes off the lease."""
        amounts = {names[index]: -left for index, left in enumerate(self.left) if left}
        released = {names[index]: self.left[index] for index in MONEY if self.left[index]}
        released.update({f"g|{names[index]}": granted for index, granted in enumerate(self.granted) if granted})
        return amounts, released
