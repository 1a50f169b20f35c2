"""Coupons: codes an operator hands out, redeemed once per account.

- A **fixed** coupon grants its value in credits at once (a ``coupon`` ledger row).
- A **percent** coupon grants a bonus of that percentage of the account's *next allocation*
  (rounded down to the micro-credit), paid as a ``coupon`` row beside that allocation.

Either is a promotional grant (migration 0010), expiring ``credit_valid_days`` after it is granted
when the coupon says so.

The database enforces the limits, so concurrent redemptions cannot both pass: once per account
is the primary key of ``coupon_redemptions``; ``max_uses`` is a conditional ``UPDATE`` of the
coupon row, whose row lock serialises the last use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import asyncpg

from . import metrics
from .errors import (
    AccountIsMember,
    AccountNotFound,
    CouponAlreadyRedeemed,
    CouponExhausted,
    CouponExists,
    CouponExpired,
    CouponNotApplicable,
    CouponNotFound,
)
from .ledger_sql import SQL_CREDIT
from .money import format_credits, parse_credits

COUPON_COLUMNS = (
    "code, type, value, max_uses, uses, expires_at, tiers, active, created_at, credit_valid_days,"
    " credit_priority"
)
SQL_CREATE = f"""
INSERT INTO credits.coupon_codes (code, type, value, max_uses, expires_at, tiers, credit_valid_days,
                                  credit_priority)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (code) DO NOTHING
RETURNING {COUPON_COLUMNS}
"""
SQL_LIST = f"""
SELECT {COUPON_COLUMNS} FROM credits.coupon_codes
WHERE ($1::boolean IS NULL OR active = $1)
ORDER BY created_at DESC, code
LIMIT $2 OFFSET $3
"""
SQL_COUNT = "SELECT count(*) FROM credits.coupon_codes WHERE ($1::boolean IS NULL OR active = $1)"
SQL_DEACTIVATE = f"UPDATE credits.coupon_codes SET active = false WHERE code = $1 RETURNING {COUPON_COLUMNS}"
SQL_ACCOUNT_TIER = "SELECT tier, parent_id FROM credits.credit_accounts WHERE subject_id = $1 FOR UPDATE"
# (when the credits it grants now expire: the database clock, like every expiry)
SQL_COUPON = f"""
SELECT {COUPON_COLUMNS}, expires_at <= now() AS expired,
       now() + credit_valid_days * interval '1 day' AS credit_expires_at
FROM credits.coupon_codes WHERE code = $1
"""
SQL_CLAIM = """
INSERT INTO credits.coupon_redemptions (subject_id, code, type, value, applied_at)
VALUES ($1, $2, $3, $4, CASE WHEN $3 = 'fixed' THEN now() END)
ON CONFLICT (subject_id, code) DO NOTHING
RETURNING created_at
"""
SQL_USE = """
UPDATE credits.coupon_codes SET uses = uses + 1
WHERE code = $1 AND active AND (max_uses IS NULL OR uses < max_uses)
  AND (expires_at IS NULL OR expires_at > now())
