"""Group commit: concurrent holds and resolutions go to PostgreSQL in batches, one statement and one
commit each, with every caller's answer as if it had been alone (group_commit.py, ledger_batch.py,
migration 0014)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from litellm_credits import db, metrics, migrations
from litellm_credits.errors import InsufficientCredits, ServiceUnavailable, TeamInsufficientCredits
from litellm_credits.group_commit import GroupCommit
from litellm_credits.ledger import Hold, Ledger, UsageRecord
from litellm_credits.ledger_batch import DEFAULT_BATCH_LANES, DEFAULT_BATCH_SIZE
from litellm_credits.ledger_sql import SQL_RESOLVE_BATCH, SQL_TAKE_BATCH
from litellm_credits.money import parse_credits as c
from litellm_credits.runtime import Runtime
from litellm_credits.settings import Settings

from .conftest import TESTS, AccountFactory, proxy_env, start_proxy
from .test_ledger import assert_sound

USAGE = UsageRecord(model="m")
# a row lock as the other statements take it (a bulk grant, a single resolve_hold)
SQL_LOCK = "SELECT 1 FROM credits.credit_accounts WHERE subject_id = $1 FOR NO KEY UPDATE"


def _batch_sizes(kind: str) -> tuple[float, float]:
    """(batches, items) the batch-size histogram has seen for ``kind``."""
    count = metrics.LEDGER_BATCH_SIZE.labels(kind=kind)._sum.get()
    batches = sum(b.get() for b in metrics.LEDGER_BATCH_SIZE.labels(kind=kind)._buckets)
    return batches, count


# the batcher on its own ------------------------------------------------------------------------


async def test_natural_batching_one_at_a_time_when_idle_then_in_batches() -> None:
    seen: list[list[int]] = []

    async def run(items: list[int]) -> list[int | BaseException]:
        seen.append(items)
        await asyncio.sleep(0.01)
        return [2 * i for i in items]

    batcher: GroupCommit[int, int] = GroupCommit(run, max_size=4)
    assert await batcher.submit(1) == 2  # idle: leaves at once, alone
    assert await asyncio.gather(*(batcher.submit(i) for i in range(10))) == [2 * i for i in range(10)]
    assert seen == [[1], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # in arrival order, at most 4
    assert batcher.idle  # nothing left running


async def test_a_cancelled_caller_does_not_break_the_batch() -> None:
    release = asyncio.Event()
    seen: list[list[str]] = []

    async def run(items: list[str]) -> list[str | BaseException]:
        seen.append(items)
        await release.wait()
        return [i.upper() if i != "bad" else ValueError(i) for i in items]

    batcher: GroupCommit[str, str] = GroupCommit(run, max_size=8)
    first = asyncio.create_task(batcher.submit("a"))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(batcher.submit(x)) for x in ("b", "gone", "bad", "c")]
    await asyncio.sleep(0)
    queued[1].cancel()  # before its batch left: dropped from it
    first.cancel()  # while its batch is in flight: the batch goes on
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await queued[0] == "B" and await queued[3] == "C"
    with pytest.raises(ValueError):
        await queued[2]
    assert seen == [["a"], ["b", "bad", "c"]]


async def test_lanes_run_side_by_side_and_keep_each_keys_order() -> None:
    in_flight = 0
    most = 0
    seen: list[list[str]] = []

    async def run(items: list[str]) -> list[str | BaseException]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        seen.append(items)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return list(items)

    batcher: GroupCommit[str, str] = GroupCommit(run, max_size=64, lanes=4, key=lambda i: i.split(":")[0])
    items = [f"{k}:{n}" for n in range(20) for k in "abcdefgh"]
    assert await asyncio.gather(*(batcher.submit(i) for i in items)) == items
    assert most > 1  # lanes in flight at once
    for k in "abcdefgh":  # one key, one lane, in arrival order
        lanes = [b for b in seen if any(i.startswith(k + ":") for i in b)]
        assert len({id(b) for b in lanes}) == len(lanes)
        mine = [i for b in lanes for i in b if i.startswith(k + ":")]
        assert mine == [f"{k}:{n}" for n in range(20)]
    assert batcher.idle


async def test_close_flushes_then_refuses() -> None:
    async def run(items: list[int]) -> list[int | BaseException]:
        await asyncio.sleep(0.01)
        return list(items)

    batcher: GroupCommit[int, int] = GroupCommit(run, max_size=2)
    pending = [asyncio.create_task(batcher.submit(i)) for i in range(5)]
    await asyncio.sleep(0)
    await batcher.close()
    assert [p.result() for p in pending] == list(range(5))  # all sent before close returned
    assert batcher.idle
    with pytest.raises(ServiceUnavailable):
        await batcher.submit(9)


# the ledger's batches --------------------------------------------------------------------------


async def test_concurrent_holds_on_one_account_go_in_few_batches_in_order(
    ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("10")
    before_batches, before_items = ledger.hold_batches.batches, ledger.hold_batches.items
    metric_before = _batch_sizes("hold")
    results = await asyncio.gather(
        *(ledger.hold(subject, c("0.3"), ttl_seconds=60) for _ in range(100)), return_exceptions=True
    )
    batches = ledger.hold_batches.batches - before_batches
    assert ledger.hold_batches.items - before_items == 100
    # natural batching, not one statement each: the first alone (idle), then full batches
    assert batches <= 2 + 100 // ledger.batch_size, batches
    metric_after = _batch_sizes("hold")
    assert metric_after[0] - metric_before[0] == batches and metric_after[1] - metric_before[1] == 100
    # decided in arrival order, and never past the balance: the first 33 fit, the rest are refused
    held = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    assert held == list(range(33))
    assert all(isinstance(r, InsufficientCredits) for r in results[33:])
    assert (await ledger.require_account(subject)).held == 33 * c("0.3")
    settled = await asyncio.gather(
        *(
            ledger.settle(subject, r.id, c("0.1"), USAGE)
            for r in results[:33]
            if not isinstance(r, BaseException)
        )
    )
    assert all(s is not None for s in settled)
    assert (await ledger.require_account(subject)).balance == c("10") - 33 * c("0.1")
    await assert_sound(ledger, subject)


async def test_in_one_batch_a_refusal_and_an_error_fail_only_their_own_items(
    ledger: Ledger, account: AccountFactory
) -> None:
    rich, poor = await account("10"), await account("1")
    ledger = Ledger(ledger.pool, batch_lanes=1)  # both accounts' items in one batch
    ok1, refused, bad, ok2 = await asyncio.gather(
        ledger.hold(rich, c("1"), ttl_seconds=60),
        ledger.hold(poor, c("5"), ttl_seconds=60),
        ledger.hold(rich, c("1"), ttl_seconds=0),  # breaks holds' CHECK (expires_at > created_at)
        ledger.hold(poor, c("0.5"), ttl_seconds=60),
        return_exceptions=True,
    )
    assert ledger.hold_batches.batches == 1  # one batch; its error ran the items one by one
    assert isinstance(refused, InsufficientCredits)
    assert isinstance(bad, asyncpg.CheckViolationError)
    assert not isinstance(ok1, BaseException) and not isinstance(ok2, BaseException)
    assert (await ledger.require_account(rich)).held == c("1")
    assert (await ledger.require_account(poor)).held == c("0.5")

    # the same for resolutions: a usage record the database refuses fails only its own settlement
    extra = await ledger.hold(rich, c("1"), ttl_seconds=60)
    good, wrong, again = await asyncio.gather(
        ledger.settle(rich, ok1.id, c("0.4"), USAGE),
        ledger.settle(rich, extra.id, c("0.4"), UsageRecord(service=cast(Any, "no-such-service"))),
        ledger.settle(rich, ok1.id, c("0.4"), USAGE),  # the same hold twice: settled once
        return_exceptions=True,
    )
    assert ledger.resolve_batches.batches == 1
    assert good is not None and not isinstance(good, BaseException) and good.balance == c("9.6")
    assert isinstance(wrong, asyncpg.CheckViolationError)
    assert again is None
    assert await ledger.void(rich, extra.id) and await ledger.void(poor, ok2.id)
    for subject in (rich, poor):
        await assert_sound(ledger, subject)


@pytest.mark.parametrize("lanes", [1, 2])
async def test_crossing_batches_from_two_instances_never_deadlock(
    ledger: Ledger, database_url: str, lanes: int
) -> None:
    """Two ledgers on two pools (two proxy instances), each sending batches that touch the same
    accounts in opposite orders: plain accounts, a team and its members. Accounts are locked in one
    order, so no batch waits for another in a cycle (no retries: a deadlock would fail a call).
    With two lanes, batches of one instance cross too (members of one team in both lanes)."""
    tag = secrets.token_hex(4)
    a, b, team = f"x-a-{tag}", f"x-b-{tag}", f"x-team-{tag}"
    members = [f"x-m{i}-{tag}" for i in range(3)]
    for subject in (a, b, team):
        await ledger.create_account(subject, tier="free")
        await ledger.credit(subject, c("1000000"))
    for m in members:
        await ledger.create_account(m, tier="free", parent_id=team)
    subjects = [a, b, team, *members]
    pool = await db.create_pool(database_url, min_size=2, max_size=4)
    one, two = Ledger(ledger.pool, retries=0, batch_lanes=lanes), Ledger(pool, retries=0, batch_lanes=lanes)
    charged = 0
    deadline = time.monotonic() + 4

    async def worker(instance: Ledger, order: list[str]) -> None:
        nonlocal charged
        while time.monotonic() < deadline:
            holds = await asyncio.gather(*(instance.hold(s, c("0.01"), ttl_seconds=60) for s in order))
            settled = await asyncio.gather(
                *(instance.settle(h.subject_id, h.id, c("0.005"), USAGE) for h in holds)
            )
            assert all(s is not None for s in settled)
            charged += len(settled) * c("0.005")
            random.shuffle(order)

    try:
        await asyncio.gather(
            *(worker(one, subjects[:]) for _ in range(3)),
            *(worker(two, subjects[::-1]) for _ in range(3)),
        )
    finally:
        await one.close()
        await two.close()
        await pool.close()
    assert one.hold_batches.items > one.hold_batches.batches  # batches, not one item each
    assert two.resolve_batches.items > two.resolve_batches.batches
    balances = {s: (await ledger.require_account(s)).balance for s in (a, b, team)}
    assert 3 * c("1000000") - sum(balances.values()) == charged
    for subject in (a, b, team):
        await assert_sound(ledger, subject)


class LossyBatches:
    """A pool whose next reply to a chosen batch statement is lost after it committed."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.pending: list[str] = []
        self.lost = 0

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
        rows = await self.pool.fetch(query, *args, **kwargs)
        if query in self.pending:
            self.pending.remove(query)
            self.lost += 1
            raise asyncpg.exceptions.ConnectionDoesNotExistError(
                "connection was closed in the middle of operation"
            )
        return rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


