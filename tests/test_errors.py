"""The exception hierarchy: messages built from an account's numbers."""

from __future__ import annotations

from datetime import datetime, timezone

from litellm_credits.errors import MonthlyCapExceeded
from litellm_credits.money import parse_credits as c

RESETS = datetime(2026, 2, 1, tzinfo=timezone.utc)


def test_cap_not_reached_yet_says_the_request_would_exceed_it() -> None:
    """Regression: a request that did not fit under the monthly cap was told the cap was
    "reached" although most of it was left."""
    err = MonthlyCapExceeded.for_request(
        cap=c("3"), month_spend=c("1"), held=c("0.5"), required=c("2"), resets_at=RESETS, balance="100.000000"
    )
    assert err.message == (
        "this request would exceed the monthly cap of 3.000000 credits: 2.000000 required, "
        "1.500000 left this month (1.000000 spent, 0.500000 held by calls in progress); "
        "it resets at 2026-02-01T00:00:00+00:00"
    )
    assert err.details == {
        "balance": "100.000000",
        "held": "0.500000",
        "required": "2.000000",
        "monthly_cap": "3.000000",
        "month_spend": "1.000000",
        "resets_at": "2026-02-01T00:00:00+00:00",
    }
    assert (err.status, err.type) == (402, "monthly_cap_exceeded")


def test_cap_reached_says_reached() -> None:
    for spent in ("3.000000", "4.400000"):  # at the cap, or past it after an overrun
        err = MonthlyCapExceeded.for_request(
            cap=c("3"), month_spend=c(spent), held=0, required=c("0.1"), resets_at=RESETS
        )
        assert err.message.startswith(f"monthly cap of 3.000000 credits reached ({spent} spent this month)")


def test_cap_taken_by_holds_leaves_nothing() -> None:
    err = MonthlyCapExceeded.for_request(
        cap=c("3"), month_spend=c("1"), held=c("2.5"), required=c("0.1"), resets_at=RESETS
    )
    assert "would exceed" in err.message and "0.000000 left this month" in err.message
