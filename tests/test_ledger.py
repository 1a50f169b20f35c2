"""The ledger on a real PostgreSQL: credits, holds, settlement, caps, expiry, invariants."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from litellm_credits.bulk_credits import BulkItem
from litellm_credits.errors import (
    AccountDisabled,
    AccountNotFound,
    Conflict,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidRequest,
    MonthlyCapExceeded,
    NotFound,
)
from litellm_credits.ledger import Ledger, UsageRecord
from litellm_credits.money import parse_credits as c
from litellm_credits.records import GrantTerms

from .conftest import AccountFactory

USAGE = UsageRecord(model="m", prompt_tokens=10, completion_tokens=5)


async def ledger_total(ledger: Ledger, subject: str) -> int:
    return await ledger.pool.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM credits.credit_transactions WHERE subject_id = $1", subject
    )


async def assert_sound(ledger: Ledger, subject: str) -> None:
    account = await ledger.require_account(subject)
    assert account.balance == await ledger_total(ledger, subject)
    open_holds = await ledger.pool.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM credits.holds"
        " WHERE subject_id = $1 AND status = 'open' AND debits",
        subject,
    )
    assert account.held == open_holds
    assert await ledger.discrepancies() == []


async def test_credit_is_idempotent_by_key(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("0")
    first = await ledger.credit(subject, c("5"), idempotency_key="grant-1", description="welcome")
    again = await ledger.credit(subject, c("5"), idempotency_key="grant-1")
    assert again.id == first.id
    assert (await ledger.require_account(subject)).balance == c("5")
    with pytest.raises(Conflict):
        await ledger.credit(subject, c("6"), idempotency_key="grant-1")
    await assert_sound(ledger, subject)


async def test_credit_to_missing_account(ledger: Ledger) -> None:
    with pytest.raises(AccountNotFound):
        await ledger.credit("nobody-" + uuid.uuid4().hex, c("1"))


async def test_hold_settle_exactly_once(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("10")
    hold = await ledger.hold(subject, c("3"), ttl_seconds=60)
    account_now = await ledger.require_account(subject)
    assert (account_now.balance, account_now.held, account_now.available) == (c("10"), c("3"), c("7"))

    settled = await ledger.settle(subject, hold.id, c("1.25"), USAGE)
    assert settled is not None and settled.charged == c("1.25") and settled.balance == c("8.75")
    # a duplicate, a late void and a late settle change nothing
    assert await ledger.settle(subject, hold.id, c("1.25"), USAGE) is None
    assert await ledger.void(subject, hold.id) is False
    assert await ledger.settle(subject, hold.id, c("2"), USAGE) is None

    after = await ledger.require_account(subject)
    assert (after.balance, after.held, after.month_spend) == (c("8.75"), 0, c("1.25"))
    rows = await ledger.pool.fetch(
        "SELECT amount, type, hold_id FROM credits.credit_transactions WHERE subject_id = $1 ORDER BY id",
        subject,
    )
    assert [(r["amount"], r["type"]) for r in rows] == [(c("10"), "allocation"), (-c("1.25"), "usage")]
    events = await ledger.pool.fetch(
        "SELECT status, cost, charged FROM credits.usage_events WHERE subject_id = $1", subject
    )
    assert [(e["status"], e["cost"], e["charged"]) for e in events] == [("success", c("1.25"), c("1.25"))]
    await assert_sound(ledger, subject)


async def test_void_releases_without_charge(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("2")
    hold = await ledger.hold(subject, c("2"), ttl_seconds=60)
    with pytest.raises(InsufficientCredits):
        await ledger.hold(subject, c("0.000001"), ttl_seconds=60)
    assert await ledger.void(subject, hold.id) is True
    assert await ledger.void(subject, hold.id) is False
    assert await ledger.settle(subject, hold.id, c("2"), USAGE) is None
    after = await ledger.require_account(subject)
    assert (after.balance, after.held) == (c("2"), 0)
    status = await ledger.pool.fetchval(
        "SELECT status FROM credits.usage_events WHERE request_id = $1", str(hold.id)
    )
    assert status == "failed"
    await assert_sound(ledger, subject)


async def test_refusal_details(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("1")
    with pytest.raises(InsufficientCredits) as err:
        await ledger.hold(subject, c("1.5"), ttl_seconds=60)
    body = err.value.to_body()["error"]
    assert body["type"] == "insufficient_credits" and body["code"] == "402"
    assert body["details"]["balance"] == "1.000000"
    assert body["details"]["required"] == "1.500000"
    with pytest.raises(AccountNotFound):
        await ledger.hold("missing-" + uuid.uuid4().hex, 1, ttl_seconds=60)
    await ledger.pool.execute(
        "UPDATE credits.credit_accounts SET status = 'disabled' WHERE subject_id = $1", subject
    )
    with pytest.raises(AccountDisabled):
        await ledger.hold(subject, 1, ttl_seconds=60)


async def test_overrun_is_charged_and_blocks_the_next_call(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("1")
    hold = await ledger.hold(subject, c("0.5"), ttl_seconds=60)
    settled = await ledger.settle(subject, hold.id, c("1.2"), USAGE)
    assert settled is not None and settled.balance == -c("0.2")
    with pytest.raises(InsufficientCredits):
        await ledger.hold(subject, c("0.01"), ttl_seconds=60)
    # a free request (estimate 0) is still allowed
    free = await ledger.hold(subject, 0, ttl_seconds=60)
    await ledger.settle(subject, free.id, 0, USAGE)
    await assert_sound(ledger, subject)


async def test_monthly_cap_counts_open_holds(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("100", monthly_cap="5")
    first = await ledger.hold(subject, c("3"), ttl_seconds=60)
    with pytest.raises(MonthlyCapExceeded) as err:
        await ledger.hold(subject, c("3"), ttl_seconds=60)
    details = err.value.details
    assert details["monthly_cap"] == "5.000000"
    assert details["resets_at"].endswith("T00:00:00+00:00")
    await ledger.settle(subject, first.id, c("4"), USAGE)
    assert (await ledger.require_account(subject)).month_spend == c("4")
    await ledger.hold(subject, c("1"), ttl_seconds=60)
    with pytest.raises(MonthlyCapExceeded):
        await ledger.hold(subject, c("0.000001"), ttl_seconds=60)


async def test_lowering_the_cap_below_spend_blocks(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("100")
    hold = await ledger.hold(subject, c("2"), ttl_seconds=60)
    await ledger.settle(subject, hold.id, c("2"), USAGE)
    await ledger.set_monthly_cap(subject, c("1"))
    with pytest.raises(MonthlyCapExceeded):
        await ledger.hold(subject, 1, ttl_seconds=60)
    await ledger.set_monthly_cap(subject, None)
    await ledger.hold(subject, 1, ttl_seconds=60)


async def test_month_spend_resets_at_the_start_of_a_month(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("100", monthly_cap="5")
    hold = await ledger.hold(subject, c("5"), ttl_seconds=60)
    await ledger.settle(subject, hold.id, c("5"), USAGE)
    with pytest.raises(MonthlyCapExceeded):
        await ledger.hold(subject, 1, ttl_seconds=60)
    # the spend was made last month (as the database clock sees it)
    await ledger.pool.execute(
        "UPDATE credits.credit_accounts SET month_start = month_start - interval '1 month'"
        " WHERE subject_id = $1",
        subject,
    )
    assert (await ledger.require_account(subject)).month_spend == 0
    fresh = await ledger.hold(subject, c("5"), ttl_seconds=60)
    await ledger.settle(subject, fresh.id, c("1"), USAGE)
    assert (await ledger.require_account(subject)).month_spend == c("1")


async def test_unlimited_hold_records_usage_without_debit(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("0", tier="sponsored")
    hold = await ledger.hold(subject, c("50"), ttl_seconds=60, debits=False)
    settled = await ledger.settle(subject, hold.id, c("7.5"), USAGE)
    assert settled is not None and settled.charged == 0
    after = await ledger.require_account(subject)
    assert (after.balance, after.held) == (0, 0)
    row = await ledger.pool.fetchrow(
        "SELECT cost, charged, transaction_id FROM credits.usage_events WHERE request_id = $1", str(hold.id)
    )
    assert (row["cost"], row["charged"], row["transaction_id"]) == (c("7.5"), 0, None)
    await assert_sound(ledger, subject)


@pytest.mark.parametrize("policy", ["void", "capture"])
async def test_sweeper_resolves_expired_holds(ledger: Ledger, account: AccountFactory, policy: str) -> None:
    subject = await account("10")
    stale = await ledger.hold(subject, c("4"), ttl_seconds=1)
    live = await ledger.hold(subject, c("1"), ttl_seconds=600)
    await asyncio.sleep(1.2)
    resolved = 0
    # other tests' holds may expire too; resolve until ours is done
    for _ in range(5):
        resolved += await ledger.expire(policy=policy, batch=1000)  # type: ignore[arg-type]
        status = await ledger.pool.fetchval("SELECT status FROM credits.holds WHERE id = $1", stale.id)
        if status != "open":
            break
    assert resolved >= 1
    assert status == ("expired" if policy == "void" else "captured")
    after = await ledger.require_account(subject)
    assert after.held == c("1")
    assert after.balance == (c("10") if policy == "void" else c("6"))
    assert await ledger.pool.fetchval("SELECT status FROM credits.holds WHERE id = $1", live.id) == "open"
    await assert_sound(ledger, subject)
    late = await ledger.settle(subject, stale.id, c("1"), USAGE)
    if policy == "capture":
        assert late is None  # the estimate was charged; nothing more
    else:
        # the upstream served it after all: the late usage is charged, once
        assert late is not None and late.charged == c("1")
        assert await ledger.settle(subject, stale.id, c("1"), USAGE) is None
        event = await ledger.pool.fetchrow(
            "SELECT status, charged FROM credits.usage_events WHERE request_id = $1", str(stale.id)
        )
        assert (event["status"], event["charged"]) == ("success", c("1"))
    after = await ledger.require_account(subject)
    assert after.held == c("1")
    assert after.balance == (c("9") if policy == "void" else c("6"))
    await assert_sound(ledger, subject)


async def test_ledger_rows_cannot_change(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("1")
    for sql in (
        "UPDATE credits.credit_transactions SET amount = 999 WHERE subject_id = $1",
        "DELETE FROM credits.credit_transactions WHERE subject_id = $1",
    ):
        with pytest.raises(asyncpg.PostgresError) as err:
            await ledger.pool.execute(sql, subject)
        assert err.value.sqlstate == "CR001"
    with pytest.raises(asyncpg.PostgresError):
        await ledger.pool.execute("TRUNCATE credits.credit_transactions CASCADE")
    assert await ledger_total(ledger, subject) == c("1")


async def test_concurrent_holds_never_overspend(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("10")

    async def attempt() -> bool:
        try:
            hold = await ledger.hold(subject, c("1"), ttl_seconds=60)
        except InsufficientCredits:
            return False
        await ledger.settle(subject, hold.id, c("1"), USAGE)
        return True

    results = await asyncio.gather(*(attempt() for _ in range(100)))
    assert sum(results) == 10
    after = await ledger.require_account(subject)
    assert (after.balance, after.held) == (0, 0)
    await assert_sound(ledger, subject)


@pytest.mark.parametrize("seed", range(4))
async def test_random_operations_match_a_model(ledger: Ledger, account: AccountFactory, seed: int) -> None:
    """Model-based: a random mix of operations; the database agrees with a plain model."""
    rng = random.Random(seed)
    subject = await account("0", monthly_cap=str(rng.choice([20, 50, 1000])))
    cap = (await ledger.require_account(subject)).monthly_cap
    assert cap is not None
    balance = held = spend = 0
    open_holds: dict[uuid.UUID, int] = {}
    for _ in range(120):
        op = rng.choice(["credit", "hold", "hold", "settle", "void"])
        if op == "credit":
            amount = rng.randint(1, 5_000_000)
            await ledger.credit(subject, amount)
            balance += amount
        elif op == "hold":
            amount = rng.randint(0, 3_000_000)
            fits = amount == 0 or (balance - held >= amount and spend + held + amount <= cap)
            try:
                hold = await ledger.hold(subject, amount, ttl_seconds=600)
            except (InsufficientCredits, MonthlyCapExceeded):
                assert not fits
            else:
                assert fits
                open_holds[hold.id] = amount
                held += amount
        elif open_holds:
            hold_id = rng.choice(list(open_holds))
            amount = open_holds.pop(hold_id)
            held -= amount
            if op == "settle":
                charge = rng.randint(0, amount * 2)  # sometimes an overrun
                await ledger.settle(subject, hold_id, charge, USAGE)
                balance -= charge
                spend += charge
            else:
                await ledger.void(subject, hold_id)
        now = await ledger.require_account(subject)
        assert (now.balance, now.held, now.month_spend) == (balance, held, spend)
    await assert_sound(ledger, subject)


async def test_retried_hold_is_taken_once(ledger: Ledger, account: AccountFactory) -> None:
    """A hold retried after its commit's reply was lost (same id) reserves the amount once."""
    subject = await account("10")
    hold_id = uuid.uuid4()
    first = await ledger.hold(subject, c("4"), ttl_seconds=60, hold_id=hold_id)
    again = await ledger.hold(subject, c("4"), ttl_seconds=60, hold_id=hold_id)
    assert again.expires_at == first.expires_at
    assert (await ledger.require_account(subject)).held == c("4")
    await assert_sound(ledger, subject)


