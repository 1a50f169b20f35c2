"""The read side: transaction history (filtered, paged, exported) and usage statistics.

Nothing here writes. Every query is keyed by the account first, so it runs on the
``(subject_id, created_at)`` indexes of the ledger and of ``usage_events``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Literal

import asyncpg

from .ledger import Transaction
from .money import format_credits

TX_COLUMNS = """id, subject_id, amount, balance_after, type, idempotency_key, hold_id, model, provider,
       power_level, prompt_tokens, completion_tokens, description, metadata, created_at, member_id"""
# $1 subject, $2 type, $3 from (inclusive), $4 until (exclusive), $5 the team member whose requests
# made the rows (a team's ledger); NULL = no filter
TX_WHERE = """subject_id = $1
  AND ($2::text IS NULL OR type = $2)
  AND ($3::timestamptz IS NULL OR created_at >= $3)
  AND ($4::timestamptz IS NULL OR created_at < $4)
  AND ($5::text IS NULL OR member_id = $5)"""

# $8: keyset paging, only rows older than this transaction (cheap at any depth, unlike OFFSET)
SQL_PAGE = f"""
SELECT {TX_COLUMNS} FROM credits.credit_transactions
WHERE {TX_WHERE}
  AND ($8::bigint IS NULL OR (created_at, id) < (
        SELECT c.created_at, c.id FROM credits.credit_transactions c WHERE c.subject_id = $1 AND c.id = $8))
ORDER BY created_at DESC, id DESC
LIMIT $6 OFFSET $7
"""
SQL_COUNT = f"SELECT count(*) FROM credits.credit_transactions WHERE {TX_WHERE}"
SQL_ONE = f"SELECT {TX_COLUMNS} FROM credits.credit_transactions WHERE subject_id = $1 AND id = $2"
SQL_EXPORT = f"""
SELECT {TX_COLUMNS} FROM credits.credit_transactions
WHERE {TX_WHERE}
ORDER BY created_at, id
"""

# The usage of account $1 from $2 until $3: its own requests, and a team's members' (which it
# paid for). Two index scans, one for each (an event is never both: a member's names its team as
# payer, a team's own names none), where an OR would need a bitmap of both.
USAGE = """(
    SELECT * FROM credits.usage_events WHERE subject_id = $1 AND created_at >= $2 AND created_at < $3
    UNION ALL
    SELECT * FROM credits.usage_events WHERE payer_id = $1 AND created_at >= $2 AND created_at < $3
) e"""
USAGE_TOTALS = """count(*) AS requests,
       count(*) FILTER (WHERE status = 'success') AS succeeded,
       count(*) FILTER (WHERE status <> 'success') AS failed,
       coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
       coalesce(sum(completion_tokens), 0) AS completion_tokens,
       coalesce(sum(cost), 0) AS cost,
       coalesce(sum(charged), 0) AS charged"""
SQL_USAGE_TOTAL = f"SELECT {USAGE_TOTALS} FROM {USAGE}"
SQL_USAGE_DAILY = f"""
SELECT (created_at AT TIME ZONE 'UTC')::date AS day, {USAGE_TOTALS}
FROM {USAGE}
GROUP BY 1 ORDER BY 1
"""
# the dimension is one of four fixed column names, never caller text (a member is the account
# that made the request: subject_id, on a team's usage)
SQL_USAGE_BY = {
    dim: f"""
SELECT coalesce({column}, 'unknown') AS key, {USAGE_TOTALS}
FROM {USAGE}
GROUP BY 1 ORDER BY sum(charged) DESC, 1
"""
    for dim, column in (
        ("model", "model"),
        ("power_level", "power_level"),
        ("service", "service"),
        ("member", "subject_id"),
    )
}

Dimension = Literal["model", "power_level", "service", "member"]
TransactionType = Literal["allocation", "bonus", "refund", "usage", "coupon", "adjustment", "expiry", "topup"]


# Python's datetime spans years 1 to 9999 (PostgreSQL's timestamps far more): a period keeps a
# day clear of both ends, so whole-day arithmetic on it (analytics) never overflows
EARLIEST = datetime(1, 1, 2, tzinfo=timezone.utc)
LATEST = datetime(9999, 12, 30, tzinfo=timezone.utc)


class PeriodError(ValueError):
    """A date, or a range, outside what can be represented; ``param`` names the parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def _out_of_range(param: str) -> PeriodError:
    bounds = f"{EARLIEST.isoformat()} and {LATEST.isoformat()}"
    return PeriodError(param, f"out of range: a period lies between {bounds}")


def instant(value: date | datetime, param: str, *, end_of_day: bool = False) -> datetime:
    """``value`` in UTC (see :func:`as_utc`), or :class:`PeriodError` naming ``param`` when it is
    outside ``EARLIEST``..``LATEST``."""
    try:
        moment = as_utc(value, end_of_day=end_of_day)
    except OverflowError:  # an offset or the whole day pushed it past year 1 or 9999
        raise _out_of_range(param) from None
    if not EARLIEST <= moment <= LATEST:
        raise _out_of_range(param)
    return moment


