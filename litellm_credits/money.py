"""Exact credit amounts.

Credits are stored and computed as integers of micro-credits (1 credit = 1,000,000 units), so
no float ever touches a balance. At the API boundary they are decimal strings with at most six
places ("12.5", "0.000001"). Prices arrive in USD as decimals and are converted with
``credits_per_usd``; a charge is rounded *up* to the next micro-credit, so the operator never
under-collects by a rounding error.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

MICRO = 1_000_000
PLACES = 6
_QUANTUM = Decimal(1).scaleb(-PLACES)
# the largest amount a PostgreSQL bigint column holds, in micro-credits (about 9.2 million million credits)
MAX_MICRO = 2**63 - 1
MAX_DIGITS = len(str(MAX_MICRO))  # 19


class AmountError(ValueError):
    """An amount that does not follow the grammar of :func:`parse_credits`."""


class JSONNumber:
    """A JSON number with a fraction or an exponent, kept as written (``json.loads(...,
    parse_float=JSONNumber)``), so that an amount is held to the grammar as the client wrote it:
    a float would turn ``123456789012.123456`` into ``123456789012.12346``, and a Decimal
    ``1E-6`` into ``0.000001``."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


# ASCII digits only: ``str.isdigit`` and ``Decimal`` also take "１" (full width), "١" (Arabic-Indic)
# and "1_000", which must never become money
_AMOUNT = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NON_FINITE = frozenset({"nan", "snan", "inf", "infinity"})


def _not_a_number(text: str) -> AmountError:
    if text.strip().lstrip("+-").lower() in _NON_FINITE:
        return AmountError("amount must be finite")
    return AmountError(f"not a decimal number: {text[:40]!r}")


def to_decimal(value: Any) -> Decimal:
    """A Decimal for a price or a rate given as str, int, Decimal or a YAML/JSON float.

    A float is taken by its shortest repr, which is the decimal the operator wrote: a YAML
    ``1.1e-6`` becomes exactly ``0.0000011``, not ``1.0999999999999999e-06``. A string must be an
    ASCII decimal, optionally in E notation (prices per token are tiny): ``"3e-7"``, ``"0.5"``.
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
        text = value.strip()
        if not _NUMBER.fullmatch(text):
            raise _not_a_number(value)
        d = Decimal(text)
    else:
        raise AmountError(f"not a decimal number: {type(value).__name__}")
    if not d.is_finite():
        raise AmountError("amount must be finite")
    return d


def parse_credits(value: Any) -> int:
    """Micro-credits for an amount of credits: the one parser of every money input (API, CLI,
    configuration).

    Grammar of a written amount (a string, or the shortest repr of a JSON/YAML float)::

        amount   = [ "-" ] integer [ "." fraction ]
        integer  = 1*DIGIT
        fraction = 1*6DIGIT
        DIGIT    = %x30-39                ; ASCII "0" to "9", nothing else

    No whitespace, no "+", no exponent, no underscores, no other digit systems, at most six
    decimal places, and at most what a PostgreSQL bigint holds (9223372036854.775807). The
    sign is the caller's rule: the API refuses a negative or zero amount where it needs a
    positive one. A JSON integer (not a boolean) is that many credits; a ``Decimal`` (from code)
    is read by its exact digits, never rounded to the 28-digit decimal context.

        >>> parse_credits("12.5"), parse_credits("0.000001"), parse_credits(3)
        (12500000, 1, 3000000)
    """
    if isinstance(value, bool):
        raise AmountError("a boolean is not an amount")
    if isinstance(value, int):
        if abs(value) > MAX_MICRO // MICRO:
            raise AmountError("amount is too large")
        return value * MICRO
    if isinstance(value, Decimal):
        return _decimal_micro(value)
    if isinstance(value, JSONNumber):
        text = value.text
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise AmountError("amount must be finite")
        text = repr(value)
    elif isinstance(value, str):
        text = value
    else:
        raise AmountError(f"not a decimal number: {type(value).__name__}")
    m = _AMOUNT.fullmatch(text)
    if m is None:
        if _NUMBER.fullmatch(text.strip()) and "e" in text.lower():
            raise AmountError('write the amount without an exponent, e.g. "0.000001"')
        raise _not_a_number(text)
    sign, integer, fraction = m.group(1), m.group(2).lstrip("0"), m.group(3) or ""
    if len(fraction) > PLACES:
        raise AmountError(f"at most {PLACES} decimal places are allowed")
    if len(integer) > MAX_DIGITS - PLACES:
        raise AmountError("amount is too large")
    micro = int(integer or "0") * MICRO + int(fraction.ljust(PLACES, "0"))
    if micro > MAX_MICRO:
        raise AmountError("amount is too large")
    return -micro if sign else micro


def _decimal_micro(d: Decimal) -> int:
    """Micro-credits of a Decimal, exactly; an absurd exponent is refused before any big integer
    is built."""
    if not d.is_finite():
        raise AmountError("amount must be finite")
    if d.is_zero():
        return 0
    if d.adjusted() > MAX_DIGITS - PLACES:
        raise AmountError("amount is too large")
    sign, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)  # finite: checked above
    text = "".join(map(str, digits))
    significant = text.rstrip("0")  # trailing zeros are no decimal places: Decimal("1.50000000")
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
    "JSONNumber",
    "format_credits",
    "micro_ceil",
    "parse_credits",
    "to_decimal",
]
