"""Migrations: from an empty database, re-run as a no-op, a broken one rolls back, --check."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from litellm_credits import migrations
from litellm_credits.migrations import Migration


async def _connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn)


async def test_from_empty_then_noop(fresh_database: Callable[[], str]) -> None:
    dsn = fresh_database()
    conn = await _connect(dsn)
    try:
        before = await migrations.check(conn)
        assert [m.version for m in before.pending] == [m.version for m in migrations.load_migrations()]
        applied = await migrations.migrate(conn)
        assert [m.version for m in applied] == [m.version for m in migrations.load_migrations()]
        assert await migrations.migrate(conn) == []
        report = await migrations.check(conn)
        assert report.ok, report
        tables = {
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'credits'"
            )
        }
        assert {
            "credit_accounts",
            "credit_transactions",
            "holds",
            "usage_events",
            "coupon_codes",
            "openrouter_accounts",
            "v_credit_balance_by_tier",
            "v_daily_usage_summary",
            "v_top_spenders_30d",
        } <= tables
    finally:
        await conn.close()


async def test_broken_migration_leaves_database_as_it_was(fresh_database: Callable[[], str]) -> None:
    dsn = fresh_database()
    conn = await _connect(dsn)
    try:
        good = migrations.load_migrations()
        broken = Migration(9999, "broken", "CREATE TABLE credits.half_done (id int); SELECT 1 / 0;")
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrations.migrate(conn, [*good, broken])
        assert await conn.fetchval("SELECT to_regclass('credits.half_done')") is None
        versions = [r[0] for r in await conn.fetch("SELECT version FROM credits.schema_migrations")]
        assert 9999 not in versions and versions == [m.version for m in good]
        # the lock was released: a later run works
        assert await migrations.migrate(conn) == []
    finally:
        await conn.close()


async def test_concurrent_starts_apply_once(fresh_database: Callable[[], str]) -> None:
    dsn = fresh_database()
    conns = [await _connect(dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrations.migrate(c) for c in conns))
        assert sorted(len(r) for r in results) == [0, 0, len(migrations.load_migrations())]
    finally:
        for c in conns:
            await c.close()


async def test_check_reports_missing_objects_and_changed_files(fresh_database: Callable[[], str]) -> None:
    dsn = fresh_database()
    conn = await _connect(dsn)
    try:
        await migrations.migrate(conn)
        await conn.execute("DROP INDEX credits.credit_transactions_history")
        edited = [Migration(m.version, m.name, m.sql + "\n-- edited") for m in migrations.load_migrations()]
        report = await migrations.check(conn, edited)
        assert "index credits.credit_transactions_history" in report.missing
        assert report.changed == [m.version for m in migrations.load_migrations()]
        assert not report.ok
    finally:
        await conn.close()


def _cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CREDITS_DATABASE_URL": dsn}
    exe = Path(sys.executable).parent / "litellm-credits"
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=120)


def test_cli_migrate_and_check(fresh_database: Callable[[], str]) -> None:
    dsn = fresh_database()
    pending = _cli(dsn, "migrate", "--check")
    assert pending.returncode == 1 and "pending  0001_core" in pending.stdout
    first = _cli(dsn, "migrate")
    assert first.returncode == 0 and "applied  0001_core" in first.stdout
    second = _cli(dsn, "migrate")
    assert second.returncode == 0 and "nothing to apply" in second.stdout
    ok = _cli(dsn, "migrate", "--check")
    assert ok.returncode == 0 and ok.stdout.strip().endswith("ok")


def test_cli_accounts_allocate_balance_verify(fresh_database: Callable[[], str]) -> None:
    dsn = fresh_database()
    created = _cli(dsn, "accounts", "create", "carol", "--monthly-cap", "25")
    assert created.returncode == 0, created.stderr
    assert '"api_key": "sk-cr-' in created.stdout
    allocated = _cli(dsn, "allocate", "carol", "12.5", "--reason", "top-up")
    assert allocated.returncode == 0 and '"balance_after": "12.500000"' in allocated.stdout
    balance = _cli(dsn, "balance", "carol")
    assert '"balance": "12.500000"' in balance.stdout and '"monthly_cap": "25.000000"' in balance.stdout
    assert _cli(dsn, "verify").returncode == 0
    bad = _cli(dsn, "allocate", "carol", "1.0000001")
    assert bad.returncode == 2 and "decimal places" in bad.stderr
