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
       power_level, prompt_tokens, completion_tokens, description, metadata, created_at"""
# $1 subject, $2 type, $3 from (inclusive), $4 until (exclusive); NULL = no filter
TX_WHERE = """subject_id = $1
  AND ($2::text IS NULL OR type = $2)
  AND ($3::timestamptz IS NULL OR created_at >= $3)
  AND ($4::timestamptz IS NULL OR created_at < $4)"""

# $7: keyset paging, only rows older than this transaction (cheap at any depth, unlike OFFSET)
SQL_PAGE = f"""
SELECT {TX_COLUMNS} FROM credits.credit_transactions
WHERE {TX_WHERE}
  AND ($7::bigint IS NULL OR (created_at, id) < (
        SELECT c.created_at, c.id FROM credits.credit_transactions c WHERE c.subject_id = $1 AND c.id = $7))
ORDER BY created_at DESC, id DESC
LIMIT $5 OFFSET $6
"""
SQL_COUNT = f"SELECT count(*) FROM credits.credit_transactions WHERE {TX_WHERE}"
SQL_ONE = f"SELECT {TX_COLUMNS} FROM credits.credit_transactions WHERE subject_id = $1 AND id = $2"
SQL_EXPORT = f"""
SELECT {TX_COLUMNS} FROM credits.credit_transactions
WHERE {TX_WHERE}
ORDER BY created_at, id
"""

# $1 subject, $2 from, $3 until
USAGE_WHERE = "subject_id = $1 AND created_at >= $2 AND created_at < $3"
USAGE_TOTALS = """count(*) AS requests,
       count(*) FILTER (WHERE status = 'success') AS succeeded,
       count(*) FILTER (WHERE status <> 'success') AS failed,
       coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
       coalesce(sum(completion_tokens), 0) AS completion_tokens,
       coalesce(sum(cost), 0) AS cost,
       coalesce(sum(charged), 0) AS charged"""
SQL_USAGE_TOTAL = f"SELECT {USAGE_TOTALS} FROM credits.usage_events WHERE {USAGE_WHERE}"
SQL_USAGE_DAILY = f"""
SELECT (created_at AT TIME ZONE 'UTC')::date AS day, {USAGE_TOTALS}
FROM credits.usage_events WHERE {USAGE_WHERE}
GROUP BY 1 ORDER BY 1
"""
# the dimension is one of three fixed column names, never caller text
SQL_USAGE_BY = {
    dim: f"""
SELECT coalesce({dim}, 'unknown') AS key, {USAGE_TOTALS}
FROM credits.usage_events WHERE {USAGE_WHERE}
GROUP BY 1 ORDER BY sum(charged) DESC, 1
"""
    for dim in ("model", "power_level", "service")
}

Dimension = Literal["model", "power_level", "service"]
TransactionType = Literal["allocation", "bonus", "refund", "usage", "coupon", "adjustment"]


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
        """``days`` back from now, or the dates given (an end date counts as its whole day)."""
        now = datetime.now(timezone.utc)
        until = as_utc(end, end_of_day=True) if end is not None else now
        since = as_utc(start) if start is not None else until - timedelta(days=days or 30)
        return cls(since, until)


def as_utc(value: date | datetime, *, end_of_day: bool = False) -> datetime:
    """A date is midnight UTC (the next midnight for an end); a naive datetime is UTC."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    midnight = datetime.combine(value, time(), tzinfo=timezone.utc)
    return midnight + timedelta(days=1) if end_of_day else midnight


@dataclass(frozen=True)
class TxFilter:
    type: TransactionType | None = None
    start: datetime | None = None
    end: datetime | None = None

    def args(self) -> tuple[Any, ...]:
        return (self.type, self.start, self.end)


def totals(row: asyncpg.Record) -> dict[str, Any]:
    """Requests, tokens and credits of a usage row (a period, a day or a group)."""
    return {
        "requests": row["requests"],
        "succeeded": row["succeeded"],
        "failed": row["failed"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
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


__all__ = ["Dimension", "History", "Period", "TransactionType", "TxFilter", "as_utc", "totals"]
