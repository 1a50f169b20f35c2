"""``allocate`` (one account, or a CSV file of them), ``grants``, ``alerts`` and ``topups``."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..alerts import Alerts
from ..grants import Grants
from ..money import parse_credits
from ..records import GrantTerms
from . import bulk
from .output import JsonOption, fields, out, print_json, show_rows
from .session import run, session

UserId = Annotated[str, typer.Argument(metavar="USER_ID", help="The account's user id.", show_default=False)]


class Category(str, Enum):
    paid = "paid"
    promotional = "promotional"


class GrantStatus(str, Enum):
    live = "live"
    used = "used"
    expired = "expired"


def aware_time(text: str) -> datetime:
    """An ISO 8601 time with a UTC offset."""
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 time such as 2027-01-01T00:00:00Z") from None
    if at.tzinfo is None:
        raise typer.BadParameter(f"{text!r} has no UTC offset (add Z or +00:00)")
    return at


def allocate(
    user_id: Annotated[
        str | None,
        typer.Argument(
            metavar="USER_ID", help="The account to credit (not with --from-csv).", show_default=False
        ),
    ] = None,
    amount: Annotated[
        str | None,
        typer.Argument(metavar="AMOUNT", help="Credits to add, e.g. 10 or 2.5.", show_default=False),
    ] = None,
    reason: Annotated[
        str | None, typer.Option(metavar="TEXT", help="Description recorded on the ledger row.")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            metavar="KEY",
            help="A repeat with the same key credits nothing again; with --from-csv, the key prefix.",
        ),
    ] = None,
    category: Annotated[Category | None, typer.Option(help="Grant category; default: paid.")] = None,
    priority: Annotated[
        int | None, typer.Option(min=0, max=1000, metavar="N", help="0-1000, lower burns first; default: 0.")
    ] = None,
    expires_at: Annotated[
        datetime | None,
        typer.Option(
            parser=aware_time,
            metavar="TIME",
            help="When the grant expires: ISO 8601 with a UTC offset (Z or +00:00); default: never.",
        ),
    ] = None,
    from_csv: Annotated[
        Path | None,
        typer.Option(
            "--from-csv",
            exists=True,
            metavar="FILE",
            dir_okay=False,
            readable=True,
            help="Credit every row of this CSV file: user_id,amount and optionally reason, category, "
            "priority, expires_at (the options above are the defaults for empty cells).",
        ),
    ] = None,
    all_or_nothing: Annotated[
        bool,
        typer.Option(
            "--all-or-nothing/--per-row",
            help="With --from-csv: credit every row in one transaction, or each row on its own "
            "(failures listed, exit code 1); each row with its own reason, category, priority and "
            "expiry either way.",
        ),
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Add credits to an account, or to every account listed in a CSV file."""
    expires = expires_at
    if from_csv is not None:
        if user_id is not None or amount is not None:
            raise typer.BadParameter("give USER_ID AMOUNT or --from-csv FILE, not both")
        defaults = bulk.RowDefaults(reason, category.value if category else None, priority, expires)
        code = bulk.allocate_csv(from_csv, defaults, all_or_nothing, idempotency_key, as_json)
        raise typer.Exit(code)
    if user_id is None or amount is None:
        raise typer.BadParameter("give USER_ID AMOUNT (or --from-csv FILE)")

    async def work() -> dict[str, Any]:
        credits = parse_credits(amount)
        async with session() as s:
            tx = await s.ledger.credit(
                user_id,
                credits,
                description=reason,
                idempotency_key=idempotency_key,
                terms=GrantTerms(category.value if category else None, priority, expires),
            )
        return tx.to_json()

    tx = run(work)
    if as_json:
        print_json(tx)
    else:
        out().print(
            f"credited {tx['amount']} to {tx['user_id']}: balance {tx['balance_after']} (tx {tx['id']})"
        )


GRANT_COLUMNS = [
    ("id", "id"),
    ("category", "category"),
    ("priority", "priority"),
    ("source", "source"),
    ("amount", "amount"),
    ("remaining", "remaining"),
    ("status", "status"),
    ("expires_at", "expires"),
    ("created_at", "created"),
]


def grants(
    user_id: UserId,
    status: Annotated[GrantStatus | None, typer.Option(help="Only grants in this state.")] = None,
    as_json: JsonOption = False,
) -> None:
    """What an account's balance is made of, and its credit grants, newest first."""

    async def work() -> dict[str, Any]:
        async with session() as s:
            await s.ledger.require_account(user_id)
            g = Grants(s.pool)
            items, _ = await g.list(user_id, status=status.value if status else None, limit=1000)
            return {**await g.summary(user_id), "grants": [x.to_json() for x in items]}

    shown = run(work)
    if as_json:
        print_json(shown)
        return
    out().print(fields({k: v for k, v in shown.items() if k != "grants"}, title=f"Credit left: {user_id}"))
    show_rows(shown["grants"], GRANT_COLUMNS, empty="No grants.", right=("amount", "remaining"))


def alerts(
    user_id: UserId,
    balance_below: Annotated[
        list[str] | None,
        typer.Option(
            metavar="CREDITS", help="Send balance.low when the balance falls below each of these credits."
        ),
    ] = None,
    cap_percent: Annotated[
        list[int] | None,
        typer.Option(
            min=1,
            metavar="PERCENT",
            help="Send monthly_cap.reached at each of these percents of the monthly cap.",
        ),
    ] = None,
    tier_defaults: Annotated[
        bool, typer.Option("--tier-defaults", help="Drop the account's own thresholds: its tier's apply.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Show an account's alert thresholds, or set them."""
    if tier_defaults and (balance_below or cap_percent):
        raise typer.BadParameter("--tier-defaults cannot be combined with --balance-below or --cap-percent")

    async def work() -> dict[str, Any]:
        async with session() as s:
            a = Alerts(s.pool)
            if tier_defaults:
                return await a.set_thresholds(user_id, None, None)
            if balance_below or cap_percent:
                now = await a.thresholds(user_id)
                below = [parse_credits(b) for b in (balance_below or now["balance_below"])]
                percents = cap_percent or now["monthly_cap_percent"]
                return await a.set_thresholds(user_id, below, percents)
            return await a.thresholds(user_id)

    shown = run(work)
    if as_json:
        print_json(shown)
    else:
        out().print(fields(shown, title=f"Alert thresholds: {user_id}"))


TOPUP_COLUMNS = [
    ("id", "id"),
    ("created_at", "at"),
    ("amount", "credits"),
    ("price", "price"),
    ("status", "status"),
    ("reversed", "reversed"),
    ("disputed", "disputed"),
    ("transaction_id", "tx"),
]


def topups(user_id: UserId, as_json: JsonOption = False) -> None:
    """An account's paid top-ups (Stripe), newest first."""

    async def work() -> list[dict[str, Any]]:
        async with session() as s:
            await s.ledger.require_account(user_id)
            return await (await s.runtime.topups()).list(user_id, limit=1000, offset=0)

    rows = run(work)
    if as_json:
        print_json(rows)
    else:
        show_rows(rows, TOPUP_COLUMNS, empty="No top-ups.", right=("amount", "reversed"))


__all__ = ["alerts", "allocate", "aware_time", "grants", "topups"]
