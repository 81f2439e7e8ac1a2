"""What a request costs, and the terms an organization buys at, as the hot path sees them.

Cost is integer arithmetic on micro-USD: prices are per million tokens and the plan multiplier is carried
in ten-thousandths, so a cost is one ceiling division, never a float. Rounding up means a request that
used anything priced costs at least one micro-USD, and the reservation (computed the same way from the
worst case) is never smaller than what settlement charges for the same tokens.

Prices and account terms are read from the database at most every KEYWAY_BILLING_LOCAL_TTL seconds per
process, one query at a time (single flight), so no request waits on the ORM except the first of a process.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from platform_site.kernel.conf import settings  # Django's, read faster (the module says why)
from platform_site.kernel.singleflight import SingleFlight

_MULTIPLIER_SCALE = 10_000
_TOKENS_PER_PRICE_UNIT = 1_000_000


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Micro-USD per million tokens."""

    input: int
    cached_input: int
    output: int


def cost_micros(
    price: ModelPrice | None, *, multiplier: int, prompt_tokens: int, cached_tokens: int, completion_tokens: int
) -> int:
    """The cost of some tokens in micro-USD, rounded up. `multiplier` is in ten-thousandths (1.0 → 10000)."""
    if price is None:
        return 0
    cached = min(max(cached_tokens, 0), max(prompt_tokens, 0))
    uncached = max(prompt_tokens, 0) - cached
    raw = uncached * price.input + cached * price.cached_input + max(completion_tokens, 0) * price.output
    scaled = raw * multiplier
    divisor = _TOKENS_PER_PRICE_UNIT * _MULTIPLIER_SCALE
    return -(-scaled // divisor)


def multiplier_units(value: Decimal) -> int:
    return int((value * _MULTIPLIER_SCALE).to_integral_value())


@dataclass(frozen=True, slots=True)
class AccountTerms:
    """An organization's billing terms, and the totals its shared counters start from."""

    organization_id: int
    prepaid: bool
    multiplier: int  # ten-thousandths
    default_rpm: int | None
    default_tpm: int | None
    monthly_budget_micros: int | None
    credit_total_micros: int
    credit_version: int
    usage_total_micros: int


def _load_terms(organization_id: int) -> AccountTerms:
    from billing.models import Plan
    from billing.services import billing_account_for

    account = billing_account_for(organization_id=organization_id)
    plan = account.plan
    return AccountTerms(
        organization_id=organization_id,
        prepaid=account.billing_mode == Plan.Mode.PREPAID,
        multiplier=multiplier_units(plan.price_multiplier) if plan is not None else _MULTIPLIER_SCALE,
        default_rpm=plan.default_rpm if plan is not None else None,
        default_tpm=plan.default_tpm if plan is not None else None,
        monthly_budget_micros=account.effective_monthly_budget_micros,
        credit_total_micros=account.credit_total_micros,
        credit_version=account.credit_version,
        usage_total_micros=account.usage_total_micros,
    )


def _load_prices(_: None) -> dict[str, ModelPrice]:
    from billing.models import Price

    return {
        row.model: ModelPrice(
            input=row.input_per_million_micros,
            cached_input=row.cached_input_per_million_micros,
            output=row.output_per_million_micros,
        )
        for row in Price.objects.all()
    }


def _ttl() -> float:
    return float(settings.KEYWAY_BILLING_LOCAL_TTL)


_terms: SingleFlight[int, AccountTerms] = SingleFlight(_load_terms, ttl=_ttl, stale_if_error=True)
_prices: SingleFlight[None, dict[str, ModelPrice]] = SingleFlight(_load_prices, ttl=_ttl, stale_if_error=True)


def wanted_terms(organization_id: int) -> tuple[SingleFlight[int, AccountTerms], int]:
    """The organization's terms, for singleflight.prefetch."""
    return _terms, organization_id


def wanted_prices() -> tuple[SingleFlight[None, dict[str, ModelPrice]], None]:
    """The price table, for singleflight.prefetch."""
    return _prices, None


async def account_terms(organization_id: int) -> AccountTerms:
    return await _terms.get(organization_id)


async def price_table() -> dict[str, ModelPrice]:
    return await _prices.get(None)


def forget_cached_terms(organization_id: int | None = None) -> None:
    """Drop this process's copies (after a credit change, and between tests)."""
    _terms.invalidate(organization_id)
    if organization_id is None:
        _prices.invalidate()
