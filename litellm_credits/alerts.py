"""Balance alerts: thresholds per account and per tier, webhook endpoints, and their deliveries.

The database raises alerts (migration 0011: a trigger on accounts for ``balance.low``,
``balance.depleted`` and ``monthly_cap.reached``; one on the ledger for ``grant.expired``) into
``credits.outbox``; :mod:`.webhooks` delivers them. This module is what the API and the CLI change
and read: thresholds, the tiers' defaults (written from ``credits.yaml`` at start-up),
endpoints (their signing secrets encrypted at rest), deliveries, and the ``grant.expiring`` sweep.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from .crypto import EncryptionNotConfigured, SecretBox
from .errors import AccountNotFound, NotFound
from .money import format_credits, parse_credits
from .settings import TierAlertsConfig
from .webhooks import check_target, new_secret

SQL_DEFAULTS = """
INSERT INTO credits.alert_defaults (tier, balances, cap_percents) VALUES ($1, $2, $3)
ON CONFLICT (tier) DO UPDATE SET balances = EXCLUDED.balances, cap_percents = EXCLUDED.cap_percents
WHERE (credits.alert_defaults.balances, credits.alert_defaults.cap_percents)
      IS DISTINCT FROM (EXCLUDED.balances, EXCLUDED.cap_percents)
RETURNING tier
"""
# Writes that touch many accounts lock them first in the ledger's lock order (SQL_LOCK_ACCOUNTS,
# the batches' own credits.lock_accounts), so they cannot deadlock with a batch of holds or
# settlements that locks some of them meanwhile (Alerts' _locked: the accounts a query finds, then
# the write, whose last parameter is those accounts).
SQL_LOCK_ACCOUNTS = "SELECT credits.lock_accounts($1)"
# accounts that follow a tier's defaults whose ceiling moved with them
_MOVED = "alert_balances IS NULL AND alert_ceiling IS DISTINCT FROM credits.alert_ceiling(tier, NULL)"
SQL_CEILING_ACCOUNTS = f"SELECT array_agg(subject_id) FROM credits.credit_accounts WHERE {_MOVED}"
SQL_CEILINGS = f"""
UPDATE credits.credit_accounts SET alert_ceiling = credits.alert_ceiling(tier, NULL)
WHERE subject_id = ANY ($1) AND {_MOVED}
"""
SQL_SET_THRESHOLDS = """
UPDATE credits.credit_accounts SET alert_balances = $2, alert_cap_percents = $3 WHERE subject_id = $1
RETURNING alert_balances, alert_cap_percents, tier
"""
SQL_THRESHOLDS = """
SELECT a.alert_balances, a.alert_cap_percents,
       coalesce(a.alert_balances, d.balances) AS balances,
       coalesce(a.alert_cap_percents, d.cap_percents) AS cap_percents
FROM credits.credit_accounts a
LEFT JOIN LATERAL (SELECT balances, cap_percents FROM credits.alert_defaults
                   WHERE tier IN (a.tier, '') ORDER BY tier = a.tier DESC LIMIT 1) d ON true
WHERE a.subject_id = $1
"""
_ENDPOINT = "id, url, events, format, description, active, created_at, previous_until"
SQL_CREATE_ENDPOINT = f"""
INSERT INTO credits.webhook_endpoints (url, events, format, description, secret)
VALUES ($1, $2, $3, $4, $5) RETURNING {_ENDPOINT}
"""
SQL_ENDPOINTS = f"SELECT {_ENDPOINT} FROM credits.webhook_endpoints ORDER BY id"
SQL_DEACTIVATE = f"UPDATE credits.webhook_endpoints SET active = false WHERE id = $1 RETURNING {_ENDPOINT}"
SQL_ROTATE = f"""
UPDATE credits.webhook_endpoints
SET previous_secret = secret, previous_until = now() + make_interval(secs => $3), secret = $2
WHERE id = $1 RETURNING {_ENDPOINT}
"""
SQL_DELIVERIES = """
SELECT d.id, d.endpoint_id, o.event_id, o.type, o.subject_id, d.status, d.attempts, d.next_attempt_at,
       d.last_status, d.last_error, d.delivered_at, d.created_at, count(*) OVER () AS total
