"""Converting between integer micro-USD, which every ledger stores, and the USD people type and read.

Both directions are exact: USD goes through Decimal, never a float, and an amount finer than one micro-USD
is refused rather than rounded, so what staff type is what the ledger records.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from billing.models import MICROS_PER_USD


def usd_to_micros(amount: Decimal | str) -> int:
    """Exact micro-USD of a USD amount; ValueError when it is not a number or is finer than 0.000001 USD."""
    try:
        usd = Decimal(amount)
    except InvalidOperation:
        raise ValueError(f"{amount!r} is not an amount in USD.") from None
    if not usd.is_finite():
        raise ValueError(f"{amount!r} is not an amount in USD.")
    micros = usd * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise ValueError(f"{amount} USD is finer than one micro-USD (0.000001 USD).")
    return int(micros)


def micros_to_usd(micros: int) -> str:
    """The USD string of a micro-USD amount, with all six decimals: 1234 → "0.001234", -5000000 → "-5.000000"."""
    return f"{Decimal(micros).scaleb(-6):.6f}"


def usd_display(micros: int) -> str:
    """A micro-USD amount for people: at least cents, more digits only where they are not zero, so a tiny
    spend is never shown as nothing: 0 → "0.00", 12500000 → "12.50", 1234 → "0.001234"."""
    text = micros_to_usd(micros)
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.rstrip('0').ljust(2, '0')}"


def usd_summary(micros: int) -> str:
    """A total for a glance: whole cents with thousands separators from one USD up ("12,345.68"), and
    usd_display's exact digits below it, where cents would hide what was spent ("0.001234")."""
    if abs(micros) < MICROS_PER_USD:
        return usd_display(micros)
    cents = (Decimal(micros) / 10_000).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    return f"{cents / 100:,.2f}"
