"""Per-account OpenRouter keys: provisioned by the operator or brought by the user (BYOK).

A provisioned key's OpenRouter credit limit is kept equal to what the account can still pay
(``balance - held``, in USD), so even a bug in the proxy cannot overspend at the provider.
Keys are stored encrypted (:mod:`crypto`), found by keyed hash, and shown only as a tail.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from decimal import ROUND_DOWN, Decimal
from typing import Any

import asyncpg

from .crypto import Secret, SecretBox, mask
from .errors import Conflict, CreditsError, InvalidRequest, NotFound
from .ledger import Ledger
from .openrouter import OpenRouterClient, OpenRouterError

log = logging.getLogger("litellm_credits.openrouter")

SQL_INSERT = """
INSERT INTO credits.openrouter_accounts
    (subject_id, key_hash, encrypted_key, key_tail, provider_key_id, byok, credit_limit)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (subject_id) DO NOTHING
RETURNING subject_id
"""
SQL_GET = """
SELECT subject_id, encrypted_key, key_tail, provider_key_id, byok, credit_limit, last_synced_at, status,
       provider_usage_usd, provider_limit_remaining_usd, is_free_tier
FROM credits.openrouter_accounts WHERE subject_id = $1
"""
SQL_DELETE = "DELETE FROM credits.openrouter_accounts WHERE subject_id = $1"
# the cap just set at OpenRouter ($2, micro-USD; NULL on a brought key) and the key's usage then
SQL_CAPPED = """
UPDATE credits.openrouter_accounts SET credit_limit = coalesce($2, credit_limit), provider_usage_usd = $3
WHERE subject_id = $1
"""
# what the key itself reports: usage, credit left under its limit, free tier; the sync is complete
SQL_SYNCED = """
UPDATE credits.openrouter_accounts SET
    provider_usage_usd = $2, provider_limit_remaining_usd = $3, is_free_tier = $4, last_synced_at = now()
