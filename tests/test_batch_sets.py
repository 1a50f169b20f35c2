"""Batches done as sets (migration 0016): credits.take_holds and credits.resolve_holds take the common
case of a whole account in one step, and must answer and write exactly what the single-item
functions (credits.take_hold, credits.resolve_hold) do when they run the same items one by one.

Each scenario runs twice on two accounts set up alike: once as batches, once item by item; the
answers, the accounts, their grants, their ledger rows and their daily rollup must be the same."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from litellm_credits import migrations
from litellm_credits.ledger import Ledger
from litellm_credits.ledger_batch import HoldItem, ResolveItem, batch_json
from litellm_credits.ledger_sql import SQL_HOLD, SQL_RESOLVE, SQL_RESOLVE_BATCH, SQL_TAKE_BATCH
from litellm_credits.money import parse_credits as c
from litellm_credits.records import GrantTerms, UsageRecord

from .test_ledger import assert_sound

SOON = datetime.now(timezone.utc) + timedelta(days=3)
LATER = datetime.now(timezone.utc) + timedelta(days=30)


@dataclass(frozen=True)
class Setup:
    tier: str = "free"
    grants: tuple[tuple[str, GrantTerms], ...] = (("10", GrantTerms()),)
    monthly_cap: str | None = None
    request_cap: str | None = None


@dataclass(frozen=True)
class Take:
    amount: str
    minimum: str | None = None  # a clamped hold may take this little (None: refuse)
    debits: bool = True  # False: the account's tier is unlimited (usage recorded, not debited)


@dataclass(frozen=True)
class End:
    hold: int  # which Take of the scenario (its index)
    charge: str | None  # None: capture (the hold's amount); "0": void
    status: str = "settled"
    cost: str | None = None


async def open_account(ledger: Ledger, setup: Setup) -> str:
    subject = "sets-" + secrets.token_hex(6)
    await ledger.create_account(subject, tier=setup.tier)
    for amount, terms in setup.grants:
        await ledger.credit(subject, c(amount), terms=terms)
    caps = (
        None if setup.monthly_cap is None else c(setup.monthly_cap),
        None if setup.request_cap is None else c(setup.request_cap),
    )
    await ledger.pool.execute(
        "UPDATE credits.credit_accounts SET monthly_cap = $2, request_cap = $3 WHERE subject_id = $1",
        subject,
        *caps,
    )
    return subject


def hold_item(subject: str, take: Take, hold_id: uuid.UUID) -> HoldItem:
    return HoldItem(
        subject_id=subject,
        hold_id=hold_id,
        tiers=["free", "unlimited"],
        amounts=[c(take.amount), c(take.amount)],
        minimums=[None if take.minimum is None else c(take.minimum)] * 2,
        debits=[take.debits, False],
        default_tier="free",
        ttl_seconds=600,
        model="m",
        power_level="balanced",
        request_hash=None,
        fresh=True,
    )


def resolve_item(subject: str, end: End, hold_id: uuid.UUID, n: int) -> ResolveItem:
    usage = UsageRecord(
        model="m",
        provider="p",
        prompt_tokens=10 + n,
        completion_tokens=20 + n,
        cost=None if end.cost is None else c(end.cost),
        metadata={"n": n},
    )
    if end.status != "settled":
        status = end.status
    else:
        status = "captured" if end.charge is None else "voided" if end.charge == "0" else "settled"
    return ResolveItem(
        subject_id=subject,
        hold_id=hold_id,
        charge=None if end.charge is None else c(end.charge),
        hold_status=status,
        usage_status={"settled": "success", "captured": "success", "voided": "failed"}.get(status, status),
        usage=usage,
    )


def comparable(row: asyncpg.Record | None) -> Any:
    """A result row without what differs between the two accounts (their ids, hold ids, times)."""
    if row is None:
        return None
    out = dict(row)
    out.pop("payer_id", None)
    out.pop("expires_at", None)
    out.pop("transaction_id", None)
    out.pop("idx", None)
    if out.get("seen") is not None:
        out["seen"] = json.loads(out["seen"]) if isinstance(out["seen"], str) else out["seen"]
    return out


async def state(pool: asyncpg.Pool, subject: str) -> dict[str, Any]:
    """What the account, its grants, its ledger and its rollup hold, comparable across accounts."""
    account = await pool.fetchrow(
        "SELECT balance, held, month_spend, day_spend, overrun FROM credits.credit_accounts"
        " WHERE subject_id = $1",
        subject,
    )
    grants = await pool.fetch(
        "SELECT category, priority, amount, remaining, status FROM credits.grants"
        " WHERE subject_id = $1 ORDER BY id",
        subject,
    )
    ledger = await pool.fetch(
        "SELECT t.amount, t.balance_after, t.type, t.prompt_tokens, t.completion_tokens, t.metadata,"
        "       t.power_level, g.priority AS grant_priority,"
        "       (SELECT array_agg(b.amount ORDER BY b.amount) FROM credits.grant_burns b"
        "        WHERE b.subject_id = t.subject_id AND b.transaction_id = t.id) AS burns"
        " FROM credits.credit_transactions t"
        " LEFT JOIN credits.grants g ON g.subject_id = t.subject_id AND g.id = t.grant_id"
        " WHERE t.subject_id = $1 AND t.type = 'usage' ORDER BY t.id",
        subject,
    )
    chain = await pool.fetchval(
        "SELECT count(*) FROM (SELECT balance_after, sum(amount) OVER (ORDER BY id) AS running"
        " FROM credits.credit_transactions WHERE subject_id = $1) x WHERE balance_after <> running",
        subject,
    )
    events = await pool.fetch(
        "SELECT status, prompt_tokens, completion_tokens, cost, charged, metadata, power_level,"
        "       transaction_id IS NOT NULL AS has_row"
        " FROM credits.usage_events WHERE subject_id = $1 ORDER BY id",
        subject,
    )
    daily = await pool.fetch(
        "SELECT requests, succeeded, failed, prompt_tokens, completion_tokens, cost, charged"
        " FROM credits.usage_daily WHERE subject_id = $1",
        subject,
    )
    rollup = await pool.fetch(
        "SELECT count(*) AS requests, count(*) FILTER (WHERE status = 'success') AS succeeded,"
        "       count(*) FILTER (WHERE status <> 'success') AS failed,"
        "       sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,"
        "       sum(cost) AS cost, sum(charged) AS charged"
        " FROM credits.usage_events WHERE subject_id = $1 HAVING count(*) > 0",
        subject,
    )
    assert [dict(r) for r in daily] == [dict(r) for r in rollup]  # the rollup is exact
    assert chain == 0  # every balance_after is the running sum of the rows before it, in id order
    return {
        "account": dict(account),
        "grants": [dict(g) for g in grants],
        "ledger": [dict(r) for r in ledger],
        "events": [dict(e) for e in events],
    }


SQL_SINGLE_CALLS = """
SELECT coalesce(sum(calls) FILTER (WHERE funcname = 'take_hold'), 0)::int,
       coalesce(sum(calls) FILTER (WHERE funcname = 'resolve_hold'), 0)::int
