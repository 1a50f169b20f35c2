"""Prices that depend on when and how a request is served: off-peak windows and service tiers.

LiteLLM's price map gives some models another rate inside UTC windows (``off_peak_pricing``, as
on DeepSeek's models: half price at night and at weekends) and other rates per service tier
(``input_cost_per_token_priority``, ``output_cost_per_token_flex`` ...). ``litellm.cost_per_token``
applies them for the tier the provider served and the moment of the call; these are the same
rules (``litellm_core_utils/llm_cost_calc/utils.py``), on exact decimals, so a charge equals what
LiteLLM computes for the same usage, time and tier.

    >>> block = {"input_cost_per_token": 1e-7, "hours_utc": "16:30-00:30"}
    >>> peak = OffPeak.from_mapping(block)
    >>> peak.covers(datetime(2026, 12, 2, 23, 0, tzinfo=timezone.utc))
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timezone, tzinfo
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .money import to_decimal

# service tiers LiteLLM prices, and the suffix of their keys ("fast" is billed as priority)
SERVICE_TIER_SUFFIXES: Mapping[str, str] = {
    "flex": "flex",
    "balanced": "balanced",
    "priority": "priority",
    "fast": "priority",
    "ultrafast": "ultrafast",
}
_BASE_PRICING_TIERS = frozenset({"default", "standard"})
# the rates an off-peak block may replace
OFF_PEAK_KEYS = (
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "output_cost_per_reasoning_token",
)

_WEEKDAYS = {
    "mon": 1, "monday": 1, "tue": 2, "tues": 2, "tuesday": 2, "wed": 3, "wednesday": 3,
    "thu": 4, "thur": 4, "thurs": 4, "thursday": 4, "fri": 5, "friday": 5, "sat": 6,
    "saturday": 6, "sun": 7, "sunday": 7,
}  # fmt: skip


def tier_suffix(service_tier: str | None) -> str | None:
    """The key suffix a service tier is priced under (``"fast"`` → ``"priority"``), or None."""
    if not isinstance(service_tier, str):
        return None
    return SERVICE_TIER_SUFFIXES.get(service_tier.lower())


def billable_service_tier(requested: Any, served: Any) -> str | None:
    """The tier a call is billed at: the one the provider says it served when it names a priced
    tier (or says it served the standard one), else the one asked for; "auto" is no tier."""
    served_tier = served.lower() if isinstance(served, str) else None
    if served_tier in SERVICE_TIER_SUFFIXES:
        return served_tier
    if served_tier in _BASE_PRICING_TIERS:
        return None
    if not isinstance(requested, str) or requested.lower() == "auto":
        return None
    return requested


Window = tuple[time, time]


def _windows(value: Any) -> tuple[Window, ...]:
    """ "HH:MM-HH:MM" strings (one or a list) as (start, end); malformed ones are ignored."""
    if isinstance(value, str):
        texts: tuple[str, ...] = (value,)
    elif isinstance(value, Sequence):
        texts = tuple(v for v in value if isinstance(v, str))
    else:
        texts = ()
    found = []
    for text in texts:
        try:
            start, end = text.split("-")
            found.append(
                (
                    datetime.strptime(start.strip(), "%H:%M").time(),
                    datetime.strptime(end.strip(), "%H:%M").time(),
                )
            )
        except ValueError:
            continue
    return tuple(found)


def _in_window(now: time, windows: Sequence[Window]) -> bool:
    """Start inclusive, end exclusive; a window may wrap past midnight; start == end is all day."""
    for start, end in windows:
        if start < end:
            if start <= now < end:
                return True
        elif now >= start or now < end:
            return True
    return False


def _weekday(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 1 <= value <= 7 else None
    if isinstance(value, str):
        return _WEEKDAYS.get(value.strip().lower())
    return None


def _calendar(name: Any) -> tzinfo:
    if isinstance(name, str) and name.strip():
        try:
            return ZoneInfo(name.strip())
        except (ValueError, ZoneInfoNotFoundError):
            return timezone.utc
    return timezone.utc


@dataclass(frozen=True)
class OffPeak:
    """An ``off_peak_pricing`` block: its rates, and when they apply.

    ``daily`` windows apply every day; each ``weekly`` rule applies on its weekdays (1 = Monday,
    None = every day), read on the calendar of ``weekday_timezone`` while the hours are UTC.
    """

    rates: tuple[tuple[str, Decimal], ...]
    daily: tuple[Window, ...] = ()
    weekly: tuple[tuple[frozenset[int] | None, tuple[Window, ...]], ...] = ()
    calendar: tzinfo = timezone.utc

    @classmethod
    def from_mapping(cls, block: Any) -> OffPeak | None:
        if not isinstance(block, Mapping):
            return None
        rates = []
        for key in OFF_PEAK_KEYS:
            value = block.get(key)
            if isinstance(value, bool) or value is None:
                continue
            try:
                rates.append((key, to_decimal(value)))
            except (ValueError, ArithmeticError):
                continue  # LiteLLM ignores a rate it cannot read (the standard one applies)
        daily = _windows(block.get("hours_utc") or ())
        weekly = []
        rules = block.get("windows")
        if isinstance(rules, Sequence) and not isinstance(rules, str):
            for rule in rules:
                if not isinstance(rule, Mapping):
                    continue
                hours = _windows(rule.get("hours_utc") or ())
                days = rule.get("weekdays")
                if days is None:
                    allowed: frozenset[int] | None = None
                elif isinstance(days, Sequence) and not isinstance(days, str):
                    allowed = frozenset(d for d in map(_weekday, days) if d is not None)
                else:
                    allowed = frozenset()
                if hours:
                    weekly.append((allowed, hours))
        return cls(tuple(rates), daily, tuple(weekly), _calendar(block.get("weekday_timezone")))

    def covers(self, moment: datetime) -> bool:
        """Whether the off-peak rates apply at ``moment`` (a naive one is taken as UTC)."""
        utc = moment.astimezone(timezone.utc) if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
        now = utc.time().replace(tzinfo=None)
        if _in_window(now, self.daily):
            return True
        weekday = utc.astimezone(self.calendar).isoweekday()
        return any(
            (days is None or weekday in days) and _in_window(now, hours) for days, hours in self.weekly
        )


__all__ = [
    "OFF_PEAK_KEYS",
    "SERVICE_TIER_SUFFIXES",
    "OffPeak",
    "billable_service_tier",
    "tier_suffix",
]
