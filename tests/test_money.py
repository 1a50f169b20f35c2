"""Exact credit amounts: parsing, formatting, rounding up and reading floats (no database)."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from litellm_credits.money import (
    MAX_MICRO,
    MICRO,
    AmountError,
    format_credits,
    micro_ceil,
    parse_credits,
    to_decimal,
)

# every amount a bigint column can hold
micro_amounts = st.integers(min_value=-MAX_MICRO, max_value=MAX_MICRO)


# --- format_credits / parse_credits ------------------------------------------------------------


@given(micro_amounts)
@example(0)
@example(1)
@example(-1)
@example(MAX_MICRO)
@example(-MAX_MICRO)
def test_format_then_parse_is_the_identity(micro: int) -> None:
    text = format_credits(micro)
    assert re.fullmatch(r"-?\d+\.\d{6}", text), text
    assert parse_credits(text) == micro


@given(micro_amounts)
def test_format_is_the_exact_decimal(micro: int) -> None:
    assert Fraction(Decimal(format_credits(micro))) == Fraction(micro, MICRO)


@given(micro_amounts, st.integers(min_value=0, max_value=6))
def test_parse_accepts_any_spelling_of_at_most_six_places(micro: int, places: int) -> None:
    # the same amount written with fewer places when it has trailing zeros
    value = Decimal(micro).scaleb(-6)
    if value == value.quantize(Decimal(1).scaleb(-places)):
        assert parse_credits(str(value.quantize(Decimal(1).scaleb(-places)))) == micro


@pytest.mark.parametrize(
    ("value", "micro"),
    [
        ("12.5", 12_500_000),
        ("0.000001", 1),
        ("-0.000001", -1),
        ("-0", 0),
        ("007.50", 7_500_000),
        ("9223372036854.775807", MAX_MICRO),
        (12, 12_000_000),
        (Decimal("0.25"), 250_000),
        (Decimal("1.50000000"), 1_500_000),  # a Decimal from code: trailing zeros are no places
        (Decimal("1E+3"), 1_000_000_000),
        (0.1, 100_000),  # a JSON float, read by its repr
        (1.000001, 1_000_001),
    ],
)
def test_parse_examples(value: object, micro: int) -> None:
    assert parse_credits(value) == micro


@given(st.integers(min_value=1, max_value=10**12), st.integers(min_value=7, max_value=40))
def test_parse_rejects_more_than_six_places(integer_part: int, places: int) -> None:
    # the last digit is not zero, so the amount really has `places` decimal places
    text = f"{integer_part}." + "0" * (places - 1) + "1"
    with pytest.raises(AmountError, match="decimal places"):
        parse_credits(text)
    with pytest.raises(AmountError, match="decimal places"):
        parse_credits("-" + text)


@pytest.mark.parametrize(
    "value",
    [
        "0.0000001",
        "1.50000000",  # written with eight places: the grammar allows six
        Decimal("0.0000005"),
        # more significant digits than the 28-digit decimal context: must not be rounded away
        "1.0000000000000000000000000000001",
        "0.0000010000000000000000000000000001",
        Decimal("1e-999999999"),
    ],
)
def test_parse_rejects_sub_micro_amounts(value: object) -> None:
    with pytest.raises(AmountError, match="decimal places"):
        parse_credits(value)


@pytest.mark.parametrize(
    "value",
    [
        "9223372036854.775808",  # one micro-credit past a bigint
        "-9223372036854.775808",
        "12345678901234567890123.000000",
        "1" + "0" * 100_000,  # refused by its length, before any big integer is built
        Decimal("1e999999999"),  # decimal.Overflow before the fix, a 500 instead of a 400
        Decimal("1e999990"),  # a million-digit integer built in ~30 s of CPU before the fix
        10**30,
    ],
)
def test_parse_rejects_amounts_no_bigint_holds(value: object) -> None:
    with pytest.raises(AmountError, match="too large"):
        parse_credits(value)


@pytest.mark.parametrize(
    "value",
    [
        "NaN",
        "nan",
        "sNaN",
        "-NaN",
        "Infinity",
        "-Infinity",
        "inf",
        float("nan"),
        float("inf"),
        -math.inf,
        Decimal("NaN"),
        Decimal("-Infinity"),
    ],
)
def test_non_finite_amounts_are_refused(value: object) -> None:
    with pytest.raises(AmountError, match="finite"):
        parse_credits(value)
    with pytest.raises(AmountError):
        to_decimal(value)


@pytest.mark.parametrize("value", [True, False])
def test_booleans_are_not_amounts(value: bool) -> None:
    # bool is an int subclass: True must not silently become one credit
    with pytest.raises(AmountError, match="boolean"):
        parse_credits(value)
    with pytest.raises(AmountError, match="boolean"):
        to_decimal(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "abc",
        "12,5",
        "1.2.3",
        "0x10",
        "1e",
        "--1",
        "1 000",
        "12.5 credits",
        "$5",
        None,
        [],
        {},
        b"12",
        object(),
    ],
)
def test_garbage_is_refused(value: object) -> None:
    with pytest.raises(AmountError):
        parse_credits(value)


@pytest.mark.parametrize(
    "value",
    [
        "１",  # full-width digit one: Decimal("１") is 1
        "١",  # Arabic-Indic one
        "١٢.٥",
        "０.５",
        "0_1",  # Decimal("0_1") is 1
        "1_000",
        "1e3",
        "1E+3",
        "1e-6",
        1e-7,  # a JSON float whose shortest repr has an exponent
        1.1e-6,
        1e16,
        "+1",
        " 1",
        "1 ",
        "1\n",
        "1.",
        ".5",
        "１e3",
    ],
)
def test_only_plain_ascii_decimals_are_amounts(value: object) -> None:
    """Regression: full-width and Arabic-Indic digits, underscores and exponents were taken as
    amounts (Python's Decimal accepts them) and really changed balances through the API."""
    with pytest.raises(AmountError):
        parse_credits(value)


@pytest.mark.parametrize("value", ["1e3", "1E-6", 1e-7])
def test_an_exponent_is_refused_with_a_hint(value: object) -> None:
    with pytest.raises(AmountError, match="without an exponent"):
        parse_credits(value)


@pytest.mark.parametrize("value", ["１", "0_1", "٣e-7", "1 000"])
def test_prices_are_ascii_decimals_too(value: str) -> None:
    with pytest.raises(AmountError):
        to_decimal(value)


def test_amount_error_is_a_value_error() -> None:
    # pydantic validators turn ValueError into a 422/400, anything else into a 500
    assert issubclass(AmountError, ValueError)


# --- micro_ceil ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("credits", "micro"),
    [
        (Decimal(0), 0),
        (Decimal("2.5"), 2_500_000),
        (Decimal("0.0000001"), 1),
        (Decimal("0.0000010000001"), 2),
        (Decimal("1E-30"), 1),
        # beyond the 28-digit context: rounding to it first would give 1
        (Decimal("0.0000010000000000000000000000000001"), 2),
        # negatives round toward +infinity, i.e. toward zero (a refund is never rounded up in size)
        (Decimal("-0.0000001"), 0),
        (Decimal("-0.0000019"), -1),
        (Decimal("-1.0000005"), -1_000_000),
        (Decimal("-2"), -2_000_000),
    ],
)
def test_micro_ceil_examples(credits: Decimal, micro: int) -> None:
    assert micro_ceil(credits) == micro


