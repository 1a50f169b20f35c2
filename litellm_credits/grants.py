"""Credit grants: what an account's balance is made of, and their expiry.

Every credit opens a grant (migration 0010: category paid or promotional, a priority, an optional
expiry); usage burns the live grants of the account that pays, by priority, then the earliest
expiry, then the oldest. The database keeps grants in step with the ledger (a trigger on its rows)
and expires them (``credits.expire_grants``); this module reads them and runs the expiry sweep.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from .money import format_credits

GrantStatus = Literal["live", "used", "expired"]

_COLUMNS = """
    g.id, g.subject_id, g.category, g.priority, g.source, g.amount, g.remaining, g.expired,
    g.effective_at, g.expires_at, g.status, g.transaction_id, g.created_at
"""
SQL_LIST = f"""
SELECT {_COLUMNS}, count(*) OVER () AS total
FROM credits.grants g
WHERE g.subject_id = $1 AND ($2::text IS NULL OR g.status = $2)
ORDER BY g.created_at DESC, g.id DESC
LIMIT $3 OFFSET $4
"""
# What an account can spend by category, the overrun it owes, and the next expiry of credit it
# has left (and how much it takes). Grants past their expiry that open holds keep are not
# spendable: they are what those holds were taken on.
SQL_SUMMARY = """
WITH g AS (
    SELECT category, remaining, expires_at FROM credits.grants
    WHERE subject_id = $1 AND status = 'live' AND remaining > 0
      AND (expires_at IS NULL OR expires_at > now())
), n AS (
    SELECT min(expires_at) AS at FROM g
)
SELECT coalesce(sum(remaining) FILTER (WHERE category = 'paid'), 0) AS paid,
       coalesce(sum(remaining) FILTER (WHERE category = 'promotional'), 0) AS promotional,
       (SELECT at FROM n) AS next_expiry_at,
       coalesce(sum(remaining) FILTER (WHERE expires_at = (SELECT at FROM n)), 0) AS next_expiry_amount,
       coalesce((SELECT overrun FROM credits.credit_accounts WHERE subject_id = $1), 0) AS overrun
FROM g
"""
# accounts with credit past its expiry, the longest overdue first
SQL_DUE = """
SELECT subject_id FROM credits.grants
WHERE status = 'live' AND expires_at <= now()
GROUP BY subject_id
ORDER BY min(expires_at), subject_id
LIMIT $1
"""
SQL_EXPIRE = "SELECT credits.expire_grants($1)"


@dataclass(frozen=True)
class Grant:
    id: int
    subject_id: str
    category: str
    priority: int
    source: str
    amount: int
    remaining: int
    expired: int
    effective_at: datetime
    expires_at: datetime | None
    status: str
    transaction_id: int | None
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.subject_id,
            "category": self.category,
            "priority": self.priority,
            "source": self.source,
            "amount": format_credits(self.amount),
            "remaining": format_credits(self.remaining),
            "expired": format_credits(self.expired),
            "used": format_credits(self.amount - self.remaining - self.expired),
            "effective_at": self.effective_at.isoformat(),
            "expires_at": None if self.expires_at is None else self.expires_at.isoformat(),
            "status": self.status,
            "transaction_id": self.transaction_id,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class Sweep:
    accounts: int  # accounts looked at
    expired: int  # micro-credits expired


class Grants:
    def __init__(self, pool: asyncpg.Pool, on_change: Callable[..., Awaitable[None]] | None = None) -> None:
        self.pool = pool
        self.on_change = on_change

    async def list(
        self, subject_id: str, *, status: GrantStatus | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[Grant], int]:
        """An account's grants, newest first, and how many match in all."""
        rows = await self.pool.fetch(SQL_LIST, subject_id, status, limit, offset)
        total = rows[0]["total"] if rows else 0
        return [Grant(**{k: v for k, v in r.items() if k != "total"}) for r in rows], total

    async def summary(self, subject_id: str) -> dict[str, Any]:
        """What the balance is made of: paid and promotional credit left, the overrun owed, and
        the next expiry (when, and how much credit it takes)."""
        row = await self.pool.fetchrow(SQL_SUMMARY, subject_id)
        at = row["next_expiry_at"]
        return {
            "paid": format_credits(row["paid"]),
            "promotional": format_credits(row["promotional"]),
            "overrun": format_credits(row["overrun"]),
            "next_expiry": None
            if at is None
            else {"at": at.isoformat(), "amount": format_credits(row["next_expiry_amount"])},
        }

    async def expire_due(self, *, batch: int = 500) -> Sweep:
        """Expire what is left of grants past their expiry (database clock), once each, an account
        at a time (each in its own transaction, under its row lock: sweepers on several hosts
        may race, and each grant's remainder is expired by one of them)."""
        subjects = [r["subject_id"] for r in await self.pool.fetch(SQL_DUE, batch)]
        total = 0
        for subject in subjects:
            expired = await self.pool.fetchval(SQL_EXPIRE, subject)
            if expired and self.on_change is not None:
                await self.on_change(subject)
            total += expired or 0
        return Sweep(len(subjects), total)


__all__ = ["Grant", "GrantStatus", "Grants", "Sweep"]