@dataclass(frozen=True)
class Period:
    """A half-open interval of time, ``start <= t < end``, in UTC."""

    start: datetime
    end: datetime

    @classmethod
    def of(
        cls,
        *,
        days: int | None = None,
        start: date | datetime | None = None,
        end: date | datetime | None = None,
    ) -> Period:
        """``days`` back from now, or the dates given (an end date counts as its whole day);
        :class:`PeriodError` for dates, or a range, that cannot be represented."""
        until = instant(end, "end_date", end_of_day=True) if end is not None else datetime.now(timezone.utc)
        if start is not None:
            return cls(instant(start, "start_date"), until)
        back = timedelta(days=days or 30)
        if until - EARLIEST < back:
            raise PeriodError(
                "days" if days is not None else "end_date",
                f"the period of {back.days} days before {until.isoformat()} starts before "
                f"{EARLIEST.isoformat()}",
            )
        return cls(until - back, until)


def as_utc(value: date | datetime, *, end_of_day: bool = False) -> datetime:
    """A date is midnight UTC (the next midnight for an end); a naive datetime is UTC.
    ``OverflowError`` when the result is not representable."""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    midnight = datetime.combine(value, time(), tzinfo=timezone.utc)
    return midnight + timedelta(days=1) if end_of_day else midnight


@dataclass(frozen=True)
class TxFilter:
    type: TransactionType | None = None
    start: datetime | None = None
    end: datetime | None = None
    member: str | None = None  # on a team's ledger: the rows this member's requests made

    @classmethod
    def of(
        cls,
        type: TransactionType | None = None,
        start: date | datetime | None = None,
        end: date | datetime | None = None,
        member: str | None = None,
    ) -> TxFilter:
        """From query values (an end date counts as its whole day); :class:`PeriodError` for
        dates that cannot be represented."""
        return cls(
            type=type,
            start=instant(start, "start_date") if start is not None else None,
            end=instant(end, "end_date", end_of_day=True) if end is not None else None,
            member=member,
        )

    def args(self) -> tuple[Any, ...]:
        return (self.type, self.start, self.end, self.member)


def totals(row: asyncpg.Record) -> dict[str, Any]:
    """Requests, tokens and credits of a usage row (a period, a day or a group).

    Counts are integers: PostgreSQL's ``sum`` of a bigint is a numeric, which would otherwise
    reach JSON as a string where no response model converts it (the usage breakdowns).
    """
    return {
        "requests": int(row["requests"]),
        "succeeded": int(row["succeeded"]),
        "failed": int(row["failed"]),
        "prompt_tokens": int(row["prompt_tokens"]),
        "completion_tokens": int(row["completion_tokens"]),
        "cost": format_credits(row["cost"]),
        "charged": format_credits(row["charged"]),
    }


class History:
    """Reads of one account's ledger and usage."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def page(
        self,
        subject_id: str,
        *,
        limit: int,
        offset: int = 0,
        where: TxFilter = TxFilter(),
        before: int | None = None,
    ) -> tuple[list[Transaction], int]:
        """A page, newest first, and the total matching ``where``; ``before`` (a transaction id)
        continues after that transaction, at the cost of the first page."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(SQL_PAGE, subject_id, *where.args(), limit, offset, before)
            total = await conn.fetchval(SQL_COUNT, subject_id, *where.args())
        return [Transaction(**dict(r)) for r in rows], total

    async def get(self, subject_id: str, transaction_id: int) -> Transaction | None:
        row = await self.pool.fetchrow(SQL_ONE, subject_id, transaction_id)
        return Transaction(**dict(row)) if row else None

    async def export(self, subject_id: str, where: TxFilter = TxFilter()) -> AsyncIterator[Transaction]:
        """Every matching row, oldest first, from one consistent snapshot, without loading them
        all: a server-side cursor fetches them in batches."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            async for row in conn.cursor(SQL_EXPORT, subject_id, *where.args(), prefetch=500):
                yield Transaction(**dict(row))

    async def usage(self, subject_id: str, period: Period) -> dict[str, Any]:
        """Totals over the period and one line per day (UTC) that had usage."""
        async with self.pool.acquire() as conn:
            total = await conn.fetchrow(SQL_USAGE_TOTAL, subject_id, period.start, period.end)
            days = await conn.fetch(SQL_USAGE_DAILY, subject_id, period.start, period.end)
        return {
            "start": period.start.isoformat(),
            "end": period.end.isoformat(),
            **totals(total),
            "daily": [{"date": d["day"].isoformat(), **totals(d)} for d in days],
        }

    async def usage_by(self, subject_id: str, period: Period, dimension: Dimension) -> dict[str, Any]:
        rows = await self.pool.fetch(SQL_USAGE_BY[dimension], subject_id, period.start, period.end)
        return {
            "start": period.start.isoformat(),
            "end": period.end.isoformat(),
            "items": [{dimension: r["key"], **totals(r)} for r in rows],
        }


__all__ = [
    "EARLIEST",
    "LATEST",
    "Dimension",
    "History",
    "Period",
    "PeriodError",
    "TransactionType",
    "TxFilter",
    "as_utc",
    "instant",
    "totals",
]