@given(st.decimals(allow_nan=False, allow_infinity=False, min_value=-(10**13), max_value=10**13))
@example(Decimal("0.0000010000000000000000000000000001"))
@example(Decimal("-0.0000009999999999999999999999999999"))
def test_micro_ceil_is_the_ceiling_of_the_exact_value(credits: Decimal) -> None:
    exact = Fraction(credits) * MICRO
    result = micro_ceil(credits)
    assert result == math.ceil(exact)
    assert result - 1 < exact <= result


@given(micro_amounts)
def test_micro_ceil_leaves_whole_micro_credits_alone(micro: int) -> None:
    assert micro_ceil(Decimal(micro).scaleb(-6)) == micro


# --- to_decimal ---------------------------------------------------------------------------------


def test_float_is_read_by_its_shortest_repr() -> None:
    assert to_decimal(1.1e-6) == Decimal("0.0000011")
    binary = 1.1e-6
    assert to_decimal(binary) != Decimal(binary)  # the binary value is 1.09999999999999995…e-06
    assert to_decimal(3.3e-6) * 1000 == Decimal("0.0033")
    assert to_decimal(0.1) + to_decimal(0.2) == Decimal("0.3")


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_to_decimal_of_any_float_is_its_repr(f: float) -> None:
    d = to_decimal(f)
    assert d == Decimal(repr(f))
    assert float(d) == f  # and it still names the same float


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (7, Decimal(7)),
        (-7, Decimal(-7)),
        (10**40, Decimal(10**40)),
        (" 1.25 ", Decimal("1.25")),
        ("3e-7", Decimal("0.0000003")),
        (Decimal("0.5"), Decimal("0.5")),
    ],
)
def test_to_decimal_examples(value: object, expected: Decimal) -> None:
    assert to_decimal(value) == expected


def test_a_json_number_amount_is_read_as_written_not_as_a_float() -> None:
    """Regression (review): a JSON number went through float, so 123456789012.123456 became
    123456789012.12346 (a wrong amount, without an error), and 1e2 passed the no-exponent rule."""
    from pydantic import ValidationError

    from litellm_credits.api.routes import parse_json_object
    from litellm_credits.api.schemas import Deduct

    def deduct(amount: str) -> Deduct:
        body = b'{"user_id": "a", "idempotency_key": "k", "amount": ' + amount.encode() + b"}"
        return Deduct.model_validate(parse_json_object(body))

    assert deduct("123456789012.123456").amount == 123_456_789_012_123_456
    assert deduct("12.5").amount == 12_500_000
    assert deduct("7").amount == 7_000_000
    for refused in ("1e2", "1E-6", "0.0000001", "1.0000000"):
        with pytest.raises(ValidationError):
            deduct(refused)
