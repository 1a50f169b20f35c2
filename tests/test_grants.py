"""Credit grants on a real PostgreSQL: burn order, expiry (once, with sweepers racing, never under
an open hold), refunds back to their grants, overrun paid off by the next credit, both balance
identities after every step."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from litellm_credits.errors import InsufficientCredits
from litellm_credits.grants import Grants
from litellm_credits.history import History, TxFilter
from litellm_credits.ledger import Ledger, UsageRecord
from litellm_credits.money import parse_credits as c
from litellm_credits.records import GrantTerms

from .conftest import AccountFactory

USAGE = UsageRecord(model="m", prompt_tokens=10, completion_tokens=5)
TTL = 600


def days(n: float) -> datetime:
    return datetime.now(timezone.utc) + timedelta(days=n)


async def assert_identities(ledger: Ledger, subject: str) -> None:
    """balance = sum(ledger rows) = sum(remaining of live grants) - overrun; held = open holds."""
    row = await ledger.pool.fetchrow(
        """
        SELECT a.balance, a.overrun,
               (SELECT coalesce(sum(amount), 0) FROM credits.credit_transactions t
                WHERE t.subject_id = a.subject_id) AS ledger,
               (SELECT coalesce(sum(remaining), 0) FROM credits.grants g
                WHERE g.subject_id = a.subject_id AND g.status = 'live') AS live
        FROM credits.credit_accounts a WHERE a.subject_id = $1
        """,
        subject,
    )
    assert row["balance"] == row["ledger"]
    assert row["balance"] == row["live"] - row["overrun"]
    assert [r for r in await ledger.discrepancies() if r["subject_id"] == subject] == []


async def remaining(ledger: Ledger, subject: str) -> dict[str, int]:
    """Each grant's remaining credit, by the description of the credit that opened it."""
    rows = await ledger.pool.fetch(
        """
        SELECT t.description, g.remaining FROM credits.grants g
        JOIN credits.credit_transactions t ON t.subject_id = g.subject_id AND t.id = g.transaction_id
        WHERE g.subject_id = $1
        """,
        subject,
    )
    return {r["description"]: r["remaining"] for r in rows}


async def move_expiry(ledger: Ledger, subject: str, description: str, ago: timedelta) -> None:
    """As if the clock had moved past a grant's expiry: its expiry (and start) moved back."""
    await ledger.pool.execute(
        """
        UPDATE credits.grants g SET effective_at = now() - $3::interval - interval '1 day',
                                    expires_at = now() - $3::interval
        FROM credits.credit_transactions t
        WHERE g.subject_id = $1 AND t.subject_id = g.subject_id AND t.id = g.transaction_id
          AND t.description = $2
        """,
        subject,
        description,
        ago,
    )
    await ledger.pool.execute(
        "UPDATE credits.credit_accounts SET grants_due_at = now() - $2::interval WHERE subject_id = $1",
        subject,
        ago,
    )


async def charge(ledger: Ledger, subject: str, amount: int, *, hold: int | None = None) -> int:
    """Hold and settle ``amount``; returns the usage row's id."""
    held = await ledger.hold(subject, hold or amount, ttl_seconds=TTL)
    settled = await ledger.settle(subject, held.id, amount, USAGE)
    assert settled is not None and settled.transaction_id is not None
    return settled.transaction_id


