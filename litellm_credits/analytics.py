"""System-wide reports for operators: usage totals, top spenders, balance distribution.

They read ``usage_daily``, the rollup of ``usage_events`` a trigger keeps exact, so a month of
any traffic is a few thousand rows: periods are whole UTC days (the days the period touches).
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from typing import Any

import asyncpg

from .history import Period, totals
from .money import format_credits

ROLLUP_TOTALS = """coalesce(sum(requests), 0) AS requests, coalesce(sum(succeeded), 0) AS succeeded,
       coalesce(sum(failed), 0) AS failed, coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
       coalesce(sum(completion_tokens), 0) AS completion_tokens, coalesce(sum(cost), 0) AS cost,
       coalesce(sum(charged), 0) AS charged"""
# $1 first day, $2 the day after the last
SQL_SYSTEM = f"""
SELECT {ROLLUP_TOTALS}, count(DISTINCT subject_id) FILTER (WHERE requests > 0) AS active_accounts
FROM credits.usage_daily WHERE day >= $1 AND day < $2
"""
SQL_CREDITED = """
SELECT type, count(*) AS entries, coalesce(sum(amount), 0) AS amount
FROM credits.credit_transactions
WHERE created_at >= $1 AND created_at < $2 AND type <> 'usage'
GROUP BY type ORDER BY type
"""
SQL_ACCOUNTS = """
SELECT count(*) AS accounts, count(*) FILTER (WHERE status = 'active') AS active,
       coalesce(sum(balance), 0) AS balance, coalesce(sum(held), 0) AS held
FROM credits.credit_accounts
"""
SQL_TOP = """
SELECT subject_id, sum(charged) AS charged, sum(cost) AS cost, sum(requests) AS requests
FROM credits.usage_daily WHERE day >= $1 AND day < $2
GROUP BY subject_id
HAVING sum(requests) > 0
ORDER BY sum(charged) DESC, subject_id
LIMIT $3
"""
# balances per tier in credit buckets; the edges are micro-credits
BUCKETS = (0, 1_000_000, 10_000_000, 100_000_000, 1_000_000_000)
BUCKET_LABELS = ("below 0", "0 to 1", "1 to 10", "10 to 100", "100 to 1000", "1000 and more")
SQL_DISTRIBUTION = """
SELECT tier, count(*) AS accounts, sum(balance) AS balance, sum(held) AS held,
       array_agg(bucket) AS buckets
FROM (
    SELECT tier, balance, held,
           CASE WHEN balance < 0 THEN 0 ELSE width_bucket(balance, $1::bigint[]) END AS bucket
    FROM credits.credit_accounts
) b
GROUP BY tier ORDER BY tier
"""


def whole_days(period: Period) -> tuple[date, date]:
    """The UTC days a period touches: [first, after-last)."""
    start = period.start.astimezone(timezone.utc)
    end = period.end.astimezone(timezone.utc)
    last = end.date() if end.time() == time() else end.date() + timedelta(days=1)
    return start.date(), max(last, start.date() + timedelta(days=1))


def _day_bounds(first: date, after: date) -> dict[str, str]:
    return {
        "start": datetime.combine(first, time(), tzinfo=timezone.utc).isoformat(),
        "end": datetime.combine(after, time(), tzinfo=timezone.utc).isoformat(),
    }


class Analytics:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def system(self, period: Period) -> dict[str, Any]:
        first, after = whole_days(period)
        bounds = _day_bounds(first, after)
        async with self.pool.acquire() as conn:
            usage = await conn.fetchrow(SQL_SYSTEM, first, after)
            credited = await conn.fetch(
                SQL_CREDITED, datetime.fromisoformat(bounds["start"]), datetime.fromisoformat(bounds["end"])
            )
            accounts = await conn.fetchrow(SQL_ACCOUNTS)
        return {
            **bounds,
            **totals(usage),
            "active_accounts": int(usage["active_accounts"]),
            "credited": {r["type"]: format_credits(r["amount"]) for r in credited},
            "accounts": accounts["accounts"],
            "accounts_active": accounts["active"],
            "outstanding_balance": format_credits(accounts["balance"]),
            "held": format_credits(accounts["held"]),
        }

    async def top_spenders(self, period: Period, limit: int) -> dict[str, Any]:
        first, after = whole_days(period)
        rows = await self.pool.fetch(SQL_TOP, first, after, limit)
        return {
            **_day_bounds(first, after),
            "items": [
                {
                    "rank": i + 1,
                    "user_id": r["subject_id"],
                    "charged": format_credits(r["charged"]),
                    "cost": format_credits(r["cost"]),
                    "requests": int(r["requests"]),  # a numeric sum: an integer in JSON
                }
                for i, r in enumerate(rows)
            ],
        }

    async def distribution(self) -> dict[str, Any]:
        rows = await self.pool.fetch(SQL_DISTRIBUTION, list(BUCKETS))
        tiers = []
        for r in rows:
            counts = [0] * len(BUCKET_LABELS)
            for bucket in r["buckets"]:
                counts[bucket] += 1
            tiers.append(
                {
                    "tier": r["tier"],
                    "accounts": r["accounts"],
                    "balance": format_credits(r["balance"]),
                    "held": format_credits(r["held"]),
                    "histogram": [
                        {"range": label, "accounts": n}
                        for label, n in zip(BUCKET_LABELS, counts, strict=True)
                    ],
                }
            )
        return {"tiers": tiers}


__all__ = ["BUCKET_LABELS", "Analytics", "whole_days"]
