"""``accounts create | list | show`` and ``balance``."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer

from .. import auth
from ..accounts import Accounts
from ..errors import CreditsError
from ..grants import Grants
from ..history import History
from ..money import parse_credits
from .output import JsonOption, fields, out, plural, print_json, show_rows
from .session import run, session

app = typer.Typer(help="Create, list and inspect accounts.", no_args_is_help=True)

UserId = Annotated[str, typer.Argument(metavar="USER_ID", help="The account's user id.", show_default=False)]


class Status(str, Enum):
    active = "active"
    disabled = "disabled"


ACCOUNT_COLUMNS = [
    ("user_id", "account"),
    ("tier", "tier"),
    ("status", "status"),
    ("parent_id", "team"),
    ("balance", "balance"),
    ("held", "held"),
    ("available", "available"),
    ("month_spend", "month spend"),
    ("monthly_cap", "monthly cap"),
    ("created_at", "created"),
]
MONEY = ("balance", "held", "available", "month_spend", "monthly_cap", "amount", "balance_after")
TX_COLUMNS = [
    ("id", "id"),
    ("created_at", "at"),
    ("type", "type"),
    ("amount", "amount"),
    ("balance_after", "balance after"),
    ("model", "model"),
    ("description", "description"),
]


@app.command("create")
def create(
    user_id: UserId,
    tier: Annotated[
        str | None,
        typer.Option(metavar="TIER", help="Tier from the credits config; default: its default tier."),
    ] = None,
    monthly_cap: Annotated[
        str | None,
        typer.Option(
            metavar="CREDITS", help="Credits the account may spend per calendar month; default: none."
        ),
    ] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Issue an admin key instead of a user key.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Create an account and print its API key (shown only once)."""

    async def work() -> dict[str, Any]:
        async with session() as s:
            cfg = s.settings.credits
            chosen = tier or cfg.default_tier
            if chosen not in cfg.tiers:
                raise CreditsError(f"unknown tier {chosen!r}; configured: {', '.join(cfg.tiers)}")
            cap = parse_credits(monthly_cap) if monthly_cap else None
            async with s.pool.acquire() as conn, conn.transaction():
                account = await s.ledger.create_account(user_id, tier=chosen, monthly_cap=cap, conn=conn)
                issued = await auth.issue_key(conn, user_id, role="admin" if admin else "user")
            await s.ledger.changed(user_id)
            return {**account.to_json(), "api_key": issued.key}

    created = run(work)
    if as_json:
        print_json(created)
        return
    out().print(fields(created, title=f"Account {user_id}"))
    out().print("The API key is shown only this once: keep it now.")


@app.command("list")
def list_accounts(
    search: Annotated[
        str | None,
        typer.Option("--search", "-s", metavar="TEXT", help="Part of the user id or display name."),
    ] = None,
    tier: Annotated[str | None, typer.Option(metavar="TIER", help="Only accounts of this tier.")] = None,
    status: Annotated[Status | None, typer.Option(help="Only active or only disabled accounts.")] = None,
    team: Annotated[
        str | None, typer.Option(metavar="TEAM_ID", help="Only the members of this team account.")
    ] = None,
    min_balance: Annotated[
        str | None, typer.Option(metavar="CREDITS", help="Only balances of at least this many credits.")
    ] = None,
    max_balance: Annotated[
        str | None, typer.Option(metavar="CREDITS", help="Only balances of at most this many credits.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, metavar="N", help="Accounts per page.")] = 50,
    offset: Annotated[
        int, typer.Option(min=0, metavar="N", help="Skip this many accounts (the next page).")
    ] = 0,
    as_json: JsonOption = False,
) -> None:
    """List accounts, newest first, as GET /api/v1/admin/credits/accounts does."""

    async def work() -> dict[str, Any]:
        low = parse_credits(min_balance) if min_balance is not None else None
        high = parse_credits(max_balance) if max_balance is not None else None
        async with session() as s:
            items, total = await Accounts(s.pool).search(
                text=search,
                tier=tier,
                status=status.value if status else None,
                team=team,
                min_balance=low,
                max_balance=high,
                limit=limit,
                offset=offset,
            )
        return {"items": [a.to_json() for a in items], "total": total, "limit": limit, "offset": offset}

    page = run(work)
    if as_json:
        print_json(page)
        return
    show_rows(page["items"], ACCOUNT_COLUMNS, empty="No accounts.", right=MONEY)
    if page["items"]:
        first, last = offset + 1, offset + len(page["items"])
        more = f"; next page: --offset {last}" if last < page["total"] else ""
        out().print(f"{first}-{last} of {plural(page['total'], 'account')}{more}")


@app.command("show")
def show(
    user_id: UserId,
    transactions: Annotated[
        int, typer.Option(min=0, max=1000, metavar="N", help="How many recent ledger rows to show.")
    ] = 10,
    as_json: JsonOption = False,
) -> None:
    """Show one account in full, with what its balance is made of and its recent transactions.

    Balance, held, available, month spend and cap, tier, status and team; --json prints the
    account as the admin API does, plus "grants" and "recent_transactions".
    """

    async def work() -> dict[str, Any]:
        async with session() as s:
            account = await s.ledger.require_account(user_id)
            summary = await Grants(s.pool).summary(user_id)
            rows, _ = await History(s.pool).page(user_id, limit=transactions) if transactions else ([], 0)
        return {
            **account.to_json(),
            "grants": summary,
            "recent_transactions": [t.to_json() for t in rows],
        }

    shown = run(work)
    if as_json:
        print_json(shown)
        return
    account = {k: v for k, v in shown.items() if k not in ("grants", "recent_transactions")}
    out().print(fields(account, title=f"Account {user_id}"))
    out().print(fields(shown["grants"], title="Credit left by category"))
    if transactions:
        show_rows(
            shown["recent_transactions"],
            TX_COLUMNS,
            empty="No transactions.",
            right=MONEY,
            title="Recent transactions",
        )


def balance(user_id: UserId, as_json: JsonOption = False) -> None:
    """Show an account's balance, held credits, caps, tier and status."""

    async def work() -> dict[str, Any]:
        async with session() as s:
            return (await s.ledger.require_account(user_id)).to_json()

    account = run(work)
    if as_json:
        print_json(account)
    else:
        out().print(fields(account, title=f"Account {user_id}"))


__all__ = ["app", "balance"]
