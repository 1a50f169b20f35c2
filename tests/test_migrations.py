"""Migrations: from an empty database, re-run as a no-op, a broken one rolls back, --check."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from litellm_credits import db, migrations
from litellm_credits.grants import Grants
from litellm_credits.ledger import Ledger, UsageRecord
from litellm_credits.migrations import Migration
from litellm_credits.records import GrantTerms


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
    created = _cli(dsn, "accounts", "create", "carol", "--monthly-cap", "25", "--json")
    assert created.returncode == 0, created.stderr
    assert '"api_key": "sk-cr-' in created.stdout
    allocated = _cli(dsn, "allocate", "carol", "12.5", "--reason", "top-up", "--json")
    assert allocated.returncode == 0 and '"balance_after": "12.500000"' in allocated.stdout
    balance = _cli(dsn, "balance", "carol", "--json")
    assert '"balance": "12.500000"' in balance.stdout and '"monthly_cap": "25.000000"' in balance.stdout
    assert _cli(dsn, "verify").returncode == 0
    bad = _cli(dsn, "allocate", "carol", "1.0000001")
    assert bad.returncode == 2 and "decimal places" in bad.stderr


def test_cli_grants_alerts_and_topups(fresh_database: Callable[[], str]) -> None:
    dsn = fresh_database()
    assert _cli(dsn, "accounts", "create", "dora").returncode == 0
    promo = _cli(
        dsn,
        "allocate",
        "dora",
        "3",
        "--category",
        "promotional",
        "--priority",
        "1",
        "--expires-at",
        "2099-01-01T00:00:00Z",
    )
    assert promo.returncode == 0, promo.stderr
    assert _cli(dsn, "allocate", "dora", "4").returncode == 0
    grants = json.loads(_cli(dsn, "grants", "dora", "--json").stdout)
    assert (grants["paid"], grants["promotional"]) == ("4.000000", "3.000000")
    assert grants["next_expiry"]["amount"] == "3.000000"
    assert [g["category"] for g in grants["grants"]] == ["paid", "promotional"]
    naive = _cli(dsn, "allocate", "dora", "1", "--expires-at", "2099-01-01T00:00:00")
    assert naive.returncode == 2 and "UTC offset" in naive.stderr

    assert json.loads(_cli(dsn, "alerts", "dora", "--json").stdout)["own"] is False
    set_ = json.loads(_cli(dsn, "alerts", "dora", "--balance-below", "1", "2.5", "--json").stdout)
    assert set_ == {"balance_below": ["2.500000", "1.000000"], "monthly_cap_percent": [80, 100], "own": True}
    assert json.loads(_cli(dsn, "alerts", "dora", "--tier-defaults", "--json").stdout)["own"] is False
    assert json.loads(_cli(dsn, "topups", "dora", "--json").stdout) == []
    assert _cli(dsn, "verify").returncode == 0


async def test_grants_migration_converts_balances_in_place(
    fresh_database: Callable[[], str],
) -> None:
    """0010 from 0009 with accounts in every state: each positive balance becomes one paid grant
    without expiry, a negative one the overrun; open holds, refunds and usage carry on after it."""
    dsn = fresh_database()
    conn = await _connect(dsn)
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    try:
        every = migrations.load_migrations()
        before = [m for m in every if m.version < 10]
        await migrations.migrate(conn, before)
        # the schema of 0009, written as that version's ledger wrote it
        await conn.execute(
            """
            INSERT INTO credits.credit_accounts (subject_id, balance) VALUES
                ('rich', 7000000), ('broke', -1500000), ('empty', 0), ('team', 5000000);
            INSERT INTO credits.credit_accounts (subject_id, parent_id) VALUES ('member', 'team');
            INSERT INTO credits.credit_transactions
                (subject_id, amount, balance_after, type, idempotency_key) VALUES
                ('rich', 10000000, 10000000, 'allocation', 'a1'),
                ('rich', -3000000, 7000000, 'usage', 'u1'),
                ('broke', 1000000, 1000000, 'allocation', 'a2'),
                ('broke', -2500000, -1500000, 'usage', 'u2'),
                ('team', 5000000, 5000000, 'allocation', 'a3');
            UPDATE credits.credit_accounts SET held = 1000000 WHERE subject_id = 'rich';
            INSERT INTO credits.holds (id, subject_id, amount, expires_at)
            VALUES ('00000000-0000-0000-0000-000000000001', 'rich', 1000000, now() + interval '1 hour');
            """
        )
        applied = await migrations.migrate(conn)
        assert [m.version for m in applied] == [m.version for m in every if m.version >= 10]

        grants = await conn.fetch(
            "SELECT subject_id, category, source, amount, remaining, expires_at"
            " FROM credits.grants ORDER BY subject_id"
        )
        assert [tuple(g) for g in grants] == [
            ("rich", "paid", "migration", 7000000, 7000000, None),
            ("team", "paid", "migration", 5000000, 5000000, None),
        ]
        overrun = dict(await conn.fetch("SELECT subject_id, overrun FROM credits.credit_accounts"))
        assert overrun == {"rich": 0, "broke": 1500000, "empty": 0, "team": 0, "member": 0}
        assert await conn.fetch("SELECT * FROM credits.v_ledger_discrepancies") == []

        # the old schema's data carries on: the open hold settles on the migrated grant, a refund of
        # old usage (no grant paid for it) comes back as a paid grant, and a credit to the broke
        # account pays its overrun first
        ledger = Ledger(pool)
        await ledger.settle("rich", uuid.UUID(int=1), 2000000, UsageRecord(model="m"))
        usage = await conn.fetchval("SELECT id FROM credits.credit_transactions WHERE idempotency_key = 'u1'")
        await ledger.refund("rich", usage, 1000000)
        await ledger.credit("broke", 2000000, terms=GrantTerms("promotional", 1, None))
        summary = await Grants(pool).summary("rich")
        assert (summary["paid"], summary["overrun"]) == ("6.000000", "0.000000")
        broke = await Grants(pool).summary("broke")
        assert (broke["promotional"], broke["overrun"]) == ("0.500000", "0.000000")
        held = await ledger.hold("member", 1000000, ttl_seconds=60)
        await ledger.settle("team", held.id, 1000000, UsageRecord(model="m"))
        assert await conn.fetch("SELECT * FROM credits.v_ledger_discrepancies") == []
    finally:
        await pool.close()
        await conn.close()
