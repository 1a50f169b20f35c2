"""Bulk grants: credit many accounts in one transaction, all of them or none."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg

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


async def credit_many(
    pool: asyncpg.Pool,
    grants: Mapping[str, int],
    *,
    type: str,
    description: str | None,
    idempotency_key: str | None,
    terms: GrantTerms = DEFAULT_TERMS,
) -> list[asyncpg.Record]:
    """Credit several accounts in one transaction: all of them, or (on any error) none; returns
    their ledger rows in account order.

    Accounts are locked in sorted order, so concurrent bulk grants cannot deadlock. With an
    idempotency key, a replay returns the first run's rows, and the key used for any other request
    (other amounts, accounts, type or grant terms) is ``IdempotencyConflict``.
    """
    if not grants or any(a <= 0 for a in grants.values()):
        raise InvalidRequest("every amount must be positive", param="items")
    keys = {s: f"{idempotency_key or 'bulk:' + str(uuid.uuid4())}:{s}" for s in grants}
    subjects = sorted(grants)
    async with pool.acquire() as conn, conn.transaction():
        if idempotency_key is not None:
            asked: list[Any] = [type, sorted(grants.items())]
            if terms != DEFAULT_TERMS:  # (a key of a run without terms hashes as before)
                expires = None if terms.expires_at is None else terms.expires_at.isoformat()
                asked.append([terms.category, terms.priority, expires])
            request = hashlib.sha256(json.dumps(asked).encode()).hexdigest()
            if await conn.fetchval(SQL_BULK_CLAIM, idempotency_key, request, subjects) is None:
                first = await conn.fetchrow(SQL_BULK_REQUEST, idempotency_key)
                if first is None or first["request_hash"] != request:
                    raise IdempotencyConflict()
                return [await conn.fetchrow(SQL_TX_BY_KEY, s, keys[s]) for s in subjects]
            # a key used before bulk grants were recorded (migration 0008) has only its rows
            done = [await conn.fetchrow(SQL_TX_REQUEST, s, keys[s]) for s in subjects]
            if any(done):
                if not all(done) or any(
                    r["amount"] != grants[s] or r["type"] != type or GrantTerms.recorded(r) != terms
                    for s, r in zip(subjects, done, strict=True)
                ):
                    raise IdempotencyConflict()
                return [await conn.fetchrow(SQL_TX_BY_KEY, s, keys[s]) for s in subjects]
        rows, missing = [], []
        for subject in subjects:
            row = await conn.fetchrow(
                SQL_CREDIT,
                subject,
                grants[subject],
                type,
                keys[subject],
                description,
                {},
                None,
                *terms.args(),
            )
            if row is None:
                missing.append(subject)
                continue
            rows.append(row)
            if type == "allocation":
                await conn.execute(SQL_APPLY_BONUS, subject, grants[subject], row["id"])
        if missing:
            members = [s for s in missing if await conn.fetchval(SQL_PARENT, s) is not None]
            if members:
                raise AccountIsMember(
                    f"{len(members)} of {len(grants)} accounts are team members, whose credits "
                    "are their teams'; nothing was credited",
                    param="items",
                    members=members,
                )
            raise AccountNotFound(
                f"{len(missing)} of {len(grants)} accounts do not exist; nothing was credited",
                param="items",
                missing=missing,
            )
    return rows


__all__ = ["credit_many"]
