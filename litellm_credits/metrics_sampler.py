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
from dataclasses import dataclass

import asyncpg

from .heap import record_pauses
from .metrics import ACCOUNTS, HELD_MICROCREDITS, OPEN_HOLDS, SAMPLED_AT

log = logging.getLogger("litellm_credits.metrics")

# debiting holds only, as the accounts' ``held`` (an unlimited tier's holds take nothing)
SQL_OPEN_HOLDS = """
SELECT count(*) AS holds, coalesce(sum(amount) FILTER (WHERE debits), 0)::bigint AS held
FROM credits.holds WHERE status = 'open'
"""
SQL_ACCOUNTS = "SELECT status, count(*) AS n FROM credits.credit_accounts GROUP BY status"
ACCOUNT_STATUSES = ("active", "disabled")


@dataclass(frozen=True)
class Figures:
    open_holds: int
    held: int  # micro-credits
    accounts: dict[str, int]  # by status


async def read(pool: asyncpg.Pool) -> Figures:
    """The gauges' figures, read from the database."""
    holds = await pool.fetchrow(SQL_OPEN_HOLDS)
    accounts = {r["status"]: r["n"] for r in await pool.fetch(SQL_ACCOUNTS)}
    return Figures(holds["holds"], holds["held"], {s: accounts.get(s, 0) for s in ACCOUNT_STATUSES})


async def sample(pool: asyncpg.Pool) -> None:
    """Read the figures once and set the gauges."""
    figures = await read(pool)
    OPEN_HOLDS.set(figures.open_holds)
    HELD_MICROCREDITS.set(figures.held)
    for status, n in figures.accounts.items():
        ACCOUNTS.labels(status=status).set(n)
    SAMPLED_AT.set(time.time())


async def sample_forever(pool: asyncpg.Pool, interval: float) -> None:
    """Sample now, then every ``interval`` seconds; a failure is logged and tried again."""
    while True:
        record_pauses()  # (also on each request: an idle proxy's collections reach the histogram here)
        try:
            await sample(pool)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a gauge is never worth a traceback per interval
            log.warning("litellm-credits: sampling the metrics gauges failed: %s", exc)
        await asyncio.sleep(interval)


__all__ = ["Figures", "read", "sample", "sample_forever"]
