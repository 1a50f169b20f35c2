"""Replays of keyed ledger operations: the same key and request return the first result and change
nothing; the same key with another request is 409 idempotency_conflict, whatever the balance is now.

Each test pins one bug, named after it: the three of the idempotency issue (numbered as there),
and those the model-based test (tests/test_ledger_model.py) found after their fix.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timezone
from typing import Any, cast

import asyncpg
import pytest

from litellm_credits import charges
from litellm_credits.bulk_credits import BulkItem, request_hash
from litellm_credits.errors import IdempotencyConflict
from litellm_credits.ledger import Ledger, Quote, UsageRecord
from litellm_credits.ledger_sql import SQL_HOLD, SQL_RESOLVE
from litellm_credits.money import parse_credits as c
from litellm_credits.records import GrantTerms

from .conftest import AccountFactory
from .test_ledger import assert_sound

USAGE = UsageRecord(service="search", model="m")


class LossyPool:
    """An asyncpg pool whose next reply to a chosen statement is lost after the statement ran.

    The statement commits (it is one implicit transaction), then the caller sees the connection
    die, as asyncpg reports it when the server or the network goes away mid-reply; the ledger's
    retry then runs the statement a second time. Everything else goes to the real pool.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.pending: list[str] = []  # statements whose next reply is lost, once each
        self.lost = 0

    def lose_next_reply(self, sql: str) -> None:
        self.pending.append(sql)

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        row = await self.pool.fetchrow(query, *args, **kwargs)
        if query in self.pending:
            self.pending.remove(query)
            self.lost += 1
            raise asyncpg.exceptions.ConnectionDoesNotExistError(
                "connection was closed in the middle of operation"
            )
        return row

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


def lossy(ledger: Ledger) -> tuple[Ledger, LossyPool]:
    """A ledger on the same database whose replies can be lost (retried without waiting)."""
    pool = LossyPool(ledger.pool)
    return Ledger(cast(asyncpg.Pool, pool), retry_delay=0), pool


def flat(amount: int) -> dict[str, Quote]:
    """The same price on every tier of tests/credits_test.yaml (sponsored is unlimited)."""
    return {"free": Quote(amount), "pro": Quote(amount), "sponsored": Quote(amount, debits=False)}


async def holds_of(ledger: Ledger, subject: str) -> int:
    return int(
        await ledger.pool.fetchval("SELECT count(*) FROM credits.holds WHERE subject_id = $1", subject)
    )


async def usage_of(ledger: Ledger, subject: str) -> list[int]:
    rows = await ledger.pool.fetch(
        "SELECT amount FROM credits.credit_transactions WHERE subject_id = $1 AND type = 'usage' ORDER BY id",
        subject,
    )
    return [r["amount"] for r in rows]


async def _charged(ledger: Ledger, subject: str, amount: int) -> int:
    """Settle a hold for ``amount``; returns the usage transaction's id."""
    hold = await ledger.hold(subject, amount, ttl_seconds=600)
    settled = await ledger.settle(subject, hold.id, amount, USAGE)
    assert settled is not None and settled.transaction_id is not None
    return settled.transaction_id


# (1) SQL_HOLD checks the balance before its INSERT meets the unique violation -----------------


