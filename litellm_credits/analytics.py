"""System-wide reports for operators: usage totals, top spenders, balance distribution.

These read across accounts, so they are for admins only, and they scan ``usage_events`` by
time (its BRIN index on ``created_at``).
"""

from __future__ import annotations

from typing import Any

import asyncpg

from .history import USAGE_TOTALS, Period
from .money import format_credits

SQL_SYSTEM = f"""
SELECT {USAGE_TOTALS}, count(DISTINCT subject_id) AS active_accounts
FROM credits.usage_events WHERE created_at >= $1 AND created_at < $2
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
SELECT subject_id, sum(charged) AS charged, sum(cost) AS cost, count(*) AS requests
FROM credits.usage_events WHERE created_at >= $1 AND created_at < $2
GROUP BY subject_id
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


class Analytics:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def system(self, period: Period) -> dict[str, Any]:
        async with self.pool.acquire() as conn:
            usage = await conn.fetchrow(SQL_SYSTEM, period.start, period.end)
            credited = await conn.fetch(SQL_CREDITED, period.start, period.end)
            accounts = await conn.fetchrow(SQL_ACCOUNTS)
        return {
            "start": period.start.isoformat(),
            "end": period.end.isoformat(),
            "requests": usage["requests"],
            "succeeded": usage["succeeded"],
            "failed": usage["failed"],
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "cost": format_credits(usage["cost"]),
            "charged": format_credits(usage["charged"]),
            "active_accounts": usage["active_accounts"],
            "credited": {r["type"]: format_credits(r["amount"]) for r in credited},
            "accounts": accounts["accounts"],
            "accounts_active": accounts["active"],
            "outstanding_balance": format_credits(accounts["balance"]),
            "held": format_credits(accounts["held"]),
        }

    async def top_spenders(self, period: Period, limit: int) -> dict[str, Any]:
        rows = await self.pool.fetch(SQL_TOP, period.start, period.end, limit)
        return {
            "start": period.start.isoformat(),
            "end": period.end.isoformat(),
            "items": [
                {
                    "rank": i + 1,
                    "user_id": r["subject_id"],
                    "charged": format_credits(r["charged"]),
                    "cost": format_credits(r["cost"]),
                    "requests": r["requests"],
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


__all__ = ["BUCKET_LABELS", "Analytics"]
