"""User routes: an account's balance, history, usage, monthly cap, and price quotes.

Each acts on the caller's own account; an admin key may name any account with ``user_id``.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator, Callable
from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import StreamingResponse

from ..errors import AccountNotFound, NotFound, PermissionDenied
from ..grants import Grants
from ..history import Dimension, History, Period, TransactionType, TxFilter
from ..ledger import Account, Transaction
from ..money import format_credits
from ..pricing import ModelPrice, Usage, usd_cost
from ..runtime import Runtime
from . import schemas
from .routes import CallerDep, Limit, Offset, UserIdQuery, target

PriceLookup = Callable[[str], ModelPrice]

Days = Annotated[int | None, Query(ge=1, le=3660, description="the last N days (default 30)")]
StartDate = Annotated[date | datetime | None, Query(description="from this date or time (UTC)")]
EndDate = Annotated[date | datetime | None, Query(description="up to this date (whole day) or time (UTC)")]
TypeQuery = Annotated[TransactionType | None, Query(description="only this type of transaction")]
MemberQuery = Annotated[
    str | None,
    Query(max_length=256, description="a team's ledger: only the rows this member's requests made"),
]

CSV_COLUMNS = (
    "id",
    "created_at",
    "type",
    "amount",
    "balance_after",
    "description",
    "model",
    "provider",
    "power_level",
    "prompt_tokens",
    "completion_tokens",
    "idempotency_key",
    "member_id",
)
# a spreadsheet runs a cell starting with one of these as a formula (OWASP "CSV injection")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def csv_cell(value: Any) -> str:
    """A value as a CSV cell that no spreadsheet will evaluate (numbers stay numbers)."""
    text = "" if value is None else str(value)
    if text.startswith(_FORMULA_START) and not _NUMBER.match(text):
        return "'" + text
    return text


def _csv_row(tx: Transaction) -> list[str]:
    data = tx.to_json()
    return [csv_cell(data[c]) for c in CSV_COLUMNS]


def _period(days: int | None, start: date | datetime | None, end: date | datetime | None) -> Period:
    return Period.of(days=days, start=start, end=end)


async def _account(runtime: Runtime, subject_id: str) -> Account:
    account = await runtime.account(subject_id)  # cached: invalidated by every change
    if account is None:
        raise AccountNotFound("no credit account for this key", param="user_id")
    return account


def add_user_routes(router: APIRouter, runtime: Runtime, price_of: PriceLookup) -> None:
    async def history() -> History:
        return History((await runtime.ledger()).pool)

    @router.get("/credits/balance", response_model=schemas.Balance, response_model_exclude_unset=True)
    async def balance(
        caller: CallerDep,
        user_id: UserIdQuery = None,
        include_history: Annotated[bool, Query(description="add the latest 10 transactions")] = False,
    ) -> dict[str, Any]:
        """The caller's balance, held amount, tier and monthly cap."""
        subject = target(caller, user_id)
        body = (await _account(runtime, subject)).to_json()
        body["grants"] = await Grants((await runtime.ledger()).pool).summary(subject)
        if include_history:
            items, _ = await (await history()).page(subject, limit=10, offset=0)
            body["recent_transactions"] = [t.to_json() for t in items]
        return body

    @router.get("/credits/transactions", response_model=schemas.TransactionPage)
    async def transactions(
        caller: CallerDep,
        limit: Limit = 50,
        offset: Offset = 0,
        type: TypeQuery = None,
        start_date: StartDate = None,
        end_date: EndDate = None,
        before: Annotated[
            int | None, Query(ge=1, le=2**63 - 1, description="continue after this transaction (next_before)")
        ] = None,
        member_id: MemberQuery = None,
        user_id: UserIdQuery = None,
    ) -> dict[str, Any]:
        """The caller's ledger, newest first; amounts are signed decimal strings.

        Page with ``offset``, or, cheaper at any depth, with ``before=<next_before of the last page>``.
        """
        where = _filter(type, start_date, end_date, member_id)
        items, total = await (await history()).page(
            target(caller, user_id), limit=limit, offset=offset, where=where, before=before
        )
        return {
            "items": [t.to_json() for t in items],
            "total": total,
            "limit": limit,
            "offset": offset,
            "next_before": items[-1].id if len(items) == limit else None,
        }

    @router.get(
        "/credits/transactions/export",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/csv": {}}, "description": "the ledger as CSV, oldest first"}},
    )
    async def export(
        caller: CallerDep,
        format: Annotated[Literal["csv"], Query()] = "csv",
        type: TypeQuery = None,
        start_date: StartDate = None,
        end_date: EndDate = None,
        member_id: MemberQuery = None,
        user_id: UserIdQuery = None,
    ) -> StreamingResponse:
        """The caller's ledger as CSV, streamed (a long history never sits in memory)."""
        subject = target(caller, user_id)
        where = _filter(type, start_date, end_date, member_id)  # a bad date is a 422 before the first byte
        await _account(runtime, subject)
        rows = (await history()).export(subject, where)
        # the query runs now, so that its errors are still a JSON answer, not a broken stream
        first = await anext(rows, None)

        async def lines() -> AsyncIterator[str]:
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\r\n")
            writer.writerow(CSV_COLUMNS)
            if first is None:
                yield buffer.getvalue()
                return
            writer.writerow(_csv_row(first))
            async for tx in rows:
                writer.writerow(_csv_row(tx))
                if buffer.tell() > 64 * 1024:
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
            yield buffer.getvalue()

        filename = f"credits-{date.today().isoformat()}.csv"
        return StreamingResponse(
            lines(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    @router.get("/credits/transactions/{transaction_id}", response_model=schemas.Transaction)
    async def transaction(
        caller: CallerDep,
        transaction_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
        user_id: UserIdQuery = None,
    ) -> dict[str, Any]:
        """One transaction of the caller's (another account's id is simply not found)."""
        tx = await (await history()).get(target(caller, user_id), transaction_id)
        if tx is None:
            raise NotFound(f"no transaction {transaction_id} on this account", param="transaction_id")
        return tx.to_json()

    @router.get("/credits/usage/stats", response_model=schemas.UsageStats)
    async def usage_stats(
        caller: CallerDep,
        days: Days = None,
        start_date: StartDate = None,
        end_date: EndDate = None,
        user_id: UserIdQuery = None,
    ) -> dict[str, Any]:
        """Requests, tokens and credits over a period (default the last 30 days), and per day."""
        return await (await history()).usage(target(caller, user_id), _period(days, start_date, end_date))

    def breakdown(dimension: Dimension, path: str, summary: str) -> None:
        description = (
            f"Requests, tokens and credits per {dimension.replace('_', ' ')} over a period (default the "
            "last 30 days), the largest charge first."
        )

        @router.get(path, response_model=schemas.UsageBreakdown, summary=summary, description=description)
        async def usage_by(
            caller: CallerDep,
            days: Days = None,
            start_date: StartDate = None,
            end_date: EndDate = None,
            user_id: UserIdQuery = None,
        ) -> dict[str, Any]:
            return await (await history()).usage_by(
                target(caller, user_id), _period(days, start_date, end_date), dimension
            )

    breakdown("model", "/credits/usage/by-model", "Usage by model")
    breakdown("power_level", "/credits/usage/by-power-level", "Usage by power level")
    breakdown("service", "/credits/usage/by-service", "Usage by service")
    breakdown("member", "/credits/usage/by-member", "Usage by team member")

    @router.get("/credits/monthly-cap", response_model=schemas.MonthlyCap)
    async def get_monthly_cap(caller: CallerDep, user_id: UserIdQuery = None) -> dict[str, Any]:
        """The account's monthly cap, what this month spent, and when the month resets."""
        return _cap(await _account(runtime, target(caller, user_id)))

    @router.post("/credits/monthly-cap", response_model=schemas.MonthlyCap)
    async def set_monthly_cap(
        body: schemas.SetMonthlyCap, caller: CallerDep, user_id: UserIdQuery = None
    ) -> dict[str, Any]:
        """Set (or, with null, remove) the account's monthly cap; it applies at once. A team member's
        caps are its team's to set (``PATCH /credits/team/members/{id}``)."""
        subject = target(caller, user_id)
        account = await _account(runtime, subject)
        if account.parent_id is not None and not caller.is_admin:
            raise PermissionDenied(
                f"a team member's caps are set by its team ({account.parent_id!r})", param="monthly_cap"
            )
        ledger = await runtime.ledger()
        return _cap(await ledger.set_monthly_cap(subject, body.monthly_cap))

    @router.post("/credits/calculate-cost", response_model=schemas.CostQuote)
    async def calculate_cost(body: schemas.CalculateCost, caller: CallerDep) -> dict[str, Any]:
        """What a request with this usage would cost the caller; nothing is charged."""
        pricing = runtime.pricing
        power_level = pricing.power_level(body.power_level)
        tier = runtime.settings.credits.default_tier
        if caller.subject_id is not None:
            account = await runtime.account(caller.subject_id)
            if account is not None and account.parent_id is not None:  # a member: its team's tier
                account = await runtime.account(account.parent_id)
            tier = account.tier if account is not None else tier
        price = price_of(body.model)
        usage = Usage(
            prompt_tokens=body.prompt_tokens,
            completion_tokens=body.completion_tokens,
            cached_tokens=body.cached_tokens,
            reasoning_tokens=body.reasoning_tokens,
        )
        usd = usd_cost(price, usage)
        return {
            "model": body.model,
            "cost": format_credits(pricing.to_micro(usd, pricing.rate(tier, power_level))),
            "usd": format(usd.normalize(), "f"),
            "power_level": power_level,
            "tier": tier,
            "free": price.free,
        }


def _filter(
    type_: TransactionType | None,
    start: date | datetime | None,
    end: date | datetime | None,
    member: str | None = None,
) -> TxFilter:
    return TxFilter.of(type_, start, end, member)


def _cap(account: Account) -> dict[str, Any]:
    cap = account.monthly_cap
    return {
        "user_id": account.subject_id,
        "monthly_cap": None if cap is None else format_credits(cap),
        "month_spend": format_credits(account.month_spend),
        "held": format_credits(account.held),
        "remaining": None
        if cap is None
        else format_credits(max(cap - account.month_spend - account.held, 0)),
        "resets_at": account.resets_at.isoformat(),
    }


__all__ = ["add_user_routes", "csv_cell"]