async def test_hold_takes_the_quote_of_the_accounts_tier(ledger: Ledger, account: AccountFactory) -> None:
    from litellm_credits.ledger import Quote

    quotes = {"free": Quote(c("1")), "pro": Quote(c("1.1")), "sponsored": Quote(c("1"), debits=False)}
    for tier, held, debits in [
        ("free", c("1"), True),
        ("pro", c("1.1"), True),
        ("sponsored", 0, False),
        ("retired-tier", c("1"), True),
    ]:
        subject = await account("5", tier=tier)
        hold = await ledger.hold_quoted(subject, quotes, default_tier="free", ttl_seconds=60)
        assert (hold.tier, hold.debits) == (tier, debits)
        assert (await ledger.require_account(subject)).held == held
        await assert_sound(ledger, subject)


async def _charged(ledger: Ledger, subject: str, amount: int) -> int:
    hold = await ledger.hold(subject, amount, ttl_seconds=60)
    await ledger.settle(subject, hold.id, amount, USAGE)
    return int(
        await ledger.pool.fetchval(
            "SELECT id FROM credits.credit_transactions WHERE hold_id = $1 AND subject_id = $2",
            hold.id,
            subject,
        )
    )


async def test_refunds_never_exceed_the_charge(ledger: Ledger, account: AccountFactory) -> None:
    from litellm_credits.errors import RefundTooLarge

    subject = await account("10")
    usage_id = await _charged(ledger, subject, c("4"))
    part = await ledger.refund(subject, usage_id, c("1.5"), description="partial")
    assert (part.type, part.amount, part.balance_after) == ("refund", c("1.5"), c("7.5"))
    with pytest.raises(RefundTooLarge) as err:
        await ledger.refund(subject, usage_id, c("3"))
    assert err.value.details["refundable"] == "2.500000"
    rest = await ledger.refund(subject, usage_id)  # the remainder
    assert rest.amount == c("2.5")
    with pytest.raises(Conflict):
        await ledger.refund(subject, usage_id)
    allocation_id = await ledger.pool.fetchval(
        "SELECT id FROM credits.credit_transactions WHERE subject_id = $1 AND type = 'allocation'", subject
    )
    with pytest.raises(InvalidRequest):
        await ledger.refund(subject, allocation_id)
    other = await account("1")
    with pytest.raises(NotFound):
        await ledger.refund(other, usage_id)  # another account's charge does not exist for it
    await assert_sound(ledger, subject)