WHERE subject_id = $1
"""
SQL_SYNCABLE = """
SELECT subject_id FROM credits.openrouter_accounts
WHERE status = 'active' AND ($1 OR NOT byok)
ORDER BY subject_id
"""
# what the ledger priced for openrouter usage since the key exists, in USD (exact, from settlement)
SQL_LEDGER_USD = """
SELECT coalesce(sum((e.metadata->>'usd')::numeric), 0)
FROM credits.usage_events e JOIN credits.openrouter_accounts o USING (subject_id)
WHERE e.subject_id = $1 AND e.provider = 'openrouter' AND e.created_at >= o.created_at
"""
CENT = Decimal("0.01")


class OpenRouterAccounts:
    def __init__(
        self, ledger: Ledger, box: SecretBox, client: OpenRouterClient, credits_per_usd: Decimal
    ) -> None:
        self.ledger = ledger
        self.box = box
        self.client = client
        self.credits_per_usd = credits_per_usd

    @property
    def pool(self) -> asyncpg.Pool:
        return self.ledger.pool

    async def spendable_usd(self, subject_id: str) -> Decimal:
        """What the account can still pay, in USD, rounded down to the cent (never negative)."""
        account = await self.ledger.require_account(subject_id)
        credits = Decimal(max(account.available, 0)).scaleb(-6)
        return (credits / self.credits_per_usd).quantize(CENT, rounding=ROUND_DOWN)

    async def provision(self, subject_id: str) -> dict[str, Any]:
        """Create the account's OpenRouter key, capped at what the account can pay."""
        if await self.pool.fetchrow(SQL_GET, subject_id) is not None:
            raise Conflict("this account already has an OpenRouter key", param="user_id")
        limit = await self.spendable_usd(subject_id)
        created = await self.client.create_key(f"credits:{subject_id}", limit=limit)
        assert created.key is not None
        plaintext = created.key.reveal()
        try:
            stored = await self.pool.fetchval(
                SQL_INSERT, subject_id, self.box.lookup_hash(plaintext), self.box.encrypt(plaintext),
                mask(plaintext), created.hash, False, _micro_usd(limit),
            )  # fmt: skip
        except BaseException:
            await self.client.delete_key(created.hash)  # do not leave an orphan key at OpenRouter
            raise
        if stored is None:  # a concurrent provision won: remove ours
            await self.client.delete_key(created.hash)
            raise Conflict("this account already has an OpenRouter key", param="user_id")
        return await self.status(subject_id)

    async def bring_own_key(self, subject_id: str, key: str) -> dict[str, Any]:
        """Store a key the user brought, after OpenRouter confirms it works."""
        await self.ledger.require_account(subject_id)
        try:
            usage = await self.client.key_usage(Secret(key))
        except OpenRouterError:
            raise InvalidRequest("OpenRouter does not accept this key", param="key") from None
        await self.pool.execute(SQL_DELETE, subject_id)
        await self.pool.fetchval(
            SQL_INSERT,
            subject_id,
            self.box.lookup_hash(key),
            self.box.encrypt(key),
            mask(key),
            None,
            True,
            None,
        )
        await self.pool.execute(
            SQL_SYNCED, subject_id, usage.usage, usage.limit_remaining, usage.is_free_tier
        )
        return await self.status(subject_id)

    async def key_for(self, subject_id: str) -> Secret | None:
        found = await self.key_and_kind(subject_id)
        return found[0] if found else None

    async def key_and_kind(self, subject_id: str) -> tuple[Secret, bool] | None:
        """The account's live key and whether the user brought it (BYOK)."""
        row = await self.pool.fetchrow(SQL_GET, subject_id)
        if row is None or row["status"] != "active":
            return None
        return self.box.decrypt(bytes(row["encrypted_key"])), bool(row["byok"])

    async def status(self, subject_id: str) -> dict[str, Any]:
        row = await self.pool.fetchrow(SQL_GET, subject_id)
        if row is None:
            raise NotFound("this account has no OpenRouter key", param="user_id")
        limit = row["credit_limit"]
        return {
            "user_id": subject_id,
            "key": row["key_tail"],
            "byok": row["byok"],
            "credit_limit_usd": None if limit is None else str(Decimal(limit).scaleb(-6)),
            "last_synced_at": row["last_synced_at"].isoformat() if row["last_synced_at"] else None,
            "status": row["status"],
            "openrouter_usage_usd": _usd(row["provider_usage_usd"]),
            "openrouter_limit_remaining_usd": _usd(row["provider_limit_remaining_usd"]),
            "is_free_tier": row["is_free_tier"],
        }

    async def sync(self, subject_id: str) -> dict[str, Any]:
        """Cap a provisioned key at what the account can pay now, then read what OpenRouter says
        of the key: its usage, the credit left under its limit and whether its account is on the
        free tier. A brought key is only read (its limit is the user's business)."""
        row = await self.pool.fetchrow(SQL_GET, subject_id)
        if row is None:
            raise NotFound("this account has no OpenRouter key", param="user_id")
        if not row["byok"]:
            # the cap first: it is what keeps the provider from overspending, so a failed read
            # of the key's usage afterwards must not hold it back
            limit = await self.spendable_usd(subject_id)
            capped = await self.client.update_key(row["provider_key_id"], limit=limit)
            await self.pool.execute(SQL_CAPPED, subject_id, _micro_usd(limit), capped.usage)
        usage = await self.client.key_usage(self.box.decrypt(bytes(row["encrypted_key"])))
        await self.pool.execute(
            SQL_SYNCED, subject_id, usage.usage, usage.limit_remaining, usage.is_free_tier
        )
        return await self.status(subject_id)

    async def syncable(self, only: Iterable[str] | None = None, *, brought: bool = True) -> list[str]:
        """Accounts with a live key (provisioned ones only unless ``brought``)."""
        subjects = [r["subject_id"] for r in await self.pool.fetch(SQL_SYNCABLE, brought)]
        return subjects if only is None else [s for s in subjects if s in set(only)]

    async def sync_all(self, only: Iterable[str] | None = None) -> dict[str, str]:
        """Sync every live key; account -> "ok" or the error type (one failure stops none)."""
        results = {}
        for subject in await self.syncable(only):
            try:
                await self.sync(subject)
                results[subject] = "ok"
            except CreditsError as err:
                log.warning("litellm-credits: syncing the OpenRouter key of %s failed: %s", subject, err.type)
                results[subject] = err.type
            except Exception as exc:  # one account's surprise must not stop the others' sync
                log.exception("litellm-credits: syncing the OpenRouter key of %s failed", subject)
                results[subject] = type(exc).__name__
        return results

    async def reconcile(self, only: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Per provisioned key: OpenRouter's usage against what the ledger priced, in USD."""
        report = []
        for subject in await self.syncable(only, brought=False):
            stored = await self.pool.fetchrow(SQL_GET, subject)
            remote = await self.client.get_key(stored["provider_key_id"])
            ledger_usd = Decimal(await self.pool.fetchval(SQL_LEDGER_USD, subject))
            report.append(
                {
                    "user_id": subject,
                    "openrouter_usage_usd": str(remote.usage),
                    "ledger_usd": str(ledger_usd),
                    # positive: OpenRouter counted more than the ledger charged for
                    "drift_usd": str(remote.usage - ledger_usd),
                }
            )
        return report

    async def remove(self, subject_id: str) -> None:
        row = await self.pool.fetchrow(SQL_GET, subject_id)
        if row is None:
            raise NotFound("this account has no OpenRouter key", param="user_id")
        if not row["byok"]:
            await self.client.delete_key(row["provider_key_id"])
        await self.pool.execute(SQL_DELETE, subject_id)


def _micro_usd(usd: Decimal) -> int:
    return int(usd.scaleb(6))


def _usd(value: Decimal | None) -> str | None:
    return None if value is None else format(value.normalize(), "f")


__all__ = ["OpenRouterAccounts"]
