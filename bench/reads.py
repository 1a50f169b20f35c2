"""Read-side benchmark: history, usage summaries and analytics on a large ledger.

Seeds a scratch database with 1,000,000 ledger rows and 10,000,000 usage events over 60 days
(1,000 accounts), then times, from the client (asyncpg, one caller, warm cache):

  - one transaction-history page of 100 rows (with its total) for a random account;
  - a 30-day usage summary (totals and per day) for a random account;
  - system analytics and the top 10 spenders over 30 days.

    python bench/reads.py [--events 10000000] [--ledger 1000000] [--runs 200]
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable

import asyncpg
import harness as h

from litellm_credits import db, migrations
from litellm_credits.analytics import Analytics
from litellm_credits.history import History, Period

ACCOUNTS = 1_000
DAYS = 60

SEED_ACCOUNTS = """
INSERT INTO credits.credit_accounts (subject_id, tier, balance)
SELECT 'acct-' || lpad(i::text, 4, '0'), (ARRAY['free', 'pro', 'enterprise'])[1 + i % 3], 0
FROM generate_series(0, $1::int - 1) i
"""
SEED_LEDGER = """
INSERT INTO credits.credit_transactions
    (subject_id, amount, balance_after, type, idempotency_key, model, created_at)
SELECT 'acct-' || lpad((i % $2::int)::text, 4, '0'),
       CASE WHEN i % 50 = 0 THEN 10000000 ELSE -(1000 + i % 5000) END, 0,
       CASE WHEN i % 50 = 0 THEN 'allocation' ELSE 'usage' END,
       'seed:' || i, 'model-' || (i % 7), now() - (i % ($3::int * 1440)) * interval '1 minute'
FROM generate_series(1, $1::int) i
"""
SEED_EVENTS = """
INSERT INTO credits.usage_events
    (subject_id, request_id, service, model, power_level, prompt_tokens, completion_tokens,
     cost, charged, status, created_at)
SELECT 'acct-' || lpad((i % $3::int)::text, 4, '0'), 'seed:' || i,
       (ARRAY['chat', 'chat', 'chat', 'embedding', 'search'])[1 + i % 5], 'model-' || (i % 7),
       (ARRAY['eco', 'balanced', 'precision'])[1 + i % 3], 100 + i % 900, 10 + i % 400,
       1000 + i % 5000, 1000 + i % 5000, CASE WHEN i % 40 = 0 THEN 'failed' ELSE 'success' END,
       now() - (i % ($4::int * 1440)) * interval '1 minute'
FROM generate_series($1::int, $2::int) i
"""
SQL_900TH = """
SELECT id FROM credits.credit_transactions WHERE subject_id = $1
ORDER BY created_at DESC, id DESC OFFSET 899 LIMIT 1
"""
# what migration 0005 runs on an existing database
BACKFILL = """
INSERT INTO credits.usage_daily
    (subject_id, day, requests, succeeded, failed, prompt_tokens, completion_tokens, cost, charged)
SELECT subject_id, (created_at AT TIME ZONE 'UTC')::date, count(*),
       count(*) FILTER (WHERE status = 'success'), count(*) FILTER (WHERE status <> 'success'),
       sum(prompt_tokens), sum(completion_tokens), sum(cost), sum(charged)
