"""Exact credit amounts.

Credits are stored and computed as integers of micro-credits (1 credit = 1,000,000 units), so
no float ever touches a balance. At the API boundary they are decimal strings with at most six
places ("12.5", "0.000001"). Prices arrive in USD as decimals and are converted with
``credits_per_usd``; a charge is rounded *up* to the next micro-credit, so the operator never
under-collects by a rounding error.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

MICRO = 1_000_000
PLACES = 6
_QUANTUM = Decimal(1).scaleb(-PLACES)
# the largest amount a PostgreSQL bigint column holds, in micro-credits (about 9.2 million million credits)
MAX_MICRO = 2**63 - 1
MAX_DIGITS = len(str(MAX_MICRO))  # 19


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
    """Micro-credits for an amount of credits; more than six decimal places is an error, and so
    is an amount beyond what a PostgreSQL bigint holds.

    Exact: the decimal's digits are read directly, never rounded to the 28-digit decimal context,
    and an absurd exponent (``"1e999999"``) is refused before any big integer is built.
    """
    d = to_decimal(value)
    if d.is_zero():
        return 0
    if d.adjusted() > MAX_DIGITS - PLACES:
        raise AmountError("amount is too large")
    sign, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)  # finite: checked by to_decimal
    text = "".join(map(str, digits))
    significant = text.rstrip("0")  # trailing zeros are no decimal places: "1.50000000" is fine
    exponent += len(text) - len(significant)
    if exponent < -PLACES:
        raise AmountError(f"at most {PLACES} decimal places are allowed")
    micro = int(significant) * 10 ** (exponent + PLACES)  # at most 20 digits here
    if micro > MAX_MICRO:
        raise AmountError("amount is too large")
    return -micro if sign else micro


def micro_ceil(credits: Decimal) -> int:
    """Micro-credits for an exact credit amount, rounded up (toward +infinity) to the smallest
    unit. Exact for any finite Decimal: no rounding to the decimal context happens first."""
    numerator, denominator = credits.as_integer_ratio()
    return -((-numerator * MICRO) // denominator)


def format_credits(micro: int) -> str:
    """The decimal string for an amount of micro-credits, always with six places."""
    return str((Decimal(micro).scaleb(-PLACES)).quantize(_QUANTUM))


__all__ = [
    "MAX_MICRO",
    "MICRO",
    "PLACES",
    "AmountError",
    "format_credits",
    "micro_ceil",
    "parse_credits",
    "to_decimal",
]
