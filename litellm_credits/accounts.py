"""Account administration that moves no money: search, tier, cap, status, display name."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from .errors import AccountNotFound, InvalidRequest
from .ledger_sql import ACCOUNT_COLUMNS
from .records import Account

_UNSET: Any = object()

# $1 search text (NULL = all), $2 tier, $3 status, $4 limit, $5 offset
_WHERE = """($1::text IS NULL OR a.subject_id ILIKE '%' || $1 || '%' ESCAPE '\\'
                              OR a.display_name ILIKE '%' || $1 || '%' ESCAPE '\\')
  AND ($2::text IS NULL OR a.tier = $2)
  AND ($3::text IS NULL OR a.status = $3)"""
SQL_LIST = f"""
SELECT {ACCOUNT_COLUMNS} FROM credits.credit_accounts a
WHERE {_WHERE}
ORDER BY a.created_at DESC, a.subject_id
LIMIT $4 OFFSET $5
"""
SQL_COUNT = f"SELECT count(*) FROM credits.credit_accounts a WHERE {_WHERE}"
SQL_UPDATE = f"""
UPDATE credits.credit_accounts a SET
    tier         = CASE WHEN $2 THEN $3 ELSE a.tier END,
    monthly_cap  = CASE WHEN $4 THEN $5 ELSE a.monthly_cap END,
    status       = CASE WHEN $6 THEN $7 ELSE a.status END,
    display_name = CASE WHEN $8 THEN $9 ELSE a.display_name END
WHERE a.subject_id = $1
RETURNING {ACCOUNT_COLUMNS}
"""


def like_escape(text: str) -> str:
    """``text`` matched literally inside an ILIKE pattern."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass
class Accounts:
    pool: asyncpg.Pool
    # told after an account changed (the cache invalidates it)
    on_change: Callable[[str], Awaitable[None]] | None = None

    async def search(
        self,
        *,
        text: str | None = None,
        tier: str | None = None,
        status: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Account], int]:
        args = (like_escape(text) if text else None, tier, status)
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(SQL_LIST, *args, limit, offset)
            total = await conn.fetchval(SQL_COUNT, *args)
        return [Account(**dict(r)) for r in rows], total

    async def update(
        self,
        subject_id: str,
        *,
        tier: str = _UNSET,
        monthly_cap: int | None = _UNSET,
        status: str = _UNSET,
        display_name: str | None = _UNSET,
    ) -> Account:
        """Change only the fields given (``monthly_cap=None`` removes the cap)."""
        if status is not _UNSET and status not in ("active", "disabled"):
            raise InvalidRequest("status must be active or disabled", param="status")
        fields = (tier, monthly_cap, status, display_name)
        args: list[Any] = []
        for value in fields:
            args += [value is not _UNSET, None if value is _UNSET else value]
        row = await self.pool.fetchrow(SQL_UPDATE, subject_id, *args)
        if row is None:
            raise AccountNotFound(f"no credit account {subject_id!r}", param="user_id")
        if self.on_change is not None:
            await self.on_change(subject_id)
        return Account(**dict(row))


__all__ = ["Accounts", "like_escape"]