async def test_a_batch_retried_after_a_lost_reply_holds_and_charges_once(
    ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("5")  # exactly five holds' worth: a second hold of any would not fit
    pool = LossyBatches(ledger.pool)
    lossy = Ledger(cast(asyncpg.Pool, pool), retry_delay=0)
    pool.pending.append(SQL_TAKE_BATCH)
    holds = await asyncio.gather(*(lossy.hold(subject, c("1"), ttl_seconds=60) for _ in range(5)))
    assert pool.lost == 1
    assert all(h.replayed for h in holds)  # the retry found the first attempt's holds
    assert (await ledger.require_account(subject)).held == c("5")
    count = await ledger.pool.fetchval("SELECT count(*) FROM credits.holds WHERE subject_id = $1", subject)
    assert count == 5

    pool.pending.append(SQL_RESOLVE_BATCH)
    settled = await asyncio.gather(*(lossy.settle(subject, h.id, c("0.5"), USAGE) for h in holds))
    assert pool.lost == 2
    # each answered with the settlement its lost first attempt made
    assert all(s is not None and s.charged == c("0.5") and s.transaction_id for s in settled)
    account_now = await ledger.require_account(subject)
    assert (account_now.balance, account_now.held) == (c("2.5"), 0)
    usage = await ledger.pool.fetchval(
        "SELECT count(*) FROM credits.credit_transactions WHERE subject_id = $1 AND type = 'usage'", subject
    )
    assert usage == 5
    await lossy.close()
    await assert_sound(ledger, subject)


async def test_expiries_go_in_batches(ledger: Ledger, account: AccountFactory) -> None:
    subject = await account("10")
    holds = await asyncio.gather(*(ledger.hold(subject, c("0.1"), ttl_seconds=60) for _ in range(20)))
    await ledger.pool.execute(
        "UPDATE credits.holds SET created_at = now() - interval '2 hours',"
        " expires_at = now() - interval '1 hour' WHERE subject_id = $1",
        subject,
    )
    before = ledger.resolve_batches.batches
    assert await ledger.expire(policy="void") >= 20
    assert ledger.resolve_batches.batches - before < 20
    statuses = await ledger.pool.fetch(
        "SELECT DISTINCT status FROM credits.holds WHERE subject_id = $1", subject
    )
    assert [r["status"] for r in statuses] == ["expired"] and len(holds) == 20
    await assert_sound(ledger, subject)


async def test_a_sweep_does_not_queue_settlements_behind_all_its_batches(
    ledger: Ledger, account: AccountFactory
) -> None:
    """The sweeper resolves a batch's worth at a time: a settlement that arrives meanwhile goes in
    the next batch, not behind every batch of the sweep (one lane: they share it)."""
    lean = Ledger(ledger.pool, batch_size=4, batch_lanes=1)
    try:
        subject = await account("10")
        expired = [await lean.hold(subject, c("0.1"), ttl_seconds=60) for _ in range(12)]
        await ledger.pool.execute(
            "UPDATE credits.holds SET created_at = now() - interval '2 hours',"
            " expires_at = now() - interval '1 hour' WHERE subject_id = $1 AND id = ANY($2)",
            subject,
            [h.id for h in expired],
        )
        live = await lean.hold(subject, c("0.1"), ttl_seconds=600)
        batches: list[list[str]] = []
        run = lean.resolve_batches.run

        async def spy(items: list[Any]) -> list[Any]:
            batches.append([item.hold_status for item in items])
            return await run(items)

        lean.resolve_batches.run = spy
        sweep = asyncio.create_task(lean.expire(policy="void"))
        while not batches:  # the sweep's first batch has left
            await asyncio.sleep(0)
        assert await lean.settle(subject, live.id, c("0.05"), UsageRecord()) is not None
        assert await sweep >= 12
        settled_in = next(n for n, b in enumerate(batches) if "settled" in b)
        assert settled_in == 1, batches  # the next batch (12 expiries would make it the fourth)
        assert all(len(b) <= 4 for b in batches)
        await assert_sound(ledger, subject)
    finally:
        await lean.close()


async def test_migration_0014_applies_on_0013(fresh_database: Callable[[], str]) -> None:
    conn = await asyncpg.connect(fresh_database())
    try:
        every = migrations.load_migrations()
        await migrations.migrate(conn, [m for m in every if m.version <= 13])
        functions = (
            "SELECT to_regprocedure('credits.take_holds(jsonb)'),"
            " to_regprocedure('credits.resolve_holds(jsonb)')"
        )
        assert tuple(await conn.fetchrow(functions)) == (None, None)
        applied = [m.version for m in await migrations.migrate(conn)]
        assert applied[:1] == [14]  # and what came after it
        assert None not in tuple(await conn.fetchrow(functions))
        assert (await migrations.check(conn)).ok
    finally:
        await conn.close()


async def test_a_members_holds_in_one_batch_are_decided_in_order(ledger: Ledger) -> None:
    tag = secrets.token_hex(4)
    team, member = f"t-{tag}", f"t-m-{tag}"
    await ledger.create_account(team, tier="free")
    await ledger.credit(team, c("2"))
    await ledger.create_account(member, tier="free", parent_id=team)
    results = await asyncio.gather(
        *(ledger.hold(member, c("0.5"), ttl_seconds=60, hold_id=uuid.uuid4()) for _ in range(6)),
        return_exceptions=True,
    )
    assert [isinstance(r, TeamInsufficientCredits) for r in results] == [False] * 4 + [True] * 2
    assert (await ledger.require_account(member)).held == c("2")  # what it holds of its team's
    await assert_sound(ledger, team)
    # (no open hold left behind: other tests read the whole database's gauges)
    assert all(await asyncio.gather(*(ledger.void(team, r.id) for r in results[:4] if isinstance(r, Hold))))
    assert (await ledger.require_account(member)).held == 0


async def test_two_resolutions_of_one_hold_in_a_retried_batch_settle_it_once(
    ledger: Ledger, account: AccountFactory
) -> None:
    """A callback that fired twice puts one hold in a batch twice; the batch's reply is lost and
    it runs again: the first resolution is the settlement, the second finds the hold ended."""
    subject = await account("5")
    pool = LossyBatches(ledger.pool)
    lossy = Ledger(cast(asyncpg.Pool, pool), retry_delay=0, batch_lanes=1)
    hold, other = [await ledger.hold(subject, c("1"), ttl_seconds=60) for _ in range(2)]
    pool.pending.append(SQL_RESOLVE_BATCH)
    first, second, third = await asyncio.gather(
        lossy.settle(subject, hold.id, c("0.5"), USAGE),
        lossy.settle(subject, hold.id, c("0.5"), USAGE),
        lossy.settle(subject, other.id, c("0.25"), USAGE),
    )
    assert pool.lost == 1
    assert first is not None and first.charged == c("0.5") and second is None
    assert third is not None and third.charged == c("0.25")
    assert (await ledger.require_account(subject)).balance == c("4.25")
    await lossy.close()
    await assert_sound(ledger, subject)


async def test_without_migration_0014_holds_and_settlements_go_one_by_one(
    fresh_database: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    """A database migrated only to 0013 (auto_migrate off): the batch functions are missing, the
    ledger says so once and sends every item on its own statement, with the same answers."""
    url = fresh_database()
    conn = await asyncpg.connect(url)
    try:
        await migrations.migrate(conn, [m for m in migrations.load_migrations() if m.version <= 13])
    finally:
        await conn.close()
    pool = await db.create_pool(url, min_size=1, max_size=8)
    ledger = Ledger(pool, batch_lanes=1)
    try:
        await ledger.create_account("old", tier="free")
        await ledger.credit("old", c("3"))
        results = await asyncio.gather(
            *(ledger.hold("old", c("1"), ttl_seconds=60) for _ in range(4)), return_exceptions=True
        )
        assert [isinstance(r, InsufficientCredits) for r in results] == [False] * 3 + [True]
        assert not ledger.batched
        assert "migration 0014 not applied" in caplog.text
        holds = [r for r in results if isinstance(r, Hold)]
        settled = await asyncio.gather(*(ledger.settle("old", h.id, c("0.5"), USAGE) for h in holds))
        assert all(s is not None and s.charged == c("0.5") for s in settled)
        assert (await ledger.require_account("old")).balance == c("1.5")
        await assert_sound(ledger, "old")
    finally:
        await ledger.close()
        await pool.close()


async def _until_waiting(conn: asyncpg.Connection, function: str) -> None:
    """Until a statement calling ``function`` waits for a row lock. (``conn`` is usually in a
    transaction, holding the lock: within a transaction PostgreSQL answers pg_stat_activity from
    the snapshot of its first read unless that is cleared, so a batch that reached the server
    after the first look was never seen waiting.)"""
    for _ in range(500):
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1",
            f"%{function}%",
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {function} waited for a lock")


async def test_batches_lock_accounts_in_code_point_order_whatever_the_collation(
    fresh_database: Callable[..., str],
) -> None:
    """Bulk grants lock accounts in Python's sorted() order (code points); on a database whose
    collation sorts otherwise (ICU en-US puts "a" before "B"), a batch still locks in that order:
    while "B" is held, a batch over both waits for it before it takes "a"."""
    try:
        url = fresh_database("TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'")
    except asyncpg.PostgresError as exc:
        pytest.skip(f"this PostgreSQL has no ICU collations: {exc}")
    conn = await asyncpg.connect(url)
    await migrations.migrate(conn)
    pool = await db.create_pool(url, min_size=1, max_size=4)
    ledger = Ledger(pool, batch_lanes=1)
    try:
        assert await conn.fetchval("SELECT 'a' < 'B'")  # the database's own order
        for subject in ("B", "a"):
            await ledger.create_account(subject, tier="free")
            await ledger.credit(subject, c("10"))
        async with conn.transaction():
            await conn.execute(SQL_LOCK, "B")  # as a bulk grant over ["B", "a"] does first
            batch = asyncio.gather(*(ledger.hold(s, c("1"), ttl_seconds=60) for s in ("a", "B")))
            await _until_waiting(conn, "take_holds")
            await conn.execute(SQL_LOCK + " NOWAIT", "a")  # the batch has not taken "a": no cycle
        holds = await batch
        assert ledger.hold_batches.items == 2 and ledger.hold_batches.batches == 1
        await asyncio.gather(*(ledger.void(h.subject_id, h.id) for h in holds))
    finally:
        await ledger.close()
        await pool.close()
        await conn.close()


async def test_a_former_members_account_is_locked_before_its_old_team(
    fresh_database: Callable[..., str],
) -> None:
    """A member that left its team keeps its open holds on the team; resolve_hold locks it before
    the team, so a batch does too (by its current parent_id it would sort with the team, after).
    (On a database and pool of its own: on the session's pool, shared with every other test's
    background work, a full run once saw no batch waiting: ``_until_waiting`` read a stale
    snapshot of pg_stat_activity, from before the batch opened its connection.)"""
    url = fresh_database()
    conn = await asyncpg.connect(url)
    try:
        await migrations.migrate(conn)
    finally:
        await conn.close()
    pool = await db.create_pool(url, min_size=1, max_size=4)
    ledger = Ledger(pool, batch_lanes=1)
    team, member = "a-team", "z-member"
    try:
        await ledger.create_account(team, tier="free")
        await ledger.credit(team, c("10"))
        await ledger.create_account(member, tier="free", parent_id=team)
        left = await ledger.hold(member, c("1"), ttl_seconds=60)
        own = await ledger.hold(team, c("1"), ttl_seconds=60)
        await pool.execute(
            "UPDATE credits.credit_accounts SET parent_id = NULL WHERE subject_id = $1", member
        )
        async with pool.acquire() as locker, locker.transaction():
            await locker.execute(SQL_LOCK, member)  # as resolve_hold of the member's hold does first
            batch = asyncio.gather(
                ledger.settle(left.subject_id, left.id, c("0.5"), USAGE),
                ledger.settle(own.subject_id, own.id, c("0.5"), USAGE),
            )
            await _until_waiting(locker, "resolve_holds")
            await locker.execute(SQL_LOCK + " NOWAIT", team)  # the batch waits before the team
        assert all(s is not None for s in await batch)
        assert ledger.resolve_batches.batches == 1 and ledger.resolve_batches.items == 2
        await assert_sound(ledger, team)
    finally:
        await ledger.close()
        await pool.close()


async def test_a_drain_task_cancelled_before_it_ran_is_replaced() -> None:
    async def run(items: list[int]) -> list[int | BaseException]:
        return items

    batcher: GroupCommit[int, int] = GroupCommit(run, max_size=4)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    task = batcher._tasks[0]
    assert task is not None
    task.cancel()  # before its first step: its clean-up never runs
    await asyncio.sleep(0)
    assert await asyncio.wait_for(batcher.submit(2), 5) == 2  # a new drain serves the lane
    with contextlib.suppress(ServiceUnavailable, asyncio.CancelledError):
        await asyncio.wait_for(first, 5)  # answered (or refused), never left waiting


async def test_with_batching_off_holds_go_side_by_side(ledger: Ledger, account: AccountFactory) -> None:
    subjects = [await account("5") for _ in range(4)]
    single = Ledger(ledger.pool, batch_size=1)
    holds = await asyncio.gather(*(single.hold(s, c("1"), ttl_seconds=60) for s in subjects))
    settled = await asyncio.gather(*(single.settle(h.subject_id, h.id, c("0.5"), USAGE) for h in holds))
    assert all(s is not None for s in settled)
    assert single.hold_batches.batches == 0 and single.resolve_batches.batches == 0  # no batcher
    await single.close()


class RolledBackOnce(LossyBatches):
    """A pool whose next batch statement fails with a deadlock: the server rolled it back."""

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
        if query in self.pending:
            self.pending.remove(query)
            self.lost += 1
            raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
        return await self.pool.fetch(query, *args, **kwargs)


async def test_a_batch_retried_after_a_deadlock_does_not_take_earlier_ends_for_its_own(
    ledger: Ledger, account: AccountFactory
) -> None:
    """A retry after a deadlock cannot follow a lost commit: a resolution that then finds its
    hold ended earlier (a second callback, a replayed charge) is answered None, not as the
    settlement of its first attempt."""
    subject = await account("5")
    pool = RolledBackOnce(ledger.pool)
    flaky = Ledger(cast(asyncpg.Pool, pool), retry_delay=0, batch_lanes=1)
    done, fresh = [await ledger.hold(subject, c("1"), ttl_seconds=60) for _ in range(2)]
    assert await ledger.settle(subject, done.id, c("0.5"), USAGE) is not None  # ended before
    pool.pending.append(SQL_RESOLVE_BATCH)
    again, first = await asyncio.gather(
        flaky.settle(subject, done.id, c("0.5"), USAGE), flaky.settle(subject, fresh.id, c("0.5"), USAGE)
    )
    assert pool.lost == 1
    assert again is None and first is not None and first.charged == c("0.5")
    await flaky.close()
    await assert_sound(ledger, subject)


class HeldUp(LossyBatches):
    """A pool whose batch statements wait for ``release`` after they ran (a reply in flight)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.release = asyncio.Event()
        self.ran = asyncio.Event()

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
        rows = await self.pool.fetch(query, *args, **kwargs)
        if query == SQL_TAKE_BATCH:
            self.ran.set()
            await self.release.wait()
        return rows


async def test_a_hold_whose_caller_left_while_its_batch_was_out_is_voided(
    ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("5")
    pool = HeldUp(ledger.pool)
    slow = Ledger(cast(asyncpg.Pool, pool), batch_lanes=1)
    callers = [asyncio.create_task(slow.hold(subject, c("1"), ttl_seconds=600)) for _ in range(2)]
    await asyncio.wait_for(pool.ran.wait(), 10)  # the batch of two committed, its reply held up
    callers[0].cancel()  # the request went away meanwhile
    pool.release.set()
    kept = await callers[1]
    with pytest.raises(asyncio.CancelledError):
        await callers[0]
    await slow.close()  # waits for the void
    statuses = await ledger.pool.fetch(
        "SELECT id, status FROM credits.holds WHERE subject_id = $1 ORDER BY status", subject
    )
    assert {r["id"]: r["status"] for r in statuses}[kept.id] == "open"
    assert sorted(r["status"] for r in statuses) == ["open", "voided"]
    assert (await ledger.require_account(subject)).held == c("1")
    assert await ledger.void(subject, kept.id)
    await assert_sound(ledger, subject)


@pytest.mark.proxy
def test_a_proxy_killed_amid_batches_charges_nothing_twice(
    database_url: str, redis_url: str, upstream: Any, tmp_path: Path
) -> None:
    """The real proxy under a burst of concurrent requests (holds and settlements in batches),
    SIGKILLed in the middle: every hold it took is either settled once or still open for the
    sweeper, and the ledger adds up."""
    master = "sk-master-" + uuid.uuid4().hex
    env = proxy_env(database_url, master, upstream.url, redis_url)
    proc, url = start_proxy(TESTS / "proxy_config.yaml", env, tmp_path / "killed.log")
    user = "burst-" + uuid.uuid4().hex[:8]
    stop = threading.Event()
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {master}"}, timeout=30) as admin:
            key = admin.post("/api/v1/admin/credits/accounts", json={"user_id": user}).json()["api_key"]
            admin.post(
                "/api/v1/admin/credits/allocate", json={"user_id": user, "amount": "1000"}
            ).raise_for_status()

        def caller() -> None:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as me:
                while not stop.is_set():
                    try:
                        me.post(
                            "/v1/chat/completions",
                            json={
                                "model": "fake-custom",
                                "messages": [{"role": "user", "content": "sleep=0.2 usage=100,100"}],
                                "max_tokens": 200,
                            },
                        )
                    except httpx.HTTPError:
                        return  # the proxy is gone

        callers = [threading.Thread(target=caller) for _ in range(24)]
        for t in callers:
            t.start()
        deadline = time.monotonic() + 60
        while asyncio.run(_count(database_url, "settled", user)) < 40:  # well into the burst
            assert time.monotonic() < deadline, "the burst did not get going"
            time.sleep(0.1)
        with httpx.Client(headers={"Authorization": f"Bearer {master}"}, timeout=30) as admin:
            text = admin.get(url + "/api/v1/admin/credits/metrics").text
        os.kill(proc.pid, signal.SIGKILL)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        sizes = families["litellm_credits_ledger_batch_size"].samples
        samples = {(s.name, s.labels.get("kind")): s.value for s in sizes}
        # the holds went in batches: fewer statements than holds
        hold_batches = samples[("litellm_credits_ledger_batch_size_count", "hold")]
        assert samples[("litellm_credits_ledger_batch_size_sum", "hold")] > hold_batches > 0
        proc.wait(10)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    for t in callers:
        t.join(30)

    async def check() -> None:
        pool = await db.create_pool(database_url, min_size=1, max_size=4)
        ledger = Ledger(pool)
        try:
            assert await ledger.pool.fetchval(
                "SELECT count(*) FROM credits.holds WHERE subject_id = $1 AND status = 'open'", user
            ), "the kill landed after every request: nothing in flight"
            # one usage row per settled hold, none for any other
            rows = await pool.fetch(
                """SELECT h.status, count(t.id) AS charges FROM credits.holds h
                   LEFT JOIN credits.credit_transactions t
                          ON t.subject_id = h.subject_id AND t.hold_id = h.id AND t.type = 'usage'
                   WHERE h.subject_id = $1 GROUP BY h.id, h.status""",
                user,
            )
            assert all(r["charges"] == (1 if r["status"] == "settled" else 0) for r in rows)
            # the balance fell by exactly what the settled holds charged, each with one usage event
            settled, spent = await pool.fetchrow(
                "SELECT count(*), coalesce(sum(settled_amount), 0) FROM credits.holds"
                " WHERE subject_id = $1 AND status = 'settled'",
                user,
            )
            assert (await ledger.require_account(user)).balance == c("1000") - spent
            events = await pool.fetchval(
                "SELECT count(*) FROM credits.usage_events WHERE subject_id = $1 AND status = 'success'", user
            )
            assert events == settled
            await assert_sound(ledger, user)
            # what the dead proxy left open, the sweeper of the next one releases
            await pool.execute(
                "UPDATE credits.holds SET created_at = now() - interval '2 hours',"
                " expires_at = now() - interval '1 hour' WHERE subject_id = $1 AND status = 'open'",
                user,
            )
            await ledger.expire(policy="void")
            assert (await ledger.require_account(user)).held == 0
            await assert_sound(ledger, user)
        finally:
            await ledger.close()
            await pool.close()

    asyncio.run(check())


async def _count(database_url: str, status: str, user: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM credits.holds WHERE subject_id = $1 AND status = $2", user, status
            )
        )
    finally:
        await conn.close()


async def test_batch_functions_are_set_to_generic_plans(ledger: Ledger) -> None:
    """Migration 0017: generic plans, or the plan cache plans the batch functions' big statements
    on every call (with sequential scans off, the generic plan never looked cheaper)."""
    rows = await ledger.pool.fetch(
        "SELECT p.oid::regprocedure::text AS f, p.proconfig FROM pg_proc p"
        " WHERE p.oid IN ('credits.take_holds(jsonb)'::regprocedure,"
        " 'credits.resolve_holds(jsonb)'::regprocedure, 'credits.lock_accounts(text[])'::regprocedure)"
    )
    assert len(rows) == 3
    for row in rows:
        assert "plan_cache_mode=force_generic_plan" in row["proconfig"], row["f"]


@pytest.mark.parametrize("lanes", [2, 3])
async def test_the_lanes_setting_reaches_the_ledger(settings: Settings, lanes: int) -> None:
    rt = Runtime(settings.model_copy(update={"db_batch_lanes": lanes, "db_batch_size": 7}))
    try:
        ledger = await rt.ledger()
        assert len(ledger.hold_batches._queues) == lanes
        assert len(ledger.resolve_batches._queues) == lanes
        assert ledger.batch_size == ledger.hold_batches.max_size == ledger.resolve_batches.max_size == 7
    finally:
        await rt.close()


def test_one_lane_of_32_by_default() -> None:
    fields = Settings.model_fields
    assert (fields["db_batch_lanes"].default, fields["db_batch_size"].default) == (1, 32)
    assert (DEFAULT_BATCH_LANES, DEFAULT_BATCH_SIZE) == (1, 32)  # a Ledger made without settings
