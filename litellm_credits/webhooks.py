"""Alert webhooks: endpoints, Standard Webhooks signatures, and the outbox's dispatcher.

Alerts are written to ``credits.outbox`` by the database, in the transaction of the change that
raised them (migration 0011), so none is lost when a process dies. The dispatcher (each proxy runs
one; several may run at once) copies each event into a delivery per endpoint that takes its type,
then claims due deliveries with ``FOR UPDATE SKIP LOCKED`` and a lease, POSTs them, and retries a
failure with exponential backoff until ``retry_hours`` after the first attempt, when the delivery
is dead (visible to admins, replayable). Delivery is at least once; ``webhook-id`` is the event's
id on every attempt, so a receiver deduplicates by it.

Signatures follow the Standard Webhooks specification (https://www.standardwebhooks.com):
``webhook-signature: v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>``, where the secret
is the bytes of the base64 after ``whsec_``; after a rotation the previous secret signs too (space-
separated signatures) until ``previous_until``.

Targets (SSRF): http(s) only; the host is resolved at registration and before every attempt, and
loopback, private, link-local (cloud metadata: 169.254.169.254, fd00:ec2::254), multicast and
reserved addresses are refused unless ``alerts.allow_private_targets`` is set (metadata addresses
and link-local ones are refused even then); the attempt then connects to the addresses that check
approved, not to a second lookup's (:mod:`~litellm_credits.webhook_targets`). A redirect is not
followed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

import asyncpg
import httpx

from .crypto import EncryptionNotConfigured, SecretBox
from .errors import CreditsError, WebhookTargetRefused
from .metrics import WEBHOOK_DELIVERED, WEBHOOK_FAILED
from .webhook_targets import VETTED, check_target, vet_connections

log = logging.getLogger("litellm_credits.webhooks")

# what an endpoint may subscribe to (the outbox's type CHECK, migrations 0011 and 0012)
EventType = Literal[
    "balance.low",
    "balance.depleted",
    "monthly_cap.reached",
    "grant.expiring",
    "grant.expired",
    "topup.succeeded",
    "topup.failed",
    "topup.reversed",
]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
LEASE_SECONDS = 60
DISPATCH_BATCH = 100  # deliveries attempted at once by one dispatcher


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,`` signature of a message under ``secret`` (``whsec_...``)."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(_key(secret), content, hashlib.sha256).digest()).decode()


def headers(secrets_: list[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, msg_id, timestamp, body) for s in secrets_),
        "content-type": "application/json",
        "user-agent": "litellm-credits-webhooks/1",
    }


@dataclass(frozen=True)
class Policy:
    retry_hours: float = 24.0
    base_delay_seconds: float = 5.0
    max_delay_seconds: float = 3600.0
    timeout_seconds: float = 10.0
    allow_private: bool = False

    def delay(self, attempts: int) -> float:
        """Before the next attempt, after ``attempts`` failed: doubling, capped, with +-10 % jitter."""
        raw = min(self.max_delay_seconds, self.base_delay_seconds * 2 ** max(0, attempts - 1))
        return raw * random.uniform(0.9, 1.1)


SQL_FAN_OUT = """
WITH o AS (
    SELECT id, type, created_at FROM credits.outbox WHERE NOT fanned_out ORDER BY id LIMIT $1
    FOR UPDATE SKIP LOCKED
), d AS (
    INSERT INTO credits.webhook_deliveries (outbox_id, endpoint_id)
    SELECT o.id, e.id FROM o JOIN credits.webhook_endpoints e
        ON e.active AND (e.events IS NULL OR o.type = ANY (e.events)) AND e.created_at <= o.created_at
    ON CONFLICT (outbox_id, endpoint_id) DO NOTHING
)
UPDATE credits.outbox x SET fanned_out = true FROM o WHERE x.id = o.id
"""
SQL_CLAIM = """
UPDATE credits.webhook_deliveries d
SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => $2)
FROM (SELECT id FROM credits.webhook_deliveries
      WHERE status = 'pending' AND next_attempt_at <= now()
      ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) c,
     credits.outbox o, credits.webhook_endpoints e
WHERE d.id = c.id AND o.id = d.outbox_id AND e.id = d.endpoint_id AND e.active
RETURNING d.id, d.attempts, d.started_at, o.event_id, o.type, o.data, o.created_at AS occurred_at,
          e.url, e.format, e.secret, e.previous_secret, e.previous_until > now() AS previous_valid
"""
SQL_DELIVERED = """
UPDATE credits.webhook_deliveries
SET status = 'delivered', delivered_at = now(), last_status = $2, last_error = NULL
WHERE id = $1 AND status = 'pending'
"""
SQL_FAILED = """
UPDATE credits.webhook_deliveries
SET status = CASE WHEN now() >= started_at + make_interval(secs => $4) THEN 'dead' ELSE 'pending' END,
    next_attempt_at = now() + make_interval(secs => $5), last_status = $2, last_error = left($3, 1000)
