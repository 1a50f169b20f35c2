"""Bulk grants: credit many accounts in one transaction, all of them or none."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from . import metrics
from .errors import AccountIsMember, AccountNotFound, IdempotencyConflict, InvalidRequest
from .ledger_sql import (
    SQL_APPLY_BONUS,
    SQL_BULK_CLAIM,
    SQL_BULK_REQUEST,
    SQL_CREDIT,
    SQL_PARENT,
    SQL_TX_BY_KEY,
    SQL_TX_REQUEST,
)
from .records import DEFAULT_TERMS, GrantTerms


@dataclass(frozen=True)
class Credited:
    """A bulk grant's ledger rows in account order; ``fresh`` when this call wrote them (a replay
    returns the first run's), and ``bonus``, the percent-coupon bonuses it paid beside them."""

    rows: list[asyncpg.Record]
    fresh: bool
    bonus: int = 0

    def count(self, type: str) -> None:
        """Count what this call credited (nothing for a replay); after the commit."""
        if self.fresh:
            metrics.count_credited(type, sum(r["amount"] for r in self.rows), self.bonus)


@dataclass(frozen=True)
class BulkItem:
    """What one account of a bulk grant gets: its amount (micro-credits), the ledger row's
    description, and the terms of the grant the credit opens."""

    amount: int
    description: str | None = None
    terms: GrantTerms = DEFAULT_TERMS


async def credit_many(
    pool: asyncpg.Pool,
    grants: Mapping[str, int],
    *,
    type: str,
    description: str | None,
    idempotency_key: str | None,
    terms: GrantTerms = DEFAULT_TERMS,
) -> Credited:
    """Credit several accounts in one transaction, all with one description and grant terms
    (:func:`credit_each`)."""
    items = {s: BulkItem(a, description, terms) for s, a in grants.items()}
    return await credit_each(pool, items, type=type, idempotency_key=idempotency_key)


def request_hash(type: str, items: Mapping[str, BulkItem]) -> str:
    """What an idempotency key's request asked for: the type, each account's amount, and the grant
    terms (not the descriptions). Terms all alike hash as a :func:`credit_many` of them always has
    (none when they are the defaults), so an earlier key still matches its replay."""
    asked: list[Any] = [type, sorted((s, i.amount) for s, i in items.items())]
    kinds = {i.terms for i in items.values()}
    if len(kinds) > 1:
        asked.append({s: _terms(i.terms) for s, i in sorted(items.items())})
    elif kinds != {DEFAULT_TERMS}:
        asked.append(_terms(kinds.pop()))
    return hashlib.sha256(json.dumps(asked).encode()).hexdigest()


def _terms(terms: GrantTerms) -> list[Any]:
    expires = None if terms.expires_at is None else terms.expires_at.isoformat()
    return [terms.category, terms.priority, expires]


async def credit_each(
    pool: asyncpg.Pool,
    items: Mapping[str, BulkItem],
    *,
    type: str,
    idempotency_key: str | None,
) -> Credited:
    """Credit several accounts in one transaction, each with its own amount, description and grant
    terms: all of them, or (on any error) none; returns their ledger rows in account order.

    Accounts are locked in sorted order, so concurrent bulk grants cannot deadlock. With an
    idempotency key, a replay returns the first run's rows (``fresh`` false), and the key used for
    any other request (other amounts, accounts, type or grant terms) is ``IdempotencyConflict``.
    """
    if not items or any(i.amount <= 0 for i in items.values()):
        raise InvalidRequest("every amount must be positive", param="items")
    keys = {s: f"{idempotency_key or 'bulk:' + str(uuid.uuid4())}:{s}" for s in items}
    subjects = sorted(items)
    async with pool.acquire() as conn, conn.transaction():
        if idempotency_key is not None:
            request = request_hash(type, items)
            if await conn.fetchval(SQL_BULK_CLAIM, idempotency_key, request, subjects) is None:
                first = await conn.fetchrow(SQL_BULK_REQUEST, idempotency_key)
                if first is None or first["request_hash"] != request:
                    raise IdempotencyConflict()
                return Credited([await conn.fetchrow(SQL_TX_BY_KEY, s, keys[s]) for s in subjects], False)
            # a key used before bulk grants were recorded (migration 0008) has only its rows
            done = [await conn.fetchrow(SQL_TX_REQUEST, s, keys[s]) for s in subjects]
            if any(done):
                if not all(done) or any(
                    r["amount"] != items[s].amount
                    or r["type"] != type
                    or GrantTerms.recorded(r) != items[s].terms
                    for s, r in zip(subjects, done, strict=True)
                ):
                    raise IdempotencyConflict()
                return Credited([await conn.fetchrow(SQL_TX_BY_KEY, s, keys[s]) for s in subjects], False)
        rows, missing, bonus = [], [], 0
        for subject in subjects:
            item = items[subject]
            row = await conn.fetchrow(
                SQL_CREDIT,
                subject,
                item.amount,
                type,
                keys[subject],
                item.description,
                {},
                None,
                *item.terms.args(),
                None,
            )
            if row is None:
                missing.append(subject)
                continue
            rows.append(row)
            if type == "allocation":
                bonus += await conn.fetchval(SQL_APPLY_BONUS, subject, item.amount, row["id"]) or 0
        if missing:
            members = [s for s in missing if await conn.fetchval(SQL_PARENT, s) is not None]
            if members:
                raise AccountIsMember(
                    f"{len(members)} of {len(items)} accounts are team members, whose credits "
                    "are their teams'; nothing was credited",
                    param="items",
                    members=members,
                )
            raise AccountNotFound(
                f"{len(missing)} of {len(items)} accounts do not exist; nothing was credited",
                param="items",
                missing=missing,
            )
    return Credited(rows, True, bonus)


__all__ = [
    "BulkItem",
    "Credited",
    "credit_each",
    "credit_many",
    "request_hash",
]