FROM credits.webhook_deliveries d JOIN credits.outbox o ON o.id = d.outbox_id
WHERE ($1::text IS NULL OR d.status = $1) AND ($2::bigint IS NULL OR d.endpoint_id = $2)
ORDER BY d.id DESC LIMIT $3 OFFSET $4
"""
SQL_REPLAY = """
UPDATE credits.webhook_deliveries
SET status = 'pending', next_attempt_at = now(), started_at = now(), delivered_at = NULL
WHERE id = $1 RETURNING id
"""
# grant.expiring: grants with credit left that expire within the notice ($1 days), announced once;
# their accounts ($2) locked first: accounts before their grants, as a settlement takes them
_EXPIRING = """status = 'live' AND remaining > 0 AND NOT expiring_announced
      AND expires_at > now() AND expires_at <= now() + make_interval(days => $1)"""
SQL_EXPIRING_ACCOUNTS = f"SELECT array_agg(DISTINCT subject_id) FROM credits.grants WHERE {_EXPIRING}"
SQL_EXPIRING = f"""
WITH g AS (
    UPDATE credits.grants SET expiring_announced = true
    WHERE subject_id = ANY ($2) AND {_EXPIRING}
    RETURNING subject_id, id, remaining, expires_at, category
)
INSERT INTO credits.outbox (type, subject_id, data)
SELECT 'grant.expiring', subject_id,
       jsonb_build_object('user_id', subject_id, 'grant_id', id, 'amount', credits.credits_text(remaining),
                          'category', category, 'expires_at', expires_at)
