"""The sweep is claimed: one pass at a time over every process on the database (sweeper.py)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from litellm_credits import sweeper
from litellm_credits.grants import Sweep
from litellm_credits.ledger import Ledger
from litellm_credits.metrics import SWEEPER_RUNS
from litellm_credits.money import parse_credits as c
from litellm_credits.runtime import Runtime
from litellm_credits.settings import Settings
from litellm_credits.sweeper import SWEEP_LOCK_ID

from .conftest import AccountFactory


@pytest.fixture
async def other_process(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection standing for another proxy process's sweep."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def _expired_hold(ledger: Ledger, account: AccountFactory) -> tuple[str, uuid.UUID]:
    subject = await account("10")
    hold = await ledger.hold(subject, c("4"), ttl_seconds=1)
    await asyncio.sleep(1.2)
    return subject, hold.id


async def _status(ledger: Ledger, hold: uuid.UUID) -> str:
    return await ledger.pool.fetchval("SELECT status FROM credits.holds WHERE id = $1", hold)


async def _waiting_for_the_sweep(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = $1 AND wait_event_type = 'Lock'",
            f"litellm-credits pid {os.getpid()} sweep",
        )
    )


async def _claimed(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval(sweeper.SQL_CLAIMED, SWEEP_LOCK_ID))


async def _free(conn: asyncpg.Connection) -> bool:
    """Whether nobody holds the sweep (taken and given back at once)."""
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", SWEEP_LOCK_ID):
        return False
    await conn.execute("SELECT pg_advisory_unlock($1)", SWEEP_LOCK_ID)
    return True


async def _no_connection(*_: object, **__: object) -> asyncpg.Connection:
    raise AssertionError("connected")


async def test_a_pass_skips_while_another_process_sweeps_and_the_command_waits_for_it(
    ledger: Ledger,
    account: AccountFactory,
    database_url: str,
    other_process: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, hold = await _expired_hold(ledger, account)
    await other_process.execute("SELECT pg_advisory_lock($1)", SWEEP_LOCK_ID)
    with monkeypatch.context() as patch:  # a process that will only skip opens no connection
        patch.setattr(asyncpg, "connect", _no_connection)
        assert await sweeper.sweep(ledger, database_url, policy="void", batch=1000, hold_for=60) is None
    assert await _status(ledger, hold) == "open"  # the other process's pass will end it

    waiting = asyncio.create_task(
        sweeper.sweep(ledger, database_url, policy="void", batch=1000, hold_for=60, wait=True)
    )
    deadline = time.monotonic() + 10
    while not await _waiting_for_the_sweep(other_process):  # queued on the lock, not connecting
        assert time.monotonic() < deadline and not waiting.done()
        await asyncio.sleep(0.05)
    assert await _status(ledger, hold) == "open"
    await other_process.execute("SELECT pg_advisory_unlock($1)", SWEEP_LOCK_ID)
    swept = await asyncio.wait_for(waiting, 10)
    assert swept is not None and swept.holds >= 1
    assert await _status(ledger, hold) == "expired"
    assert await _free(other_process)  # the pass gave the sweep back


async def test_a_failed_pass_gives_the_sweep_back(
    ledger: Ledger, database_url: str, other_process: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(**_: object) -> int:
        assert not await _free(other_process)  # held during the pass
        raise RuntimeError("boom")

    monkeypatch.setattr(ledger, "expire", broken)
    with pytest.raises(RuntimeError, match="boom"):
        await sweeper.sweep(ledger, database_url, policy="void", batch=10, hold_for=60)
    assert await _free(other_process)


async def test_a_pass_cancelled_midway_gives_the_sweep_back(
    ledger: Ledger, database_url: str, other_process: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = asyncio.Event()

    async def slow(**_: object) -> int:
        started.set()
        await asyncio.sleep(60)
        return 0

    monkeypatch.setattr(ledger, "expire", slow)
    task = asyncio.create_task(sweeper.sweep(ledger, database_url, policy="void", batch=10, hold_for=60))
    await asyncio.wait_for(started.wait(), 10)
    assert not await _free(other_process)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _free(other_process)


async def test_a_stuck_pass_loses_the_sweep_to_the_servers_deadline(
    ledger: Ledger, database_url: str, other_process: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that stops answering cannot keep every host from sweeping: the server ends the
    claim's transaction once it has been idle for hold_for."""
    started, done = asyncio.Event(), asyncio.Event()

    async def stuck(*_: object) -> sweeper.Swept:
        started.set()  # (the claim is held from here)
        await done.wait()
        return sweeper.Swept(0, Sweep(0, 0))

    monkeypatch.setattr(sweeper, "_pass", stuck)
    task = asyncio.create_task(sweeper.sweep(ledger, database_url, policy="void", batch=10, hold_for=1.0))
    try:
        await asyncio.wait_for(started.wait(), 10)
        assert await _claimed(other_process)
        deadline = time.monotonic() + 10
        while await _claimed(other_process):  # until the server gives it back
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert not task.done()
    finally:
        done.set()
        await asyncio.wait_for(task, 10)


async def test_the_proxys_sweeper_skips_its_turn_while_another_process_sweeps(
    settings: Settings,
    ledger: Ledger,
    account: AccountFactory,
    other_process: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, hold = await _expired_hold(ledger, account)
    holds = settings.credits.holds.model_copy(update={"sweep_interval_seconds": 0.05})
    cfg = settings.credits.model_copy(update={"holds": holds})
    restarted = Runtime(settings.model_copy(update={"sweeper": True, "credits": cfg}))
    passes: list[tuple[Ledger, sweeper.Swept | None]] = []  # (other runtimes may sweep too)
    real = sweeper.sweep

    async def counted(ledger: Ledger, *args: Any, **kwargs: Any) -> sweeper.Swept | None:
        swept = await real(ledger, *args, **kwargs)
        passes.append((ledger, swept))
        return swept

    monkeypatch.setattr(sweeper, "sweep", counted)
    skipped = SWEEPER_RUNS.labels(result="skipped")
    before = skipped._value.get()
    await other_process.execute("SELECT pg_advisory_lock($1)", SWEEP_LOCK_ID)
    try:
        mine = await restarted.ledger()
        deadline = time.monotonic() + 20
        while sum(1 for who, swept in passes if who is mine and swept is None) < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert skipped._value.get() >= before + 3
        assert await _status(ledger, hold) == "open"
        await other_process.execute("SELECT pg_advisory_unlock($1)", SWEEP_LOCK_ID)
        while await _status(ledger, hold) == "open":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await _status(ledger, hold) == ("expired" if holds.expiry_policy == "void" else "captured")
        assert any(who is mine and swept is not None and swept.holds for who, swept in passes)
    finally:
        await restarted.close()
