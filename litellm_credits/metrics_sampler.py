"""The gauges read from the database: open holds, what they hold, accounts by status.

Each process samples them every ``credits.metrics.sample_seconds`` in the background, never on a
scrape or a request; in multiprocess mode a scrape shows the most recent sample of a live worker
(``multiprocess_mode="livemostrecent"``), not the sum of every worker's copy of the same figure.
That is two short statements per interval per worker (the open holds by their partial index, the
accounts by a count over the table): with many workers and hosts, raise the interval, or set it
to 0 on all but a few. ``litellm_credits_gauges_sampled_timestamp_seconds`` says when the figures
were last read, so a sampler that stopped (the database down) is seen, not taken for zero holds.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from .metrics import ACCOUNTS, HELD_MICROCREDITS, OPEN_HOLDS, SAMPLED_AT

log = logging.getLogger("litellm_credits.metrics")

# debiting holds only, as the accounts' ``held`` (an unlimited tier's holds take nothing)
SQL_OPEN_HOLDS = """
SELECT count(*) AS holds, coalesce(sum(amount) FILTER (WHERE debits), 0)::bigint AS held
FROM credits.holds WHERE status = 'open'
"""
SQL_ACCOUNTS = "SELECT status, count(*) AS n FROM credits.credit_accounts GROUP BY status"
ACCOUNT_STATUSES = ("active", "disabled")


async def sample(pool: asyncpg.Pool) -> None:
    """Read the figures once and set the gauges."""
    holds = await pool.fetchrow(SQL_OPEN_HOLDS)
    accounts = {r["status"]: r["n"] for r in await pool.fetch(SQL_ACCOUNTS)}
    OPEN_HOLDS.set(holds["holds"])
    HELD_MICROCREDITS.set(holds["held"])
    for status in ACCOUNT_STATUSES:
        ACCOUNTS.labels(status=status).set(accounts.get(status, 0))
    SAMPLED_AT.set(time.time())


async def sample_forever(pool: asyncpg.Pool, interval: float) -> None:
    """Sample now, then every ``interval`` seconds; a failure is logged and tried again."""
    while True:
        try:
            await sample(pool)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a gauge is never worth a traceback per interval
            log.warning("litellm-credits: sampling the metrics gauges failed: %s", exc)
        await asyncio.sleep(interval)


__all__ = ["sample", "sample_forever"]
