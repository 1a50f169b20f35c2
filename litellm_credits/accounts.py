"""Account administration that moves no money: search, tier, caps, status, display name, and
team membership (which team, if any, an account spends from)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from .errors import AccountNotFound, CreditsError, InvalidRequest, NotFound, TeamHierarchy
from .ledger_sql import ACCOUNT_COLUMNS, TEAM_LEVELS
from .records import Account

_UNSET: Any = object()

# $1 search text (NULL = all), $2 tier, $3 status, $4 team (its members), $5 minimum and
# $6 maximum balance (micro-credits), $7 limit, $8 offset
_WHERE = """($1::text IS NULL OR a.subject_id ILIKE '%' || $1 || '%' ESCAPE '\\'
                              OR a.display_name ILIKE '%' || $1 || '%' ESCAPE '\\')
  AND ($2::text IS NULL OR a.tier = $2)
  AND ($3::text IS NULL OR a.status = $3)
  AND ($4::text IS NULL OR a.parent_id = $4)
  AND ($5::bigint IS NULL OR a.balance >= $5)
  AND ($6::bigint IS NULL OR a.balance <= $6)"""
SQL_LIST = f"""
SELECT {ACCOUNT_COLUMNS} FROM credits.credit_accounts a
WHERE {_WHERE}
ORDER BY a.created_at DESC, a.subject_id
LIMIT $7 OFFSET $8
"""
SQL_COUNT = f"SELECT count(*) FROM credits.credit_accounts a WHERE {_WHERE}"
SQL_UPDATE = f"""
UPDATE credits.credit_accounts a SET
    tier         = CASE WHEN $2 THEN $3 ELSE a.tier END,
    monthly_cap  = CASE WHEN $4 THEN $5 ELSE a.monthly_cap END,
    status       = CASE WHEN $6 THEN $7 ELSE a.status END,
    display_name = CASE WHEN $8 THEN $9 ELSE a.display_name END,
    daily_cap    = CASE WHEN $10 THEN $11 ELSE a.daily_cap END,
    request_cap  = CASE WHEN $12 THEN $13 ELSE a.request_cap END
WHERE a.subject_id = $1
  AND ($14::text IS NULL OR a.parent_id = $14)  -- a team changing its own member's caps
RETURNING {ACCOUNT_COLUMNS}
"""
# a move changes parent_id alone, so the two-level trigger (migration 0009) runs only then
SQL_MOVE = f"""
UPDATE credits.credit_accounts a SET parent_id = $2
WHERE a.subject_id = $1 AND a.parent_id IS DISTINCT FROM $2
RETURNING {ACCOUNT_COLUMNS}
"""
SQL_MEMBERS = f"""
SELECT {ACCOUNT_COLUMNS} FROM credits.credit_accounts a
WHERE a.parent_id = $1
ORDER BY a.subject_id
LIMIT $2 OFFSET $3
"""
SQL_MEMBER_COUNT = "SELECT count(*) FROM credits.credit_accounts WHERE parent_id = $1"
SQL_HAS_MEMBERS = "SELECT EXISTS (SELECT 1 FROM credits.credit_accounts WHERE parent_id = $1)"


def like_escape(text: str) -> str:
    """``text`` matched literally inside an ILIKE pattern."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def joining_error(exc: asyncpg.PostgresError, parent_id: str | None) -> CreditsError | None:
    """What joining ``parent_id``'s team answers when the database refused it: no such account,
    or a team that is itself a member (SQLSTATE CR002, teams have two levels); None otherwise."""
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return AccountNotFound(f"no credit account {parent_id!r} to join", param="parent_id")
    if exc.sqlstate == TEAM_LEVELS:
        return TeamHierarchy(
            f"{parent_id!r} is a member of a team itself; teams have two levels", param="parent_id"
        )
    return None


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
        team: str | None = None,
        min_balance: int | None = None,
        max_balance: int | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Account], int]:
        """Accounts, newest first, and how many match; ``team``: its members; balances in
        micro-credits, inclusive."""
        args = (like_escape(text) if text else None, tier, status, team, min_balance, max_balance)
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
        daily_cap: int | None = _UNSET,
        request_cap: int | None = _UNSET,
        parent_id: str | None = _UNSET,
        member_of: str | None = None,
    ) -> Account:
        """Change only the fields given (a cap of None removes it; ``parent_id`` moves the
        account into that team, or out of any with None), all at once or none; ``member_of``:
        only while the account is a member of that team (else ``NotFound``)."""
        if status is not _UNSET and status not in ("active", "disabled"):
            raise InvalidRequest("status must be active or disabled", param="status")
        fields = (tier, monthly_cap, status, display_name, daily_cap, request_cap)
        args: list[Any] = []
        for value in fields:
            args += [value is not _UNSET, None if value is _UNSET else value]
        for attempt in range(3):
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    row = await conn.fetchrow(SQL_UPDATE, subject_id, *args, member_of)
                    if row is None and member_of is not None:
                        raise NotFound(f"{subject_id!r} is not a member of this team", param="member_id")
                    if row is None:
                        raise AccountNotFound(f"no credit account {subject_id!r}", param="user_id")
                    if parent_id is not _UNSET:
                        row = await self._move(conn, subject_id, parent_id) or row
                break
            except asyncpg.DeadlockDetectedError:
                # two accounts moved into each other at once: one of them, tried again, is told
                # that teams have two levels
                if attempt == 2:
                    raise
        if self.on_change is not None:
            await self.on_change(subject_id)
        return Account(**dict(row))

    @staticmethod
    async def _move(
        conn: asyncpg.Connection, subject_id: str, parent_id: str | None
    ) -> asyncpg.Record | None:
        """Put the account in ``parent_id``'s team (None: out of any): its later requests spend
        the team's credits within its caps and the team's. Open holds end where they began."""
        if parent_id is not None:
            if parent_id == subject_id:
                raise InvalidRequest("an account cannot be its own team", param="parent_id")
            if await conn.fetchval(SQL_HAS_MEMBERS, subject_id):
                raise TeamHierarchy(
                    f"{subject_id!r} has members of its own; teams have two levels", param="parent_id"
                )
        try:
            return await conn.fetchrow(SQL_MOVE, subject_id, parent_id)
        except asyncpg.PostgresError as exc:
            raise joining_error(exc, parent_id) or exc from None

    async def members(self, parent_id: str, *, limit: int = 50, offset: int = 0) -> tuple[list[Account], int]:
        """A team's members, by id."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(SQL_MEMBERS, parent_id, limit, offset)
            total = await conn.fetchval(SQL_MEMBER_COUNT, parent_id)
        return [Account(**dict(r)) for r in rows], total


__all__ = ["Accounts", "like_escape"]
