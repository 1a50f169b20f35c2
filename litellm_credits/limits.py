"""The limits a hold must fit, and the error that names the one it did not.

A request holds against the balance of the account that pays and every cap on the way: the
account's monthly, daily and per-request caps, and for a team member its team's as well (the team
pays). ``credits.take_hold`` decides in one statement and names the first limit it does not fit;
this module turns that name into the 402 a client reads, with the figures behind it.

    outcome          standalone account           member of a team
    balance          insufficient_credits         -
    team_balance     -                            team_insufficient_credits
    monthly          monthly_cap_exceeded         member_cap_exceeded (limit monthly)
    daily            daily_cap_exceeded           member_cap_exceeded (limit daily)
    request          request_cap_exceeded         member_cap_exceeded (limit per_request)
    team_<limit>     -                            team_cap_exceeded (limit ...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import (
    AccountDisabled,
    AccountNotFound,
    CreditsError,
    DailyCapExceeded,
    InsufficientCredits,
    MemberCapExceeded,
    MonthlyCapExceeded,
    PaymentRequired,
    RequestCapExceeded,
    TeamCapExceeded,
    TeamInsufficientCredits,
)
from .money import format_credits as fc
from .records import Account

# the cap's name in ``details.limit``, by the outcome's suffix
LIMIT_NAMES = {"monthly": "monthly", "daily": "daily", "request": "per_request"}


def refused(
    row: Mapping[str, Any], account: Account | None, team: Account | None, *, required: int
) -> CreditsError:
    """The error for ``take_hold``'s refusal ``row``, on ``account``'s and ``team``'s limits as the
    statement saw them (its ``seen``: a read after it may already see another hold released)."""
    if row["seen"] is not None and account is not None:
        seen = row["seen"]  # jsonb, decoded by the pool's codec (db.py)
        account = dataclasses.replace(account, **seen["account"])
        if team is not None and team.subject_id == row["payer_id"]:
            team = dataclasses.replace(team, **seen["payer"])
    error = refusal(row["outcome"], account, team, required=required, room=row["room"])
    if isinstance(error, PaymentRequired):
        error.room, error.tier = row["room"], row["tier"]
    return error


def _left(cap: int | None, spent: int, held: int) -> int:
    return max((cap or 0) - spent - held, 0)


def refusal(
    outcome: str,
    account: Account | None,
    team: Account | None,
    *,
    required: int,
    room: int | None,
) -> CreditsError:
    """The error for a hold of ``required`` micro-credits that ``take_hold`` refused with
    ``outcome``; ``account`` made the request, ``team`` pays for it (a member's) or is None.

    ``details.room`` is the most the limit leaves for this request (what a clamped hold could
    have taken).
    """
    if account is None or outcome == "no_account":
        return AccountNotFound("no credit account for this request", param="user")
    if outcome == "disabled":
        return AccountDisabled(f"credit account {account.subject_id!r} is disabled")
    if outcome == "team_disabled":
        name = account.parent_id or "its team"
        return AccountDisabled(f"team {name!r}, whose credits {account.subject_id!r} spends, is disabled")
    payer = team or account
    common: dict[str, Any] = {
        "required": fc(required),
        "room": fc(max(room or 0, 0)),
        "balance": fc(payer.balance),
        "held": fc(payer.held),
        "available": fc(payer.available),
    }
    if team is not None:
        common["team_id"] = team.subject_id
    kind = outcome.removeprefix("team_")
    if kind == "balance":
        cls = InsufficientCredits if team is None else TeamInsufficientCredits
        whose = "" if team is None else f"team {team.subject_id!r}: "
        return cls(
            f"{whose}insufficient credits: {fc(required)} required, {fc(payer.available)} available",
            **common,
        )
    # a cap: of the account that pays (its own, or its team's), or the member's own
    capped = payer if team is None or outcome.startswith("team_") else account
    return _cap_error(outcome, kind, capped, team is not None, required=required, common=common)


def _cap_error(
    outcome: str, kind: str, capped: Account, member: bool, *, required: int, common: dict[str, Any]
) -> PaymentRequired:
    limit = LIMIT_NAMES[kind]
    if not member and kind == "monthly":
        return MonthlyCapExceeded.for_request(
            cap=capped.monthly_cap or 0,
            month_spend=capped.month_spend,
            held=capped.held,
            required=required,
            resets_at=capped.resets_at,
            **{k: v for k, v in common.items() if k not in ("required", "held")},
        )
    if kind == "request":
        cap = capped.request_cap or 0
        text = f"the cap of {fc(cap)} credits per request"
        figures: dict[str, Any] = {"cap": fc(cap)}
    elif kind == "daily":
        cap = capped.daily_cap or 0
        left = _left(cap, capped.day_spend, capped.held)
        text = f"the daily cap of {fc(cap)} credits ({fc(left)} left today, UTC)"
        figures = {"cap": fc(cap), "day_spend": fc(capped.day_spend), "cap_held": fc(capped.held)}
    else:
        cap = capped.monthly_cap or 0
        left = _left(cap, capped.month_spend, capped.held)
        text = f"the monthly cap of {fc(cap)} credits ({fc(left)} left this month)"
        figures = {
            "cap": fc(cap),
            "month_spend": fc(capped.month_spend),
            "cap_held": fc(capped.held),
            "resets_at": capped.resets_at.isoformat(),
        }
    details = {**common, **figures, "limit": limit}
    if not member:
        cls: type[PaymentRequired] = DailyCapExceeded if kind == "daily" else RequestCapExceeded
        return cls(f"this request ({fc(required)} credits) would exceed {text}", **details)
    if outcome.startswith("team_"):
        return TeamCapExceeded(
            f"this request ({fc(required)} credits) would exceed {text} of team {capped.subject_id!r}",
            **details,
        )
    return MemberCapExceeded(
        f"this request ({fc(required)} credits) would exceed {text} that the team set for "
        f"{capped.subject_id!r}",
        **details,
    )


__all__ = ["LIMIT_NAMES", "refusal"]