async def test_usage_burns_by_priority_then_expiry_then_age(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("0")
    await ledger.credit(subject, c("10"), description="paid p10", terms=GrantTerms(priority=10))
    await ledger.credit(subject, c("2"), description="paid p0 no expiry")
    await ledger.credit(
        subject, c("4"), description="promo 30d", terms=GrantTerms("promotional", 0, days(30))
    )
    await ledger.credit(subject, c("3"), description="promo 7d", terms=GrantTerms("promotional", 0, days(7)))
    await assert_identities(ledger, subject)

    tx = await charge(ledger, subject, c("8"))
    # priority 0 first: the 7-day grant, then the 30-day one, then the one without expiry
    assert await remaining(ledger, subject) == {
        "paid p10": c("10"),
        "paid p0 no expiry": c("1"),
        "promo 30d": 0,
        "promo 7d": 0,
    }
    burns = await ledger.pool.fetch(
        "SELECT grant_id, amount FROM credits.grant_burns WHERE subject_id = $1 AND transaction_id = $2",
        subject,
        tx,
    )
    assert sorted(b["amount"] for b in burns) == [c("1"), c("3"), c("4")]
    await assert_identities(ledger, subject)

    summary = await Grants(ledger.pool).summary(subject)
    assert summary == {
        "paid": "11.000000",
        "promotional": "0.000000",
        "overrun": "0.000000",
        "next_expiry": None,
    }


async def test_expiry_writes_one_row_per_grant_with_sweepers_racing(
    ledger: Ledger, account: AccountFactory, database_url: str
) -> None:
    subjects = [await account("1") for _ in range(4)]
    for s in subjects:
        await ledger.credit(s, c("5"), description="promo", terms=GrantTerms("promotional", 0, days(1)))
        await ledger.credit(s, c("2"), description="promo 2", terms=GrantTerms("promotional", 0, days(2)))
        await move_expiry(ledger, s, "promo", timedelta(minutes=1))
        await move_expiry(ledger, s, "promo 2", timedelta(seconds=30))

    pools = [await asyncpg.create_pool(database_url, min_size=1, max_size=2) for _ in range(2)]
    try:
        sweeps = await asyncio.gather(*(Grants(p).expire_due(batch=10_000) for p in pools))
        again = await Grants(pools[0]).expire_due(batch=10_000)
    finally:
        for p in pools:
            await p.close()
    assert sum(s.expired for s in sweeps) >= c("7") * len(subjects)  # (other tests' accounts too)
    assert again.expired == 0
    for s in subjects:
        rows = await ledger.pool.fetch(
            "SELECT amount, metadata FROM credits.credit_transactions"
            " WHERE subject_id = $1 AND type = 'expiry' ORDER BY amount",
            s,
        )
        assert [r["amount"] for r in rows] == [-c("5"), -c("2")]
        assert (await ledger.require_account(s)).balance == c("1")
        await assert_identities(ledger, s)
        statuses = await ledger.pool.fetch(
            "SELECT status, expired FROM credits.grants WHERE subject_id = $1 AND expires_at IS NOT NULL", s
        )
        assert {(r["status"], r["expired"]) for r in statuses} == {("expired", c("5")), ("expired", c("2"))}


async def test_a_hold_never_spends_expired_credit(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("0")
    await ledger.credit(subject, c("5"), description="promo", terms=GrantTerms("promotional", 0, days(3)))
    await move_expiry(ledger, subject, "promo", timedelta(seconds=1))
    # no sweeper ran: the hold expires what is due first, and finds nothing left
    with pytest.raises(InsufficientCredits):
        await ledger.hold(subject, c("1"), ttl_seconds=TTL)
    assert (await ledger.require_account(subject)).balance == 0
    await assert_identities(ledger, subject)


async def test_expiry_keeps_what_an_open_hold_was_taken_on(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("0")
    await ledger.credit(subject, c("5"), description="promo", terms=GrantTerms("promotional", 0, days(3)))
    held = await ledger.hold(subject, c("3"), ttl_seconds=TTL)
    await move_expiry(ledger, subject, "promo", timedelta(seconds=1))

    sweep = await Grants(ledger.pool).expire_due(batch=10_000)
    assert sweep.expired >= c("2")
    account_now = await ledger.require_account(subject)
    assert (account_now.balance, account_now.held) == (c("3"), c("3"))  # nothing more to spend
    with pytest.raises(InsufficientCredits):
        await ledger.hold(subject, c("0.5"), ttl_seconds=TTL)
    await assert_identities(ledger, subject)

    # the request was held before the expiry: it is paid as it was held, from the kept credit
    await ledger.settle(subject, held.id, c("2"), USAGE)
    assert (await ledger.require_account(subject)).balance == c("1")
    await assert_identities(ledger, subject)
    # what it left expires at the next sweep (or the next hold)
    await Grants(ledger.pool).expire_due(batch=10_000)
    assert (await ledger.require_account(subject)).balance == 0
    expiries = await ledger.pool.fetch(
        "SELECT amount FROM credits.credit_transactions"
        " WHERE subject_id = $1 AND type = 'expiry' ORDER BY id",
        subject,
    )
    assert [r["amount"] for r in expiries] == [-c("2"), -c("1")]
    await assert_identities(ledger, subject)
    # the history and its CSV export show them (type expiry)
    exported = [t async for t in History(ledger.pool).export(subject, TxFilter(type="expiry"))]
    assert [(t.type, t.amount) for t in exported] == [("expiry", -c("2")), ("expiry", -c("1"))]


async def test_refund_returns_credit_to_its_grants_and_never_revives_an_expired_one(
    ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("0")
    await ledger.credit(subject, c("4"), description="promo", terms=GrantTerms("promotional", 0, days(3)))
    await ledger.credit(subject, c("10"), description="paid")
    tx = await charge(ledger, subject, c("6"))  # 4 from the promotion, 2 from the paid grant
    assert await remaining(ledger, subject) == {"promo": 0, "paid": c("8")}

    # the last burnt first: the paid grant gets its 2 back, then the promotion 1
    await ledger.refund(subject, tx, c("3"))
    assert await remaining(ledger, subject) == {"promo": c("1"), "paid": c("10")}
    await assert_identities(ledger, subject)

    await move_expiry(ledger, subject, "promo", timedelta(seconds=1))
    await Grants(ledger.pool).expire_due(batch=10_000)
    assert (await ledger.require_account(subject)).balance == c("10")
    # the promotion's last 3 are refunded, and expire at once: the history shows both
    await ledger.refund(subject, tx)
    assert (await ledger.require_account(subject)).balance == c("10")
    assert await remaining(ledger, subject) == {"promo": 0, "paid": c("10")}
    rows = await ledger.pool.fetch(
        "SELECT type, amount FROM credits.credit_transactions WHERE subject_id = $1 ORDER BY id DESC LIMIT 2",
        subject,
    )
    assert [(r["type"], r["amount"]) for r in rows] == [("expiry", -c("3")), ("refund", c("3"))]
    await assert_identities(ledger, subject)


async def test_an_overrun_is_paid_off_by_the_next_credit(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("0")
    await ledger.credit(subject, c("1"), description="first")
    await charge(ledger, subject, c("1.5"), hold=c("1"))  # settled above its hold: 0.5 overrun
    account_now = await ledger.require_account(subject)
    assert account_now.balance == -c("0.5")
    assert await ledger.pool.fetchval(
        "SELECT overrun FROM credits.credit_accounts WHERE subject_id = $1", subject
    ) == c("0.5")
    await assert_identities(ledger, subject)

    await ledger.credit(subject, c("2"), description="second")
    assert await remaining(ledger, subject) == {"first": 0, "second": c("1.5")}
    assert (await Grants(ledger.pool).summary(subject))["overrun"] == "0.000000"
    await assert_identities(ledger, subject)


async def test_a_negative_adjustment_burns_grants(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("0")
    await ledger.credit(subject, c("3"), description="promo", terms=GrantTerms("promotional", 0, days(3)))
    await ledger.credit(subject, c("3"), description="paid")
    await ledger.credit(subject, -c("4"), type="adjustment", description="correction")
    assert await remaining(ledger, subject) == {"promo": 0, "paid": c("2")}
    await assert_identities(ledger, subject)


async def test_grant_terms_are_part_of_an_idempotent_credit(ledger: Ledger, account: AccountFactory) -> None:
    from litellm_credits.errors import IdempotencyConflict

    subject = await account("0")
    terms = GrantTerms("promotional", 5, days(10))
    first = await ledger.credit(subject, c("1"), idempotency_key="k", terms=terms)
    assert (await ledger.credit(subject, c("1"), idempotency_key="k", terms=terms)).id == first.id
    with pytest.raises(IdempotencyConflict):
        await ledger.credit(
            subject, c("1"), idempotency_key="k", terms=GrantTerms("paid", 5, terms.expires_at)
        )
    items, total = await Grants(ledger.pool).list(subject)
    assert total == 1 and items[0].category == "promotional" and items[0].priority == 5


async def test_a_team_members_usage_burns_the_teams_grants(ledger: Ledger, account: AccountFactory) -> None:
    team = await account("0")
    await ledger.credit(team, c("2"), description="promo", terms=GrantTerms("promotional", 0, days(1)))
    await ledger.credit(team, c("5"), description="paid")
    member = "member-" + uuid.uuid4().hex[:8]
    await ledger.create_account(member, tier="free", parent_id=team)
    held = await ledger.hold(member, c("3"), ttl_seconds=TTL)
    assert held.subject_id == team
    await ledger.settle(team, held.id, c("3"), USAGE)
    assert await remaining(ledger, team) == {"promo": 0, "paid": c("4")}
    await assert_identities(ledger, team)
    await assert_identities(ledger, member)