async def test_hold_retried_after_a_lost_reply_when_it_used_up_the_balance(
    ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("10")
    unreliable, pool = lossy(ledger)
    pool.lose_next_reply(SQL_HOLD)
    hold_id = uuid.uuid4()
    hold = await unreliable.hold(subject, c("10"), ttl_seconds=600, hold_id=hold_id)  # 402 before the fix
    assert pool.lost == 1
    assert (hold.id, hold.amount, hold.debits) == (hold_id, c("10"), True)
    assert (await ledger.require_account(subject)).held == c("10")  # held once, not twice
    assert await holds_of(ledger, subject) == 1
    await assert_sound(ledger, subject)


async def test_hold_retried_after_a_lost_reply_when_it_reached_the_monthly_cap(
    ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("100", monthly_cap="5")
    unreliable, pool = lossy(ledger)
    pool.lose_next_reply(SQL_HOLD)
    hold = await unreliable.hold(subject, c("5"), ttl_seconds=600)  # 402 monthly_cap_exceeded before the fix
    assert pool.lost == 1 and hold.amount == c("5")
    assert (await ledger.require_account(subject)).held == c("5")
    await assert_sound(ledger, subject)


async def test_hold_replayed_after_the_balance_was_used_up_returns_the_hold(
    ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("10")
    first = await ledger.hold(subject, c("10"), ttl_seconds=600)
    again = await ledger.hold(subject, c("10"), ttl_seconds=600, hold_id=first.id)  # 402 before the fix
    assert again.replayed and not first.replayed
    assert (again.id, again.amount, again.expires_at) == (first.id, first.amount, first.expires_at)
    assert (await ledger.require_account(subject)).held == c("10")
    await assert_sound(ledger, subject)


async def test_charge_replayed_after_it_used_up_the_balance(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("1")
    first = await charges.charge(
        ledger, subject, flat(c("1")), default_tier="free", idempotency_key="search-1", usage=USAGE
    )
    assert (first.charged, first.balance, first.replayed) == (c("1"), 0, False)
    again = await charges.charge(  # 402 before the fix
        ledger, subject, flat(c("1")), default_tier="free", idempotency_key="search-1", usage=USAGE
    )
    assert again.replayed and again.hold_id == first.hold_id
    assert again.transaction is not None and first.transaction is not None
    assert again.transaction.id == first.transaction.id
    assert await usage_of(ledger, subject) == [-c("1")]
    await assert_sound(ledger, subject)


async def test_charge_retried_after_a_lost_hold_reply_when_it_used_up_the_balance(
    ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("1")
    unreliable, pool = lossy(ledger)
    pool.lose_next_reply(SQL_HOLD)
    done = await charges.charge(  # 402 before the fix
        unreliable, subject, flat(c("1")), default_tier="free", idempotency_key="search-2", usage=USAGE
    )
    assert pool.lost == 1
    assert (done.charged, done.balance, done.replayed) == (c("1"), 0, False)
    assert await usage_of(ledger, subject) == [-c("1")]
    await assert_sound(ledger, subject)


async def test_charge_replayed_with_another_amount_after_the_balance_was_used_up_is_a_conflict(
    ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("1")
    await charges.charge(ledger, subject, flat(c("1")), default_tier="free", idempotency_key="k", usage=USAGE)
    # 402 before the fix: the new amount was checked against the balance first
    with pytest.raises(IdempotencyConflict):
        await charges.charge(
            ledger, subject, flat(c("2")), default_tier="free", idempotency_key="k", usage=USAGE
        )
    assert await usage_of(ledger, subject) == [-c("1")]


# (2) refund() does not compare the transaction a reused key was first used for ----------------


async def test_refund_key_reused_for_another_transaction_is_a_conflict(
    ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("10")
    first_charge = await _charged(ledger, subject, c("2"))
    other_charge = await _charged(ledger, subject, c("3"))
    first = await ledger.refund(subject, first_charge, c("1"), idempotency_key="ticket-9")
    with pytest.raises(IdempotencyConflict):  # returned the first refund before the fix
        await ledger.refund(subject, other_charge, c("1"), idempotency_key="ticket-9")
    with pytest.raises(IdempotencyConflict):
        await ledger.refund(subject, other_charge, idempotency_key="ticket-9")
    again = await ledger.refund(subject, first_charge, c("1"), idempotency_key="ticket-9")
    assert again.id == first.id
    assert (await ledger.require_account(subject)).balance == c("6")
    await assert_sound(ledger, subject)


# (3) credit_many() returns the first run for any request whose accounts all have the key -------


async def test_bulk_credit_replayed_with_other_amounts_is_a_conflict(
    ledger: Ledger, account: AccountFactory
) -> None:
    a, b = await account("0"), await account("0")
    first = await ledger.credit_many({a: c("1"), b: c("2")}, idempotency_key="promo-7")
    with pytest.raises(IdempotencyConflict):  # returned the first run before the fix
        await ledger.credit_many({a: c("1"), b: c("5")}, idempotency_key="promo-7")
    again = await ledger.credit_many({a: c("1"), b: c("2")}, idempotency_key="promo-7")
    assert [t.id for t in again] == [t.id for t in first]
    assert [(await ledger.require_account(s)).balance for s in (a, b)] == [c("1"), c("2")]


async def test_bulk_credit_replayed_for_fewer_accounts_is_a_conflict(
    ledger: Ledger, account: AccountFactory
) -> None:
    a, b = await account("0"), await account("0")
    await ledger.credit_many({a: c("1"), b: c("2")}, idempotency_key="promo-8")
    with pytest.raises(IdempotencyConflict):  # returned part of the first run before the fix
        await ledger.credit_many({a: c("1")}, idempotency_key="promo-8")


async def test_bulk_credit_replayed_with_another_type_is_a_conflict(
    ledger: Ledger, account: AccountFactory
) -> None:
    a = await account("0")
    await ledger.credit_many({a: c("1")}, idempotency_key="promo-9")
    with pytest.raises(IdempotencyConflict):  # returned the allocation before the fix
        await ledger.credit_many({a: c("1")}, type="bonus", idempotency_key="promo-9")


async def test_bulk_credit_each_keeps_credit_many_request_hashes(
    ledger: Ledger, account: AccountFactory
) -> None:
    """Bulk grants with their own terms per account share credit_many's code: a key credit_many
    stored before still matches its replay (same hash), through either function."""

    def stored(*asked: Any) -> str:  # what credit_many stored: sha256 of [type, amounts(, terms)]
        return hashlib.sha256(json.dumps(list(asked)).encode()).hexdigest()

    terms = GrantTerms("promotional", 3, datetime(2031, 1, 1, tzinfo=timezone.utc))
    amounts = [["a", 1], ["b", 2]]
    assert request_hash("allocation", {"b": BulkItem(2), "a": BulkItem(1, "x")}) == stored(
        "allocation", amounts
    )
    assert request_hash("bonus", {"a": BulkItem(1, None, terms), "b": BulkItem(2, "y", terms)}) == stored(
        "bonus", amounts, ["promotional", 3, "2031-01-01T00:00:00+00:00"]
    )
    a, b = await account("0"), await account("0")
    key = "promo-" + uuid.uuid4().hex
    first = await ledger.credit_many({a: c("1"), b: c("2")}, idempotency_key=key, terms=terms)
    items = {a: BulkItem(c("1"), None, terms), b: BulkItem(c("2"), None, terms)}
    assert [t.id for t in await ledger.credit_each(items, idempotency_key=key)] == [t.id for t in first]
    with pytest.raises(IdempotencyConflict):
        await ledger.credit_each(
            {**items, b: BulkItem(c("2"), None, GrantTerms("paid"))}, idempotency_key=key
        )
    assert [(await ledger.require_account(s)).balance for s in (a, b)] == [c("1"), c("2")]


# found by the model: a bulk key is kept on each account's row, so a request for other accounts
# finds none of it ---------------------------------------------------------------------------


async def test_bulk_credit_key_reused_for_other_accounts_is_a_conflict(
    ledger: Ledger, account: AccountFactory
) -> None:
    a, b = await account("0"), await account("0")
    await ledger.credit_many({a: c("1")}, idempotency_key="promo-10")
    # none of the first run's accounts: the request looks new and is credited under the same key
    with pytest.raises(IdempotencyConflict):
        await ledger.credit_many({b: c("1")}, idempotency_key="promo-10")
    assert (await ledger.require_account(b)).balance == 0


# found by the model: a resolution retried after a lost reply finds the hold it ended and answers
# "already ended" (the hook then skips the call's tokens; a charge is answered as a replay) -----


async def test_settle_retried_after_a_lost_reply_returns_the_settlement(
    ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("10")
    hold = await ledger.hold(subject, c("2"), ttl_seconds=600)
    unreliable, pool = lossy(ledger)
    pool.lose_next_reply(SQL_RESOLVE)
    settled = await unreliable.settle(subject, hold.id, c("1"), USAGE)  # the bug: None, "already ended"
    assert pool.lost == 1
    assert settled is not None and (settled.balance, settled.charged) == (c("9"), c("1"))
    assert await usage_of(ledger, subject) == [-c("1")]  # charged once
    await assert_sound(ledger, subject)


async def test_charge_with_a_lost_settle_reply_is_not_reported_as_replayed(
    ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("5")
    unreliable, pool = lossy(ledger)
    pool.lose_next_reply(SQL_RESOLVE)
    done = await charges.charge(
        unreliable, subject, flat(c("2")), default_tier="free", idempotency_key="tts-1", usage=USAGE
    )
    assert pool.lost == 1
    # the API answers "charged": "0" for a replay; this was the first (and only) charge
    assert (done.replayed, done.charged, done.balance) == (False, c("2"), c("3"))
    assert await usage_of(ledger, subject) == [-c("2")]