FROM g
"""


async def _locked(conn: asyncpg.Connection, accounts_sql: str, write_sql: str, *args: Any) -> str:
    """``write_sql`` (its parameters: ``args``, then the accounts) once the accounts that
    ``accounts_sql`` finds (with ``args``) are locked in the ledger's order, in the caller's
    transaction; its status ("UPDATE 0" when none was found)."""
    accounts = await conn.fetchval(accounts_sql, *args)
    if not accounts:
        return "UPDATE 0"
    await conn.execute(SQL_LOCK_ACCOUNTS, accounts)
    return str(await conn.execute(write_sql, *args, accounts))


@dataclass(frozen=True)
class TierAlerts:
    balance_below: Sequence[int] = ()  # micro-credits
    monthly_cap_percent: Sequence[int] = (80, 100)


def tier_alerts(config: TierAlertsConfig) -> TierAlerts:
    return TierAlerts(
        sorted((parse_credits(b) for b in config.balance_below), reverse=True),
        sorted(config.monthly_cap_percent),
    )


def endpoint_json(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "url": row["url"],
        "events": list(row["events"]) if row["events"] is not None else None,
        "format": row["format"],
        "description": row["description"],
        "active": row["active"],
        "created_at": row["created_at"].isoformat(),
        "previous_secret_until": row["previous_until"].isoformat() if row["previous_until"] else None,
    }


def _thresholds(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "balance_below": [format_credits(b) for b in row["balances"] or []],
        "monthly_cap_percent": list(row["cap_percents"] or []),
        "own": row["alert_balances"] is not None or row["alert_cap_percents"] is not None,
    }


class Alerts:
    def __init__(
        self, pool: asyncpg.Pool, box: SecretBox | None = None, *, allow_private: bool = False
    ) -> None:
        self.pool = pool
        self.box = box
        self.allow_private = allow_private

    async def sync_defaults(self, tiers: Mapping[str, TierAlerts], default_tier: str) -> None:
        """Write the tiers' defaults (the default tier's also as '', for tiers not configured)."""
        rows = [*tiers.items(), ("", tiers[default_tier])]
        async with self.pool.acquire() as conn, conn.transaction():
            changed = [
                await conn.fetchval(SQL_DEFAULTS, tier, list(a.balance_below), list(a.monthly_cap_percent))
                for tier, a in rows
            ]
            if any(t is not None for t in changed):
                await _locked(conn, SQL_CEILING_ACCOUNTS, SQL_CEILINGS)

    async def thresholds(self, subject_id: str) -> dict[str, Any]:
        row = await self.pool.fetchrow(SQL_THRESHOLDS, subject_id)
        if row is None:
            raise AccountNotFound(f"no credit account {subject_id!r}", param="user_id")
        return _thresholds(row)

    async def set_thresholds(
        self, subject_id: str, balance_below: Sequence[int] | None, monthly_cap_percent: Sequence[int] | None
    ) -> dict[str, Any]:
        """An account's own thresholds (None: its tier's)."""
        balances = None if balance_below is None else sorted(set(balance_below), reverse=True)
        percents = None if monthly_cap_percent is None else sorted(set(monthly_cap_percent))
        if await self.pool.fetchrow(SQL_SET_THRESHOLDS, subject_id, balances, percents) is None:
            raise AccountNotFound(f"no credit account {subject_id!r}", param="user_id")
        return await self.thresholds(subject_id)

    def _box(self) -> SecretBox:
        if self.box is None:
            raise EncryptionNotConfigured(
                "webhook secrets are stored encrypted: set CREDITS_ENCRYPTION_KEYS to register endpoints"
            )
        return self.box

    async def create_endpoint(
        self, url: str, *, events: Sequence[str] | None, format: str, description: str | None
    ) -> dict[str, Any]:
        """Register an endpoint; its signing secret is returned once."""
        box = self._box()
        await check_target(url, allow_private=self.allow_private)
        secret = new_secret()
        row = await self.pool.fetchrow(
            SQL_CREATE_ENDPOINT,
            url,
            list(events) if events else None,
            format,
            description,
            box.encrypt(secret),
        )
        return {**endpoint_json(row), "secret": secret}

    async def endpoints(self) -> list[dict[str, Any]]:
        return [endpoint_json(r) for r in await self.pool.fetch(SQL_ENDPOINTS)]

    async def deactivate(self, endpoint_id: int) -> dict[str, Any]:
        row = await self.pool.fetchrow(SQL_DEACTIVATE, endpoint_id)
        if row is None:
            raise NotFound(f"no webhook endpoint {endpoint_id}", param="endpoint_id")
        return endpoint_json(row)

    async def rotate_secret(self, endpoint_id: int, *, overlap_seconds: float) -> dict[str, Any]:
        """A new secret (returned once); the old one signs too for ``overlap_seconds``."""
        secret = new_secret()
        row = await self.pool.fetchrow(SQL_ROTATE, endpoint_id, self._box().encrypt(secret), overlap_seconds)
        if row is None:
            raise NotFound(f"no webhook endpoint {endpoint_id}", param="endpoint_id")
        return {**endpoint_json(row), "secret": secret}

    async def deliveries(
        self, *, status: str | None, endpoint_id: int | None, limit: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]:
        rows = await self.pool.fetch(SQL_DELIVERIES, status, endpoint_id, limit, offset)
        items = [
            {
                "id": r["id"],
                "endpoint_id": r["endpoint_id"],
                "event_id": r["event_id"],
                "type": r["type"],
                "user_id": r["subject_id"],
                "status": r["status"],
                "attempts": r["attempts"],
                "next_attempt_at": r["next_attempt_at"].isoformat() if r["status"] == "pending" else None,
                "last_status": r["last_status"],
                "last_error": r["last_error"],
                "delivered_at": r["delivered_at"].isoformat() if r["delivered_at"] else None,
                "created_at": r["created_at"].isoformat(),
            }
            for r in rows
        ]
        return items, rows[0]["total"] if rows else 0

    async def replay(self, delivery_id: int) -> None:
        """Deliver again (the same event id), now, with a fresh retry window."""
        if await self.pool.fetchval(SQL_REPLAY, delivery_id) is None:
            raise NotFound(f"no delivery {delivery_id}", param="delivery_id")

    async def announce_expiring(self, days: int) -> int:
        """Raise grant.expiring for grants that expire within ``days``, once each; how many."""
        async with self.pool.acquire() as conn, conn.transaction():
            status = await _locked(conn, SQL_EXPIRING_ACCOUNTS, SQL_EXPIRING, days)
        return int(status.rsplit(" ", 1)[-1])


__all__ = ["Alerts", "TierAlerts", "endpoint_json"]
