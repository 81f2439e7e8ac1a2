"""Metering of one model call: admit (rate limits and a reservation of the worst-case cost) before it,
settle (the real cost, released hold, ledger event) after it.

Calls, not requests, are metered: one HTTP request, one WebSocket connection or one agent run may make many
calls, each with its own id (the ledger's idempotency key), and each usage event also names the request and,
where there is one, the session or connection it belongs to. The engine (completions.engine.calls) is the
only caller:

    meter = await admit(key=..., call_id=..., request_id=..., endpoint=..., models=[...], ...)
    try:
        ...call the model...
    finally:
        meter.settle(...)   # synchronous: safe in the finally of a cancelled stream

A call that failed before producing anything settles at zero, which releases its whole hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from django.db.models import Sum

from apikeys.auth import AuthenticatedKey
from billing import counters, keys
from billing.exceptions import CountersUnavailable, QuotaExceeded, RateLimitExceeded
from billing.ledger import ledger
from billing.limits import project_limits, wanted_limits
from billing.models import UsageDaily, UsageEvent
from billing.pricing import (
    AccountTerms,
    ModelPrice,
    account_terms,
    cost_micros,
    price_table,
    wanted_prices,
    wanted_terms,
)
from billing.ratelimits import WINDOW, RateState, tighter
from billing.services import SettledUsage
from platform_site.kernel import breaker, metrics
from platform_site.kernel.conf import settings  # Django's, read faster (the module says why)
from platform_site.kernel.orm import orm
from platform_site.kernel.singleflight import prefetch

Endpoint = UsageEvent.Endpoint
Status = UsageEvent.Status
UsageSource = UsageEvent.UsageSource

# Calls of this process admitted and not settled yet. A call that settles while no other is under way sends its
# settlement at once (counters.settle_later's `alone`): no other could join its batch on the loop's next turn.
_open_meters = 0

_QUOTA_CODES = {
    counters.REFUSED_CREDIT: "insufficient_quota",
    counters.REFUSED_ORG_BUDGET: "organization_budget_exceeded",
    counters.REFUSED_KEY_BUDGET: "key_budget_exceeded",
    counters.REFUSED_PROJECT_BUDGET: "project_budget_exceeded",
}


@dataclass(slots=True)
class Meter:
    key: AuthenticatedKey
    call_id: str
    request_id: str
    session_id: str
    endpoint: int
    terms: AccountTerms | None
    prices: dict[str, ModelPrice]
    hold: int
    # The counters the hold was added to; settlement moves each by (cost − hold).
    hold_counters: tuple[str, ...]
    # The token windows (the key's, the project's for the model) that settlement adds the call's tokens to.
    tokens_counters: tuple[str, ...]
    # The admitting worker's lease in the shared counters ("" in-process).
    lease: str
    started_at: float
    started_clock: float = field(default_factory=time.monotonic)
    rate_state: RateState | None = None
    first_token_clock: float | None = None
    settled: bool = False
    # Tokens the admission added to the token windows (its estimate), which settlement replaces.
    reserved_tokens: int = 0
    # What the call was charged for, once settled (a surface that reports usage reports exactly this).
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def rate_headers(self) -> dict[str, str]:
        return self.rate_state.headers() if self.rate_state is not None else {}

    def first_token(self) -> None:
        if self.first_token_clock is None:
            self.first_token_clock = time.monotonic()

    def settle(
        self,
        *,
        model: str,
        status: int,
        usage_source: int,
        prompt_tokens: int = 0,
        cached_tokens: int = 0,
        completion_tokens: int = 0,
        deployment_id: int | None = None,
        provider: str = "",
    ) -> int:
        """Charge the real cost, release the rest of the hold, and queue the usage event (see `recorded`).
        Returns the cost in micro-USD; a second call does nothing and returns 0."""
        if self.settled:
            return 0
        self.settled = True
        global _open_meters
        _open_meters -= 1
        self.prompt_tokens, self.cached_tokens, self.completion_tokens = prompt_tokens, cached_tokens, completion_tokens
        cost = 0
        event = None
        if self.terms is not None:
            cost = cost_micros(
                self.prices.get(model),
                multiplier=self.terms.multiplier,
                prompt_tokens=prompt_tokens,
                cached_tokens=cached_tokens,
                completion_tokens=completion_tokens,
            )
            now = time.monotonic()
            event = SettledUsage(
                call_id=self.call_id,
                request_id=self.request_id,
                session_id=self.session_id,
                organization_id=self.key.organization_id,
                api_key_id=self.key.id,
                project_id=self.key.project_id,
                endpoint=self.endpoint,
                model=model,
                deployment_id=deployment_id,
                provider=provider,
                prompt_tokens=prompt_tokens,
                cached_tokens=cached_tokens,
                completion_tokens=completion_tokens,
                cost_micros=cost,
                status=status,
                usage_source=usage_source,
                latency_ms=int((now - self.started_clock) * 1000),
                ttft_ms=(
                    int((self.first_token_clock - self.started_clock) * 1000)
                    if self.first_token_clock is not None
                    else None
                ),
                created_at=self.started_at,
            )
        adjustments = {name: cost - self.hold for name in self.hold_counters}
        if self.rate_state is not None:
            for name in self.tokens_counters:
                adjustments[name] = prompt_tokens + completion_tokens - self.reserved_tokens
        # With the event, in one step: without Redis the event is journaled now; with Redis it reaches the
        # usage stream in the same atomic step as the counters (billing.counters).
        counters.settle_later(
            adjustments, lease=self.lease, released={name: self.hold for name in self.hold_counters}, event=event,
            alone=_open_meters <= 0,
        )
        metrics.usage_settled(model, Status(status).label, prompt_tokens, completion_tokens, cost)
        return cost

    async def recorded(self) -> None:
        """Wait until this settled call's usage event is where a lost host cannot take it: the shared usage
        stream (or this host's journal while Redis is away). A surface awaits it before the answer's last
        bytes, so that every answer a client received is in the ledger, whichever host dies next."""
        if self.settled and self.terms is not None:
            await counters.recorded()


def _limits(key: AuthenticatedKey, terms: AccountTerms | None) -> tuple[int, int]:
    if not settings.KEYWAY_RATE_LIMITS:
        return 0, 0
    rpm = key.rpm_limit or (terms.default_rpm if terms else None) or settings.KEYWAY_DEFAULT_RPM
    tpm = key.tpm_limit or (terms.default_tpm if terms else None) or settings.KEYWAY_DEFAULT_TPM
    return rpm, tpm


def _month_spend(*, organization_id: int, started_at: float, **scope: int) -> int:
    """This calendar month's charges from the ledger, of the organization or of one of its keys or projects
    (`api_key_id=` / `project_id=`): seeds a cap counter the first time it is needed."""
    month = time.gmtime(started_at)
    # The daily roll-ups, written in the ledger's transactions, hold the same sums in a few rows a month.
    rows = UsageDaily.objects.filter(
        organization_id=organization_id, day__year=month.tm_year, day__month=month.tm_mon, **scope
    )
    return int(rows.aggregate(total=Sum("cost_micros"))["total"] or 0)


async def admit(
    *,
    key: AuthenticatedKey,
    call_id: str,
    request_id: str,
    session_id: str = "",
    endpoint: int,
    models: list[str],
    prompt_tokens: int,
    max_output_tokens: int,
    worst_prompt_tokens: int | None = None,
) -> Meter:
    """Count the request against the key's rate limits and its project's for the requested model (the first
    of `models`), and reserve its worst-case cost (the dearest of `models`, for `prompt_tokens` in and
    `max_output_tokens` out) against credit and every monthly cap. Raises RateLimitExceeded or QuotaExceeded,
    with nothing reserved. `worst_prompt_tokens` reserves for a larger prompt than the estimate counted
    against TPM: the most the prompt can be counted at, or a bound where the prompt is not known (a relayed
    realtime session's conversation lives upstream)."""
    now = time.time()
    names = counters.names(
        organization_id=key.organization_id,
        key_public_id=key.public_id,
        key_id=key.id,
        project_id=key.project_id,
        model=models[0],
        now=now,
    )
    if settings.KEYWAY_METERING:
        # After a quiet spell all three are due: loaded in one ORM visit rather than one after another.
        prefetch(wanted_terms(key.organization_id), wanted_prices(),
                 *((wanted_limits(key.project_id),) if key.project_id is not None else ()))
    terms = await account_terms(key.organization_id) if settings.KEYWAY_METERING else None
    project = await project_limits(key.project_id) if key.project_id is not None else None
    rpm, tpm = _limits(key, terms)
    prices = await price_table() if terms is not None else {}
    hold = 0
    org_cap = key_cap = project_cap = -1
    hold_counters: list[str] = []
    if terms is not None:
        hold = max(
            cost_micros(prices.get(model), multiplier=terms.multiplier,
                        prompt_tokens=max(prompt_tokens, worst_prompt_tokens or 0),
                        cached_tokens=0, completion_tokens=max_output_tokens)
            for model in models
        )
        hold_counters.append(names[2])
        if terms.monthly_budget_micros is not None:
            org_cap = terms.monthly_budget_micros
            hold_counters.append(names[4])
        if key.monthly_budget_micros is not None:
            key_cap = key.monthly_budget_micros
            hold_counters.append(names[5])
        if project is not None and project.monthly_budget_micros is not None:
            project_cap = project.monthly_budget_micros
            hold_counters.append(names[6])
    project_limit = project.for_model(models[0]) if project is not None and rpm else None
    lease, rate_state = "", None
    if terms is not None or rpm:
        ask = counters.Ask(
            keys=names,
            rpm=rpm,
            tpm=tpm,
            estimated_tokens=prompt_tokens + max_output_tokens,
            hold=hold,
            prepaid=terms is not None and terms.prepaid,
            spend_seed=terms.usage_total_micros if terms is not None else -1,
            credit_total=terms.credit_total_micros if terms is not None else 0,
            credit_version=terms.credit_version if terms is not None else 0,
            org_cap=org_cap,
            key_cap=key_cap,
            project_cap=project_cap,
            project_rpm=project_limit.requests_per_minute if project_limit is not None else 0,
            project_tpm=project_limit.tokens_per_minute if project_limit is not None else 0,
            project_rpd=project_limit.requests_per_day if project_limit is not None else 0,
            shard=keys.shard_of(key.organization_id),
        )
        try:
            lease, rate_state = await _count_and_reserve(ask, key=key, model=models[0], now=now)
        except breaker.Unavailable:
            _without_counters(ask)
            hold = 0  # nothing was reserved: settlement adds the whole cost, where the counters still exist
    global _open_meters
    _open_meters += 1
    return Meter(
        key=key,
        call_id=call_id,
        request_id=request_id,
        session_id=session_id,
        endpoint=endpoint,
        terms=terms,
        prices=prices,
        hold=hold,
        hold_counters=tuple(hold_counters),
        tokens_counters=(names[1], names[8]) if project_limit is not None else (names[1],),
        # The lease the admission wrote to, not the store's current one: a heartbeat may rename the worker
        # while the admission is in flight.
        lease=lease,
        started_at=now,
        rate_state=rate_state,
        reserved_tokens=prompt_tokens + max_output_tokens if rate_state is not None else 0,
    )


def _without_counters(ask: counters.Ask) -> None:
    """Redis is unreachable: refuse what must not run uncounted (prepaid credit and spend caps always; rate
    limits unless KEYWAY_RATE_LIMITS_WITHOUT_REDIS is "open"), or let the call run without a reservation."""
    if ask.prepaid or max(ask.org_cap, ask.key_cap, ask.project_cap) >= 0:
        raise CountersUnavailable("billing_unavailable")
    if ask.rpm and settings.KEYWAY_RATE_LIMITS_WITHOUT_REDIS == "closed":
        raise CountersUnavailable("rate_limits_unavailable")


_SEEDS = {
    # status: (the counter it asks for, the ledger rows that seed it)
    counters.NEEDS_ORG_MONTH: (4, lambda key: {}),
    counters.NEEDS_KEY_MONTH: (5, lambda key: {"api_key_id": key.id}),
    counters.NEEDS_PROJECT_MONTH: (6, lambda key: {"project_id": key.project_id}),
}


def _window(rpm: int, requests: int, tpm: int, tokens: int, tokens_counter: str, reset: float) -> RateState:
    """A rate window after this request: tokens settled but not yet sent to the counters count as used."""
    return RateState(
        limit_requests=rpm,
        remaining_requests=rpm - requests,
        limit_tokens=tpm,
        remaining_tokens=tpm - tokens - counters.unsent(tokens_counter),
        reset=reset,
    )


async def _count_and_reserve(
    ask: counters.Ask, *, key: AuthenticatedKey, model: str, now: float
) -> tuple[str, RateState | None]:
    """The admission step itself; returns the lease holding the reservation and the rate-limit state, or
    raises with nothing reserved."""
    store = counters.store()
    counted = await store.admit(ask)
    while counted.status in _SEEDS:
        # First request of the month (or of this Redis) under a cap: seed the counter from the ledger.
        await counters.flush()
        await ledger.flush()
        index, scope = _SEEDS[counted.status]
        spent = await orm(_month_spend, organization_id=key.organization_id, started_at=now, **scope(key))
        await store.seed({ask.keys[index]: spent})
        counted = await store.admit(ask)
    status = counted.status
    rate_state = None
    reset = WINDOW - now % WINDOW
    if ask.rpm:
        key_state = _window(ask.rpm, counted.requests, ask.tpm, counted.tokens, ask.keys[1], reset)
        rate_state = key_state
        if ask.project_rpm and status not in (counters.REFUSED_REQUESTS, counters.REFUSED_TOKENS):
            # The headers tell the tighter of the two windows, as a client pacing itself needs.
            project_state = _window(
                ask.project_rpm, counted.project_requests, ask.project_tpm, counted.project_tokens, ask.keys[8], reset
            )
            rate_state = tighter(key_state, project_state)
            if status in (counters.REFUSED_PROJECT_REQUESTS, counters.REFUSED_PROJECT_TOKENS):
                requests = status == counters.REFUSED_PROJECT_REQUESTS
                raise RateLimitExceeded(
                    kind="requests" if requests else "tokens",
                    limit=ask.project_rpm if requests else ask.project_tpm,
                    retry_after=project_state.retry_after,
                    headers=rate_state.headers(),
                    where=f"for {model} in project {key.project_public_id}",
                )
        if status == counters.REFUSED_PROJECT_DAY:
            until_midnight = counters.DAY - now % counters.DAY
            raise RateLimitExceeded(
                kind="requests",
                limit=ask.project_rpd,
                retry_after=max(int(until_midnight + 0.999), 1),
                headers=rate_state.headers(),
                where=f"for {model} in project {key.project_public_id}",
                per="day",
            )
    if status == counters.REFUSED_REQUESTS or status == counters.REFUSED_TOKENS:
        assert rate_state is not None
        raise RateLimitExceeded(
            kind="requests" if status == counters.REFUSED_REQUESTS else "tokens",
            limit=ask.rpm if status == counters.REFUSED_REQUESTS else ask.tpm,
            retry_after=rate_state.retry_after,
            headers=rate_state.headers(),
        )
    if status in _QUOTA_CODES:
        raise QuotaExceeded(_QUOTA_CODES[status], headers=rate_state.headers() if rate_state else None)
    return counted.lease, rate_state


def reset() -> None:
    """Forget the calls left open (tests)."""
    global _open_meters
    _open_meters = 0


async def flush() -> None:
    """Send queued counter adjustments and write the buffered usage events (tests, shutdown)."""
    await counters.flush()
    await ledger.flush()