async def test_concurrent_refunds_of_one_charge_pay_once(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("10")
    usage_id = await _charged(ledger, subject, c("4"))
    results = await asyncio.gather(
        *(ledger.refund(subject, usage_id) for _ in range(8)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, Conflict) for r in results if isinstance(r, BaseException))
    assert (await ledger.require_account(subject)).balance == c("10")
    await assert_sound(ledger, subject)


async def test_refund_replay_by_idempotency_key(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("10")
    usage_id = await _charged(ledger, subject, c("4"))
    first = await ledger.refund(subject, usage_id, c("1"), idempotency_key="ticket-17")
    again = await ledger.refund(subject, usage_id, c("1"), idempotency_key="ticket-17")
    assert again.id == first.id
    assert (await ledger.require_account(subject)).balance == c("7")


async def test_bulk_credit_is_all_or_nothing(ledger: Ledger, account: AccountFactory) -> None:
    a, b = await account("0"), await account("0")
    with pytest.raises(AccountNotFound) as err:
        await ledger.credit_many({a: c("1"), b: c("2"), "ghost-" + uuid.uuid4().hex: c("3")})
    assert len(err.value.details["missing"]) == 1
    assert (await ledger.require_account(a)).balance == 0  # nothing was credited
    txs = await ledger.credit_many({a: c("1"), b: c("2")}, idempotency_key="promo-1")
    assert sorted(t.amount for t in txs) == [c("1"), c("2")]
    again = await ledger.credit_many({a: c("1"), b: c("2")}, idempotency_key="promo-1")
    assert {t.id for t in again} == {t.id for t in txs}
    assert (await ledger.require_account(b)).balance == c("2")
    await assert_sound(ledger, a)


async def test_bulk_credit_each_with_its_own_description_and_terms(
    ledger: Ledger, account: AccountFactory
) -> None:
    a, b = await account("0"), await account("0")
    soon = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=30)
    items = {
        a: BulkItem(c("1"), "promo", GrantTerms("promotional", 7, soon)),
        b: BulkItem(c("2"), "refill", GrantTerms("paid")),
    }
    with pytest.raises(AccountNotFound):
        await ledger.credit_each({**items, "ghost-" + uuid.uuid4().hex: BulkItem(c("3"))})
    assert [(await ledger.require_account(s)).balance for s in (a, b)] == [0, 0]  # nothing credited
    key = "promo-" + uuid.uuid4().hex
    txs = await ledger.credit_each(items, idempotency_key=key)
    assert [(t.subject_id, t.amount, t.description) for t in txs] == sorted(
        [(a, c("1"), "promo"), (b, c("2"), "refill")]
    )
    grants = await ledger.pool.fetch(
        "SELECT subject_id, category, priority, expires_at FROM credits.grants WHERE subject_id = ANY($1)",
        [a, b],
    )
    assert sorted(tuple(g) for g in grants) == sorted([(a, "promotional", 7, soon), (b, "paid", 0, None)])
    again = await ledger.credit_each(items, idempotency_key=key)
    assert [t.id for t in again] == [t.id for t in txs]
    with pytest.raises(IdempotencyConflict):
        await ledger.credit_each(
            {**items, b: BulkItem(c("2"), "refill", GrantTerms("paid", 1))}, idempotency_key=key
        )
    assert [(await ledger.require_account(s)).balance for s in (a, b)] == [c("1"), c("2")]
    await assert_sound(ledger, a)


async def test_daily_rollup_equals_the_events(ledger: Ledger, account: AccountFactory) -> None:
    """usage_daily is kept by a trigger through inserts and late-settle updates; it must always
    equal a fresh aggregate of usage_events."""
    subject = await account("10")
    stale = await ledger.hold(subject, c("1"), ttl_seconds=1)
    await ledger.settle(subject, (await ledger.hold(subject, c("1"), ttl_seconds=60)).id, c("0.5"), USAGE)
    await asyncio.sleep(1.1)
    await ledger.expire(policy="void", batch=1000)
    await ledger.settle(subject, stale.id, c("0.25"), USAGE)  # updates the expired event in place
    drift = await ledger.pool.fetch(
        """
        SELECT coalesce(e.subject_id, d.subject_id) AS subject_id
        FROM (SELECT subject_id, (created_at AT TIME ZONE 'UTC')::date AS day,
                     count(*) AS requests, sum(charged) AS charged, sum(cost) AS cost,
                     count(*) FILTER (WHERE status = 'success') AS succeeded
              FROM credits.usage_events GROUP BY 1, 2) e
        FULL JOIN (SELECT * FROM credits.usage_daily WHERE requests <> 0) d USING (subject_id, day)
        WHERE e.requests IS DISTINCT FROM d.requests OR e.charged IS DISTINCT FROM d.charged
           OR e.cost IS DISTINCT FROM d.cost OR e.succeeded IS DISTINCT FROM d.succeeded
        """
    )
    assert drift == []
    mine = await ledger.pool.fetchrow(
        "SELECT sum(requests) AS requests, sum(charged) AS charged"
        " FROM credits.usage_daily WHERE subject_id = $1",
        subject,
    )
    assert (mine["requests"], mine["charged"]) == (2, c("0.75"))


async def test_twin_attempts_of_one_hold_in_flight_at_once_both_get_it(
    ledger: Ledger, account: AccountFactory, database_url: str
) -> None:
    """Regression (review): two attempts of one hold id in flight at once (a retry while the
    first attempt's backend still waits on the account's lock) both missed the hold in their
    snapshot; the second then met the balance the first had taken and was refused with 402 for
    a hold that existed."""
    subject = await account("10")
    hold_id = uuid.uuid4()
    blocker = await asyncpg.connect(database_url)
    try:
        async with blocker.transaction():
            await blocker.execute(
                "SELECT 1 FROM credits.credit_accounts WHERE subject_id = $1 FOR UPDATE", subject
            )
            first = asyncio.create_task(ledger.hold(subject, c("10"), ttl_seconds=60, hold_id=hold_id))
            await asyncio.sleep(0.2)
            twin = asyncio.create_task(ledger.hold(subject, c("10"), ttl_seconds=60, hold_id=hold_id))
            await asyncio.sleep(0.2)
    finally:
        await blocker.close()
    held = await asyncio.gather(first, twin)
    assert {h.id for h in held} == {hold_id} and sorted(h.replayed for h in held) == [False, True]
    assert (await ledger.require_account(subject)).held == c("10")
    await assert_sound(ledger, subject)
