"""Exact credit amounts.

Credits are stored and computed as integers of micro-credits (1 credit = 1,000,000 units), so
no float ever touches a balance. At the API boundary they are decimal strings with at most six
places ("12.5", "0.000001"). Prices arrive in USD as decimals and are converted with
``credits_per_usd``; a charge is rounded *up* to the next micro-credit, so the operator never
under-collects by a rounding error.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

MICRO = 1_000_000
PLACES = 6
_QUANTUM = Decimal(1).scaleb(-PLACES)


class AmountError(ValueError):
    """An amount that is not a finite decimal with at most six places."""


def to_decimal(value: Any) -> Decimal:
    """A Decimal for a price or amount given as str, int, Decimal or a YAML/JSON float.

    A float is taken by its shortest repr, which is the decimal the operator wrote: a YAML
    ``1.1e-6`` becomes exactly ``0.0000011``, not ``1.0999999999999999e-06``.
    """
    if isinstance(value, bool):
        raise AmountError("a boolean is not an amount")
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, float):
        d = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            d = Decimal(value.strip())
        except InvalidOperation as exc:
            raise AmountError(f"not a decimal number: {value!r}") from exc
    else:
        raise AmountError(f"not a decimal number: {value!r}")
    if not d.is_finite():
        raise AmountError("amount must be finite")
    return d


def parse_credits(value: Any) -> int:
    """Micro-credits for an amount of credits; more than six decimal places is an error."""
    d = to_decimal(value)
    scaled = d.scaleb(PLACES)
    if scaled != scaled.to_integral_value():
        raise AmountError(f"at most {PLACES} decimal places are allowed")
    return int(scaled)


def micro_ceil(credits: Decimal) -> int:
    """Micro-credits for an exact credit amount, rounded up to the smallest unit."""
    return int(credits.scaleb(PLACES).to_integral_value(rounding=ROUND_CEILING))


def format_credits(micro: int) -> str:
    """The decimal string for an amount of micro-credits, always with six places."""
    return str((Decimal(micro).scaleb(-PLACES)).quantize(_QUANTUM))


__all__ = ["MICRO", "PLACES", "AmountError", "format_credits", "micro_ceil", "parse_credits", "to_decimal"]