FROM credits.usage_events GROUP BY 1, 2
"""


async def seed(dsn: str, ledger_rows: int, events: int) -> None:
    conn = await asyncpg.connect(dsn, timeout=60)
    try:
        t = time.monotonic()
        await conn.execute(SEED_ACCOUNTS, ACCOUNTS)
        # synthetic history: the ledger's own triggers are off while it is written (the grant
        # triggers of migration 0010 run statements for every debit row, which made this step
        # take over 20 minutes; the rows read below are the same either way); foreign keys stay
        # checked
        await conn.execute("ALTER TABLE credits.credit_transactions DISABLE TRIGGER USER")
        await conn.execute(SEED_LEDGER, ledger_rows, ACCOUNTS, DAYS)
        await conn.execute("ALTER TABLE credits.credit_transactions ENABLE TRIGGER USER")
        print(f"seeded {ledger_rows:,} ledger rows in {time.monotonic() - t:.0f} s", flush=True)
        # the rollup trigger is off while seeding; the rollup is then built once, as the
        # migration builds it for an existing database
        await conn.execute("ALTER TABLE credits.usage_events DISABLE TRIGGER usage_events_daily_insert")
        t = time.monotonic()
        batch = 1_000_000
        for start in range(1, events + 1, batch):
            await conn.execute(SEED_EVENTS, start, min(start + batch - 1, events), ACCOUNTS, DAYS)
        await conn.execute("ALTER TABLE credits.usage_events ENABLE TRIGGER usage_events_daily_insert")
        print(f"seeded {events:,} usage events in {time.monotonic() - t:.0f} s", flush=True)
        t = time.monotonic()
        await conn.execute(BACKFILL)
        await conn.execute("VACUUM ANALYZE")
        print(f"rollup and VACUUM ANALYZE in {time.monotonic() - t:.0f} s", flush=True)
    finally:
        await conn.close()


async def timed(label: str, runs: int, op: Callable[[], Awaitable[object]], bar_ms: float) -> list[str]:
    for _ in range(min(20, runs)):  # warm the cache and the prepared statements
        await op()
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        await op()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    verdict = "meets" if p99 < bar_ms else "MISSES"
    line = f"| {label} | {p50:.2f} | {p99:.2f} | {bar_ms:g} | {verdict} |"
    print(line, flush=True)
    return [line]


async def main(args: argparse.Namespace) -> None:
    server, tmp = await h.admin_dsn(args.embedded)
    name = f"credits_reads_{secrets.token_hex(4)}"
    await h.admin(server, f'CREATE DATABASE "{name}"')
    dsn = h.with_database(server, name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await migrations.migrate(conn)
            print("\n".join(["== machine", *await h.machine(conn)]), flush=True)
        finally:
            await conn.close()
        await seed(dsn, args.ledger, args.events)
        pool = await db.create_pool(dsn, min_size=1, max_size=2)
        history, analytics = History(pool), Analytics(pool)
        rng = random.Random(7)

        def account() -> str:
            return f"acct-{rng.randrange(ACCOUNTS):04d}"

        print(f"\n== {args.runs} runs each, one caller\n")
        print("| query | p50 ms | p99 ms | bar (p99) ms | |\n|---|---:|---:|---:|---|")
        await timed(
            "history page, 100 rows + total",
            args.runs,
            lambda: history.page(account(), limit=100, offset=0),
            10,
        )
        await timed(
            "history page 10 (offset 900)",
            args.runs,
            lambda: history.page(account(), limit=100, offset=900),
            10,
        )
        cursors = [
            (s, await pool.fetchval(SQL_900TH, s)) for s in (f"acct-{i:04d}" for i in range(0, ACCOUNTS, 20))
        ]

        async def keyset_page() -> object:
            subject, before = rng.choice(cursors)
            return await history.page(subject, limit=100, before=before)

        await timed("history page 10 (keyset: before=...)", args.runs, keyset_page, 10)
        await timed(
            "30-day usage summary, one account",
            args.runs,
            lambda: history.usage(account(), Period.of(days=30)),
            50,
        )
        await timed(
            "system analytics, 30 days",
            max(20, args.runs // 4),
            lambda: analytics.system(Period.of(days=30)),
            200,
        )
        await timed("top 10 spenders, 30 days", max(20, args.runs // 4),
                    lambda: analytics.top_spenders(Period.of(days=30), 10), 200)  # fmt: skip
        await pool.close()
    finally:
        await h.admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if tmp is not None:
            h.stop_embedded(tmp)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ledger", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--embedded", action="store_true", help="use an embedded PostgreSQL")
    h.add_loop_argument(parser)
    args = parser.parse_args()
    h.run(main(args), args.loop)