WHERE id = $1 AND status = 'pending'
RETURNING status
"""


def body_of(row: Any) -> bytes:
    """The JSON body: the event (Standard Webhooks' type, timestamp, data), or a Slack text."""
    if row["format"] == "slack":
        return json.dumps({"text": slack_text(row["type"], row["data"])}).encode()
    occurred: datetime = row["occurred_at"]
    event = {"type": row["type"], "timestamp": occurred.isoformat(), "data": row["data"]}
    return json.dumps(event, separators=(",", ":")).encode()


def slack_text(type_: str, data: dict[str, Any]) -> str:
    who = data.get("user_id", "?")
    texts = {
        "balance.low": f"Credits of {who} are low: {data.get('balance')} left "
        f"(below {data.get('threshold')}).",
        "balance.depleted": f"Credits of {who} are used up: balance {data.get('balance')}.",
        "monthly_cap.reached": f"{who} has spent {data.get('percent')} % of its monthly cap "
        f"({data.get('month_spend')} of {data.get('monthly_cap')}).",
        "grant.expired": f"{data.get('amount')} credits of {who} expired (grant {data.get('grant_id')}).",
        "grant.expiring": f"{data.get('amount')} credits of {who} expire at {data.get('expires_at')}.",
        "topup.succeeded": f"{who} topped up {data.get('amount')} credits"
        + (f" (credited to team {data['credited_to']})." if data.get("credited_to") else "."),
        "topup.failed": f"A top-up of {data.get('amount')} credits by {who} failed.",
        "topup.reversed": f"{data.get('taken_back')} credits of {who}'s top-up were taken back "
        + (f"from team {data['credited_to']} " if data.get("credited_to") else "")
        + f"({data.get('reason')}).",
    }
    return texts.get(type_, f"{type_}: {json.dumps(data, sort_keys=True)}")


class Dispatcher:
    """Fans the outbox out to endpoints and delivers what is due."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        box: SecretBox | None,
        policy: Policy,
        *,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.pool = pool
        self.box = box
        self.policy = policy
        self.client = client or httpx.AsyncClient(timeout=policy.timeout_seconds, follow_redirects=False)
        self.pinned = vet_connections(self.client)

    async def close(self) -> None:
        await self.client.aclose()

    async def run_once(self, batch: int = DISPATCH_BATCH) -> int:
        """Fan out new events, then attempt every due delivery once; returns how many were tried."""
        await self.pool.execute(SQL_FAN_OUT, batch)
        rows = await self.pool.fetch(SQL_CLAIM, batch, float(LEASE_SECONDS))
        await asyncio.gather(*(self._attempt(r) for r in rows))
        return len(rows)

    async def _attempt(self, row: Any) -> None:
        body = body_of(row)
        status: int | None = None
        try:
            if self.box is None:
                raise EncryptionNotConfigured("CREDITS_ENCRYPTION_KEYS is not set: no secret to sign with")
            keys = [self.box.decrypt(row["secret"]).reveal()]
            if row["previous_secret"] and row["previous_valid"]:
                keys.append(self.box.decrypt(row["previous_secret"]).reveal())
            vetted = await check_target(row["url"], allow_private=self.policy.allow_private)
            if not self.pinned:
                raise WebhookTargetRefused("connections cannot be pinned to the checked addresses")
            sent = headers(keys, row["event_id"], int(time.time()), body)
            pinned = VETTED.set(vetted)  # (this task's context: each attempt runs in its own)
            try:
                response = await self.client.post(row["url"], content=body, headers=sent)
            finally:
                VETTED.reset(pinned)
            status = response.status_code
            if 200 <= status < 300:
                await self.pool.execute(SQL_DELIVERED, row["id"], status)
                WEBHOOK_DELIVERED.inc()
                return
            error = f"HTTP {status}"
        except CreditsError as exc:
            error = exc.message
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:1000]
        WEBHOOK_FAILED.inc()
        retry_seconds = self.policy.retry_hours * 3600
        state = await self.pool.fetchval(
            SQL_FAILED, row["id"], status, error, retry_seconds, self.policy.delay(row["attempts"])
        )
        log.warning(
            "litellm-credits: webhook %s (%s) to %s failed on attempt %d: %s%s",
            row["event_id"],
            row["type"],
            row["url"],
            row["attempts"],
            error,
            "; dead, no more retries" if state == "dead" else "",
        )


__all__ = [
    "EVENT_TYPES",
    "Dispatcher",
    "EventType",
    "Policy",
    "WebhookTargetRefused",
    "body_of",
    "check_target",
    "headers",
    "new_secret",
    "sign",
]