FROM pg_stat_xact_user_functions
"""


async def run_items(
    conn: asyncpg.Connection, subject: str, takes: list[Take], rounds: list[list[End]], as_batch: bool
) -> list[Any]:
    """The holds, then each round of resolutions, as batches or item by item: the answers."""
    hold_ids = [uuid.uuid4() for _ in takes]
    holds = [hold_item(subject, t, h) for t, h in zip(takes, hold_ids, strict=True)]
    if as_batch:
        rows = await conn.fetch(SQL_TAKE_BATCH, batch_json([h.json(True) for h in holds]))
        by_idx = {r["idx"]: r for r in rows}
        taken = [by_idx.get(n) for n in range(len(holds))]
    else:
        taken = [await conn.fetchrow(SQL_HOLD, *h.args(True)) for h in holds]
    answers = [comparable(r) for r in taken]
    for ends in rounds:
        items = [resolve_item(subject, e, hold_ids[e.hold], n) for n, e in enumerate(ends)]
        if as_batch:
            rows = await conn.fetch(SQL_RESOLVE_BATCH, batch_json([i.json() for i in items]))
            by_idx = {r["idx"]: r for r in rows}
            answers += [comparable(by_idx.get(n)) for n in range(len(items))]
        else:
            answers += [comparable(await conn.fetchrow(SQL_RESOLVE, *i.args())) for i in items]
    return answers


async def run_scenario(
    ledger: Ledger,
    setup: Setup,
    takes: list[Take],
    rounds: list[list[End]],
    expect_single: tuple[int, int],
) -> None:
    """``expect_single``: how many items the batches leave to take_hold and resolve_hold (the rest
    went the set path)."""
    batched, single = await open_account(ledger, setup), await open_account(ledger, setup)
    async with ledger.pool.acquire() as conn:
        async with conn.transaction():  # its function calls counted (pg_stat_xact_user_functions)
            await conn.execute("SET LOCAL track_functions = 'pl'")
            before = await conn.fetchrow(SQL_SINGLE_CALLS)  # (calls not yet flushed: counted too)
            batch_answers = await run_items(conn, batched, takes, rounds, as_batch=True)
            after = await conn.fetchrow(SQL_SINGLE_CALLS)
            single_calls = (after[0] - before[0], after[1] - before[1])
        single_answers = await run_items(conn, single, takes, rounds, as_batch=False)
    assert batch_answers == single_answers
    assert await state(ledger.pool, batched) == await state(ledger.pool, single)
    assert single_calls == expect_single
    for subject in (batched, single):
        await assert_sound(ledger, subject)


TAKES_4 = [Take("0.8"), Take("0.8"), Take("0.8"), Take("0.8")]


@pytest.mark.parametrize(
    ("setup", "takes", "ends", "expect_single"),
    [
        pytest.param(  # everything fits; one grant pays every charge: the set path throughout
            Setup(),
            TAKES_4,
            [End(0, "0.5"), End(1, "0"), End(2, None), End(3, "1.7", cost="2")],
            (0, 0),
            id="plain",
        ),
        pytest.param(  # charges past the first grant: each ledger row burns on its own, in order
            Setup(
                grants=(
                    ("1", GrantTerms("promotional", 0, SOON)),
                    ("2", GrantTerms("promotional", 1, LATER)),
                    ("5", GrantTerms()),
                )
            ),
            [Take("0.8")] * 6,
            [End(0, "0.7"), End(1, "0.9"), End(2, "0"), End(3, None), End(4, "0.5"), End(5, "2.5")],
            (0, 0),
            id="across-grants",
        ),
        pytest.param(  # more charged than the account has: the overrun
            Setup(grants=(("1", GrantTerms()),)),
            [Take("0.5"), Take("0.4")],
            [End(0, "0.9"), End(1, "0.8")],
            (0, 2),  # (settlements that could take the balance to zero go one by one)
            id="overrun",
        ),
        pytest.param(  # the sum does not fit: in order, held, held, clamped, refused
            Setup(grants=(("2", GrantTerms()),)),
            [Take("0.8", "0.1"), Take("0.8", "0.1"), Take("0.8", "0.1"), Take("0.8", "0.1")],
            [End(0, "0.3"), End(2, "0.1"), End(3, "0.1")],
            (4, 0),
            id="clamped-and-refused",
        ),
        pytest.param(  # a monthly cap and a per-request cap
            Setup(monthly_cap="2", request_cap="0.9"),
            [Take("0.8"), Take("1"), Take("0.8"), Take("0.8")],
            [End(0, "0.8"), End(2, "0.8")],
            (4, 2),  # (an account with a monthly cap is settled one by one: its alerts)
            id="caps",
        ),
        pytest.param(  # a per-request cap alone: the sum fits, one item does not
            Setup(request_cap="0.9"),
            [Take("0.8"), Take("1"), Take("0.8")],
            [End(0, "0.8"), End(2, "0.8")],
            (3, 0),
            id="request-cap",
        ),
        pytest.param(  # the account's tier is unlimited: held and recorded, never debited
            Setup(tier="unlimited"),
            [Take("0.8"), Take("0.8")],
            [End(0, "0.5"), End(1, None)],
            (0, 0),
            id="unlimited",
        ),
        pytest.param(  # a hold resolved twice in one batch (one by one then), zero-amount holds
            Setup(),
            [Take("0.8"), Take("0"), Take("0")],
            [End(0, "0.5"), End(0, "0.6"), End(1, "0"), End(2, "0.1")],
            (0, 4),
            id="twice-and-zero",
        ),
    ],
)
async def test_a_batch_answers_and_writes_what_single_items_do(
    ledger: Ledger, setup: Setup, takes: list[Take], ends: list[End], expect_single: tuple[int, int]
) -> None:
    await run_scenario(ledger, setup, takes, [ends], expect_single)


async def test_an_expired_hold_settled_late_in_a_batch(ledger: Ledger) -> None:
    """The sweeper expires holds (released, nothing charged); their usage arrives late and settles
    them: charged, with nothing left to release. A hold that was not expired is settled as usual,
    and one expired but never settled stays so."""
    expire = [replace(End(n, "0"), status="expired") for n in range(3)]
    await run_scenario(
        ledger, Setup(), TAKES_4, [expire, [End(0, "0.5"), End(1, "0.3"), End(3, "0.2")]], (0, 0)
    )


async def test_what_a_batch_cannot_take_as_a_set_goes_one_by_one(ledger: Ledger) -> None:
    """An account whose credit is due to expire, and a hold id retried (not fresh): the batch's
    other accounts still go the set path, and these items answer as take_hold would."""
    due = await open_account(
        ledger, Setup(grants=(("1", GrantTerms("promotional", 0, SOON)), ("5", GrantTerms())))
    )
    plain = await open_account(ledger, Setup())
    await ledger.pool.execute(
        "UPDATE credits.grants SET effective_at = now() - interval '2 seconds',"
        " expires_at = now() - interval '1 second'"
        " WHERE subject_id = $1 AND expires_at IS NOT NULL",
        due,
    )
    await ledger.pool.execute(
        "UPDATE credits.credit_accounts SET grants_due_at = now() - interval '1 second'"
        " WHERE subject_id = $1",
        due,
    )
    retried = uuid.uuid4()
    items = [
        hold_item(due, Take("0.5"), uuid.uuid4()).json(True),
        hold_item(plain, Take("0.5"), uuid.uuid4()).json(True),
        hold_item(plain, Take("0.5"), uuid.uuid4()).json(True),
    ]
    async with ledger.pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("SET LOCAL track_functions = 'pl'")
            before = await conn.fetchrow(SQL_SINGLE_CALLS)
            rows = await conn.fetch(SQL_TAKE_BATCH, batch_json(items))
            rows += await conn.fetch(
                SQL_TAKE_BATCH,
                batch_json(
                    [
                        hold_item(plain, Take("0.5"), retried).json(False),
                        hold_item(due, Take("0.5"), retried).json(True),
                    ]
                ),
            )
            after = await conn.fetchrow(SQL_SINGLE_CALLS)
    calls = (after[0] - before[0], after[1] - before[1])
    assert [r["outcome"] for r in rows] == ["held"] * 5
    assert calls == (2, 0)  # the account with credit due, then the retried id: one by one
    # the hold expired the credit that was due before it looked at the balance
    assert (await ledger.require_account(due)).balance == c("5")
    for subject in (due, plain):
        await assert_sound(ledger, subject)


async def test_a_batch_locks_every_account_it_touches_and_their_teams(ledger: Ledger) -> None:
    """credits.lock_accounts: the accounts, members or not, and the members' teams, all locked
    before anything is decided (an account left unlocked here breaks the lock order: deadlocks)."""
    tag = secrets.token_hex(4)
    team, member, alone = f"lk-t-{tag}", f"lk-m-{tag}", f"lk-a-{tag}"
    for subject, parent in ((team, None), (member, team), (alone, None)):
        await ledger.create_account(subject, tier="free", parent_id=parent)
    async with ledger.pool.acquire() as conn, ledger.pool.acquire() as other:
        async with conn.transaction():
            await conn.execute("SELECT credits.lock_accounts($1)", [member, alone])
            for subject in (team, member, alone):
                with pytest.raises(asyncpg.LockNotAvailableError):
                    await other.execute(
                        "SELECT 1 FROM credits.credit_accounts WHERE subject_id = $1"
                        " FOR NO KEY UPDATE NOWAIT",
                        subject,
                    )


async def test_migration_0016_applies_on_0015_with_usage_recorded(fresh_database: Callable[[], str]) -> None:
    """A database with holds settled before 0016 keeps an exact rollup after it (the rollup's
    trigger is replaced), and the batch functions work on what was there."""
    conn = await asyncpg.connect(fresh_database())
    try:
        every = migrations.load_migrations()
        await migrations.migrate(conn, [m for m in every if m.version <= 15])
        await conn.execute(
            "INSERT INTO credits.credit_accounts (subject_id) VALUES ('old');"
            "UPDATE credits.credit_accounts SET balance = 10000000 WHERE subject_id = 'old';"
            "INSERT INTO credits.credit_transactions"
            " (subject_id, amount, balance_after, type, idempotency_key)"
            " VALUES ('old', 10000000, 10000000, 'allocation', 'init')"
        )
        before = [hold_item("old", Take("1"), uuid.uuid4()) for _ in range(2)]
        await conn.fetch(SQL_TAKE_BATCH, json.dumps([h.json(True) for h in before]))
        ends = [resolve_item("old", End(0, "0.5"), h.hold_id, n) for n, h in enumerate(before)]
        await conn.fetch(SQL_RESOLVE_BATCH, json.dumps([e.json() for e in ends]))
        applied = [m.version for m in await migrations.migrate(conn)]
        assert applied[:1] == [16]
        after = [hold_item("old", Take("1"), uuid.uuid4()) for _ in range(3)]
        await conn.fetch(SQL_TAKE_BATCH, json.dumps([h.json(True) for h in after]))
        ends = [resolve_item("old", End(0, "0.25"), h.hold_id, n) for n, h in enumerate(after)]
        rows = await conn.fetch(SQL_RESOLVE_BATCH, json.dumps([e.json() for e in ends]))
        assert sorted(r["balance"] for r in rows) == [c("8.25"), c("8.5"), c("8.75")]
        daily = await conn.fetchrow(
            "SELECT sum(requests) AS requests, sum(charged) AS charged FROM credits.usage_daily"
            " WHERE subject_id = 'old'"
        )
        assert (daily["requests"], daily["charged"]) == (5, c("1.75"))
        assert await conn.fetch("SELECT * FROM credits.v_ledger_discrepancies") == []
    finally:
        await conn.close()


async def test_the_rollup_follows_events_updated_and_deleted(ledger: Ledger) -> None:
    """Inserts reach usage_daily per statement, updates and deletes per row (usage_daily_apply):
    both through one upsert, the rollup equal to the events after each."""
    subject = await open_account(ledger, Setup())
    taken = [hold_item(subject, Take("1"), uuid.uuid4()) for _ in range(2)]
    await ledger.pool.fetch(SQL_TAKE_BATCH, batch_json([h.json(True) for h in taken]))
    ends = [resolve_item(subject, End(0, "0.5"), h.hold_id, n) for n, h in enumerate(taken)]
    await ledger.pool.fetch(SQL_RESOLVE_BATCH, batch_json([e.json() for e in ends]))
    await state(ledger.pool, subject)  # (asserts the rollup equals the events)
    await ledger.pool.execute(
        "UPDATE credits.usage_events SET cost = cost + 7, prompt_tokens = prompt_tokens + 3,"
        " status = 'failed' WHERE subject_id = $1 AND request_id = $2",
        subject,
        str(taken[0].hold_id),
    )
    await state(ledger.pool, subject)
    await ledger.pool.execute(
        "DELETE FROM credits.usage_events WHERE subject_id = $1 AND request_id = $2",
        subject,
        str(taken[1].hold_id),
    )
    await state(ledger.pool, subject)


def test_batch_json_is_the_items_json_and_falls_back_for_what_orjson_refuses() -> None:
    items = [
        {"subject": "a", "hold": str(uuid.uuid4()), "amounts": [1, 2**62], "fresh": True, "model": None},
        {"subject": "b ü 日本", "metadata": {"n": 1, "s": "x\ny", "f": 0.1}},
    ]
    assert json.loads(batch_json(items)) == items
    big = [{"subject": "a", "metadata": {"big": 2**70}}]  # past orjson's 64 bits
    assert batch_json(big) == json.dumps(big)
    odd = [{"subject": "a", "metadata": {"text": "\ud800"}}]  # not Unicode: orjson refuses it
    assert batch_json(odd) == json.dumps(odd)


async def test_one_items_odd_metadata_does_not_fail_its_batch(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch whose items orjson cannot encode goes as the standard library writes it: all
    settled in one batch (not one by one after it failed), the big number kept exactly."""
    caplog.set_level(logging.WARNING, logger="litellm_credits.ledger")
    subject = await open_account(ledger, Setup())
    holds = [await ledger.hold(subject, c("1"), ttl_seconds=600) for _ in range(3)]
    batches = ledger.resolve_batches.batches
    usages = [UsageRecord(model="m", metadata={"big": 2**70} if n == 1 else {"n": n}) for n in range(3)]
    done = await asyncio.gather(
        *(ledger.settle(subject, h.id, c("0.25"), u) for h, u in zip(holds, usages, strict=True))
    )
    assert all(s is not None for s in done)
    assert ledger.resolve_batches.batches == batches + 1
    assert not [r for r in caplog.records if "failed" in r.getMessage()]
    big = await ledger.pool.fetchval(
        "SELECT metadata->>'big' FROM credits.usage_events WHERE subject_id = $1 AND request_id = $2",
        subject,
        str(holds[1].id),
    )
    assert big == str(2**70)
    await state(ledger.pool, subject)