RETURNING uses
"""
SQL_REDEEMED = """
SELECT transaction_id, created_at FROM credits.coupon_redemptions WHERE subject_id = $1 AND code = $2
"""
SQL_LINK = "UPDATE credits.coupon_redemptions SET transaction_id = $3 WHERE subject_id = $1 AND code = $2"


def normalize(code: str) -> str:
    return code.strip().upper()


def coupon_json(row: asyncpg.Record) -> dict[str, Any]:
    value: Decimal = row["value"]
    return {
        "code": row["code"],
        "type": row["type"],
        "value": format_credits(parse_credits(value))
        if row["type"] == "fixed"
        else format(value.normalize(), "f"),
        "max_uses": row["max_uses"],
        "uses": row["uses"],
        "expires_at": row["expires_at"].isoformat() if row["expires_at"] else None,
        "tiers": list(row["tiers"]) if row["tiers"] else None,
        "active": row["active"],
        "created_at": row["created_at"].isoformat(),
        "credit_valid_days": row["credit_valid_days"],
        "credit_priority": row["credit_priority"],
    }


@dataclass(frozen=True)
class Redemption:
    code: str
    type: str
    value: Decimal
    credited: int  # micro-credits granted now (fixed); 0 for a percent coupon
    balance: int | None
    transaction_id: int | None


@dataclass
class Coupons:
    pool: asyncpg.Pool
    # told after a redemption credited an account (the cache invalidates it)
    on_change: Callable[[str], Awaitable[None]] | None = None

    async def create(
        self,
        code: str,
        type: Literal["fixed", "percent"],
        value: Decimal,
        *,
        max_uses: int | None = None,
        expires_at: datetime | None = None,
        tiers: Sequence[str] | None = None,
        credit_valid_days: int | None = None,
        credit_priority: int | None = None,
    ) -> dict[str, Any]:
        """A coupon; the credits it grants are promotional, expiring ``credit_valid_days`` after
        the redemption (None: never) and burnt at ``credit_priority`` (None: 0)."""
        row = await self.pool.fetchrow(
            SQL_CREATE,
            normalize(code),
            type,
            value,
            max_uses,
            expires_at,
            list(tiers) if tiers else None,
            credit_valid_days,
            credit_priority,
        )
        if row is None:
            raise CouponExists(f"coupon {normalize(code)} already exists", param="code")
        return coupon_json(row)

    async def list(self, *, active: bool | None, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(SQL_LIST, active, limit, offset)
            total = await conn.fetchval(SQL_COUNT, active)
        return [coupon_json(r) for r in rows], total

    async def deactivate(self, code: str) -> dict[str, Any]:
        row = await self.pool.fetchrow(SQL_DEACTIVATE, normalize(code))
        if row is None:
            raise CouponNotFound(f"no coupon {normalize(code)}", param="code")
        return coupon_json(row)

    async def redeem(self, subject_id: str, code: str) -> Redemption:
        """Redeem ``code`` for the account, all in one transaction (nothing happens on an error)."""
        redeemed = await self._redeem(subject_id, normalize(code))
        metrics.count_credited("coupon", redeemed.credited)  # committed (a repeat raised instead)
        if redeemed.credited and self.on_change is not None:
            await self.on_change(subject_id)
        return redeemed

    async def _redeem(self, subject_id: str, code: str) -> Redemption:
        async with self.pool.acquire() as conn, conn.transaction():
            account = await conn.fetchrow(SQL_ACCOUNT_TIER, subject_id)
            if account is None:
                raise AccountNotFound(f"no credit account {subject_id!r}", param="user_id")
            tier = account["tier"]
            # (account, code) is the redemption's key, looked up first: a repeat is told it was
            # redeemed, with the first redemption, even after the coupon expired or ran out
            first = await conn.fetchrow(SQL_REDEEMED, subject_id, code)
            if first is not None:
                raise _already_redeemed(code, first)
            coupon = await conn.fetchrow(SQL_COUPON, code)
            if coupon is None or not coupon["active"]:
                raise CouponNotFound("no such coupon", param="code")
            if coupon["expired"]:
                raise CouponExpired(f"coupon {code} has expired", param="code")
            if account["parent_id"] is not None:
                raise AccountIsMember(
                    f"{subject_id!r} spends its team's credits; the team {account['parent_id']!r} redeems "
                    "coupons",
                    param="code",
                    team_id=account["parent_id"],
                )
            if coupon["tiers"] and tier not in coupon["tiers"]:
                raise CouponNotApplicable(f"coupon {code} is not valid for the {tier} tier", param="code")
            if await conn.fetchval(SQL_CLAIM, subject_id, code, coupon["type"], coupon["value"]) is None:
                # unreachable while the account row is locked above; kept as the database's word
                raise CouponAlreadyRedeemed(
                    f"coupon {code} was already redeemed by this account", param="code"
                )
            if await conn.fetchval(SQL_USE, code) is None:
                raise CouponExhausted(f"coupon {code} has no uses left", param="code")
            if coupon["type"] == "percent":
                return Redemption(code, "percent", coupon["value"], 0, None, None)
            amount = parse_credits(coupon["value"])
            tx = await conn.fetchrow(
                SQL_CREDIT,
                subject_id,
                amount,
                "coupon",
                f"coupon:{code}",
                f"coupon {code}",
                {"coupon": code},
                None,
                "promotional",
                coupon["credit_priority"],
                coupon["credit_expires_at"],
                None,
            )
            await conn.execute(SQL_LINK, subject_id, code, tx["id"])
            return Redemption(code, "fixed", coupon["value"], amount, tx["balance_after"], tx["id"])


def _already_redeemed(code: str, first: asyncpg.Record) -> CouponAlreadyRedeemed:
    return CouponAlreadyRedeemed(
        f"coupon {code} was already redeemed by this account",
        param="code",
        redeemed_at=first["created_at"].isoformat(),
        transaction_id=first["transaction_id"],
    )


__all__ = ["Coupons", "Redemption", "coupon_json", "normalize"]
