"""The ledger: the only code that writes balances.

Every change to an account is one SQL statement (one implicit transaction) that updates the
account row and appends the ledger row carrying the balance after it, so ``balance`` equals the
sum of the account's ledger rows at every commit. A hold is a pending transfer: taking it checks
``balance − held`` and the monthly cap in the same statement that raises ``held``, and it ends
exactly once, because every way of ending it starts with ``UPDATE holds … WHERE status =
'open'``, which a second attempt cannot pass. One late path exists on purpose: a hold the sweeper
released at its expiry can still be settled by usage that arrives after it (the upstream served
the request), once; a voided or captured hold cannot.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, TypeVar

import asyncpg

from .errors import (
    AccountDisabled,
    AccountExists,
    AccountNotFound,
    Conflict,
    InsufficientCredits,
    InvalidRequest,
    MonthlyCapExceeded,
    NotFound,
    RefundTooLarge,
    ServiceUnavailable,
)
from .money import format_credits
from .records import Account, Hold, Quote, Settlement, Transaction, UsageRecord

log = logging.getLogger("litellm_credits.ledger")
T = TypeVar("T")

CreditType = Literal["allocation", "bonus", "refund", "coupon", "adjustment"]

# The month the spend counts, from the database clock; a write that sees an older month_start
# starts the month from zero.
_THIS_MONTH = "date_trunc('month', now() AT TIME ZONE 'UTC')::date"
_NEXT_MONTH_AT = f"(({_THIS_MONTH} + interval '1 month') AT TIME ZONE 'UTC')"
_MONTH_SPEND = f"(CASE WHEN a.month_start < {_THIS_MONTH} THEN 0 ELSE a.month_spend END)"

ACCOUNT_COLUMNS = f"""
    a.subject_id, a.subject_type, a.tier, a.balance, a.held, a.monthly_cap,
    {_MONTH_SPEND} AS month_spend, a.status, a.display_name, a.created_at, a.updated_at,
    {_NEXT_MONTH_AT} AS resets_at
"""

SQL_GET_ACCOUNT = f"SELECT {ACCOUNT_COLUMNS} FROM credits.credit_accounts a WHERE a.subject_id = $1"

SQL_CREATE_ACCOUNT = f"""
INSERT INTO credits.credit_accounts AS a (subject_id, subject_type, tier, monthly_cap, display_name)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (subject_id) DO NOTHING
RETURNING {ACCOUNT_COLUMNS}
"""

SQL_CREDIT = """
WITH a AS (
    UPDATE credits.credit_accounts SET balance = balance + $2
    WHERE subject_id = $1
    RETURNING balance
)
INSERT INTO credits.credit_transactions
    (subject_id, amount, balance_after, type, idempotency_key, description, metadata, refund_of)
SELECT $1, $2, a.balance, $3, $4, $5, $6, $7 FROM a
RETURNING id, subject_id, amount, balance_after, type, idempotency_key, description, created_at
"""
SQL_LOCK_ACCOUNT = "SELECT balance FROM credits.credit_accounts WHERE subject_id = $1 FOR UPDATE"
SQL_REFUNDABLE = """
SELECT t.type,
       -t.amount - coalesce((SELECT sum(r.amount) FROM credits.credit_transactions r
                             WHERE r.subject_id = t.subject_id AND r.refund_of = t.id), 0) AS refundable
FROM credits.credit_transactions t WHERE t.subject_id = $1 AND t.id = $2
"""

SQL_TX_BY_KEY = """
SELECT id, subject_id, amount, balance_after, type, idempotency_key, description, created_at
FROM credits.credit_transactions WHERE subject_id = $1 AND idempotency_key = $2
"""

# Takes a hold in one statement. The amount depends on the account's tier (its markup, or no
# debit at all on an unlimited tier), so the caller quotes every tier and the statement picks the
# account's: $3 tiers, $4 amounts, $5 debits (parallel arrays), $6 the tier for unknown ones.
# $1 subject, $2 hold id, $7 ttl seconds, $8 model, $9 power level
SQL_HOLD = f"""
WITH a AS (
    UPDATE credits.credit_accounts a SET
        held        = a.held + CASE WHEN q.debits THEN q.amount ELSE 0 END,
        month_spend = {_MONTH_SPEND},
        month_start = greatest(a.month_start, {_THIS_MONTH})
    FROM unnest($3::text[], $4::bigint[], $5::boolean[]) AS q(tier, amount, debits)
    WHERE a.subject_id = $1
      AND q.tier = CASE WHEN a.tier = ANY($3::text[]) THEN a.tier ELSE $6 END
      AND a.status = 'active'
      AND (NOT q.debits OR q.amount = 0 OR (
               a.balance - a.held >= q.amount
           AND (a.monthly_cap IS NULL OR {_MONTH_SPEND} + a.held + q.amount <= a.monthly_cap)))
    RETURNING a.subject_id, a.tier, q.amount, q.debits
), h AS (
    INSERT INTO credits.holds (id, subject_id, amount, debits, expires_at, model, power_level)
    SELECT $2, a.subject_id, a.amount, a.debits, now() + make_interval(secs => $7), $8, $9 FROM a
    RETURNING expires_at
)
SELECT h.expires_at, a.tier, a.amount, a.debits FROM h, a
"""

# Ends an open hold (or settles an expired one late). $3 is the charge (NULL = the hold's own
# amount, i.e. capture; 0 = void).
# $1 subject, $2 hold id, $3 charge, $4 hold status, $5 usage status, $6 service, $7 model,
# $8 provider, $9 prompt, $10 completion, $11 cached, $12 reasoning, $13 cost, $14 latency ms,
# $15 metadata
SQL_RESOLVE = f"""
WITH prior AS (
    SELECT status FROM credits.holds WHERE subject_id = $1 AND id = $2 FOR UPDATE
), h AS (
    UPDATE credits.holds SET
        status = $4,
        resolved_at = now(),
        settled_amount = coalesce($3, amount)
    FROM prior
    WHERE subject_id = $1 AND id = $2
      -- an open hold ends once; a hold the sweeper released (expired) may still be settled by
      -- the usage that arrives late, since the upstream did serve it
      AND (prior.status = 'open' OR ($4 = 'settled' AND prior.status = 'expired'))
    RETURNING amount, debits, power_level, coalesce($3, amount) AS charge,
              prior.status = 'open' AS was_open
), a AS (
    UPDATE credits.credit_accounts a SET
        balance     = a.balance - CASE WHEN h.debits THEN h.charge ELSE 0 END,
        held        = a.held - CASE WHEN h.debits AND h.was_open THEN h.amount ELSE 0 END,
        month_spend = {_MONTH_SPEND} + CASE WHEN h.debits THEN h.charge ELSE 0 END,
        month_start = greatest(a.month_start, {_THIS_MONTH})
    FROM h
    WHERE a.subject_id = $1
    RETURNING a.balance, h.debits, h.charge, h.power_level
), t AS (
    INSERT INTO credits.credit_transactions
        (subject_id, amount, balance_after, type, idempotency_key, hold_id, model, provider,
         power_level, prompt_tokens, completion_tokens, metadata)
    SELECT $1, -a.charge, a.balance, 'usage', 'hold:' || $2::text, $2, $7, $8,
           a.power_level, $9, $10, $15
    FROM a WHERE a.debits AND a.charge > 0
    RETURNING id
), u AS (
    INSERT INTO credits.usage_events
        (subject_id, request_id, service, model, provider, power_level, prompt_tokens,
         completion_tokens, cached_tokens, reasoning_tokens, cost, charged, latency_ms, status,
         transaction_id, metadata)
    SELECT $1, $2::text, $6, $7, $8, a.power_level, $9, $10, $11, $12,
           coalesce($13, a.charge), CASE WHEN a.debits THEN a.charge ELSE 0 END, $14, $5,
           (SELECT id FROM t), $15
    FROM a
    ON CONFLICT (subject_id, request_id) DO UPDATE SET
        status = EXCLUDED.status, model = EXCLUDED.model, provider = EXCLUDED.provider,
        prompt_tokens = EXCLUDED.prompt_tokens, completion_tokens = EXCLUDED.completion_tokens,
        cached_tokens = EXCLUDED.cached_tokens, reasoning_tokens = EXCLUDED.reasoning_tokens,
        cost = EXCLUDED.cost, charged = EXCLUDED.charged, latency_ms = EXCLUDED.latency_ms,
        transaction_id = EXCLUDED.transaction_id,
        metadata = credits.usage_events.metadata || EXCLUDED.metadata
    RETURNING id
)
SELECT a.balance, a.charge, a.debits, (SELECT id FROM t) AS transaction_id FROM a
"""

SQL_HOLD_AGAIN = """
SELECT h.expires_at, a.tier, h.amount, h.debits
FROM credits.holds h JOIN credits.credit_accounts a USING (subject_id)
WHERE h.subject_id = $1 AND h.id = $2
"""

SQL_EXPIRED_HOLDS = """
SELECT subject_id, id FROM credits.holds
WHERE status = 'open' AND expires_at < now()
ORDER BY expires_at
LIMIT $1
"""

SQL_SET_CAP = f"""
UPDATE credits.credit_accounts a SET monthly_cap = $2 WHERE a.subject_id = $1
RETURNING {ACCOUNT_COLUMNS}
"""

SQL_DISCREPANCIES = "SELECT * FROM credits.v_ledger_discrepancies"

# The database is unreachable, overloaded or restarting, and callers answer 503 rather than 500.
# A statement may be tried again only if doing it twice is harmless: the commit may have happened
# with its reply lost. Holds are keyed by their id and every other write here is guarded by a hold
# status or an idempotency key, so the statements this module retries are all safe to repeat.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.InterfaceError,
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutdown, cannot connect now
    OSError,
    asyncio.TimeoutError,
)
# The input broke a constraint or a type's range (an id too long, an amount past bigint): a
# 400 for the caller, without the database's wording.
INVALID_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)
_TRANSIENT = (
    *UNAVAILABLE_ERRORS,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
)


def _account(row: asyncpg.Record) -> Account:
    return Account(**dict(row))


def _transaction(row: asyncpg.Record) -> Transaction:
    return Transaction(**dict(row))


class Ledger:
    """Accounts, credits, holds and history on one asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, *, retries: int = 3, retry_delay: float = 0.05) -> None:
        self.pool = pool
        self.retries = retries
        self.retry_delay = retry_delay

    async def _retry(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run an idempotent statement again after a connection-level failure."""
        for attempt in range(self.retries + 1):
            try:
                return await op()
            except _TRANSIENT as exc:
                if attempt == self.retries:
                    raise ServiceUnavailable("the credit ledger is unavailable; try again") from exc
                log.warning("ledger: transient database error (%s), retrying", type(exc).__name__)
                await asyncio.sleep(self.retry_delay * 2**attempt)
        raise AssertionError("unreachable")

    # accounts ----------------------------------------------------------------------------

    async def get_account(self, subject_id: str) -> Account | None:
        row = await self._retry(lambda: self.pool.fetchrow(SQL_GET_ACCOUNT, subject_id))
        return _account(row) if row else None

    async def require_account(self, subject_id: str) -> Account:
        account = await self.get_account(subject_id)
        if account is None:
            raise AccountNotFound(f"no credit account {subject_id!r}", param="user_id")
        return account

    async def create_account(
        self,
        subject_id: str,
        *,
        tier: str,
        monthly_cap: int | None = None,
        subject_type: str = "user",
        display_name: str | None = None,
        exist_ok: bool = False,
        conn: asyncpg.Connection | None = None,
    ) -> Account:
        """Open an account; ``conn`` runs it inside the caller's transaction."""
        row = await (conn or self.pool).fetchrow(
            SQL_CREATE_ACCOUNT, subject_id, subject_type, tier, monthly_cap, display_name
        )
        if row is not None:
            return _account(row)
        if exist_ok:
            return await self.require_account(subject_id)
        raise AccountExists(f"credit account {subject_id!r} already exists", param="user_id")

    async def set_monthly_cap(self, subject_id: str, cap: int | None) -> Account:
        row = await self.pool.fetchrow(SQL_SET_CAP, subject_id, cap)
        if row is None:
            raise AccountNotFound(f"no credit account {subject_id!r}", param="user_id")
        return _account(row)

    # credits -----------------------------------------------------------------------------

    async def credit(
        self,
        subject_id: str,
        amount: int,
        *,
        type: CreditType = "allocation",
        idempotency_key: str | None = None,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Transaction:
        """Add ``amount`` micro-credits; a repeated idempotency key returns the first result."""
        if amount <= 0 and type != "adjustment":
            raise InvalidRequest("amount must be positive", param="amount")
        if amount == 0:
            raise InvalidRequest("amount cannot be zero", param="amount")
        key = idempotency_key or f"{type}:{uuid.uuid4()}"
        try:
            row = await self.pool.fetchrow(
                SQL_CREDIT, subject_id, amount, type, key, description, metadata or {}, None
            )
        except asyncpg.UniqueViolationError:
            row = await self.pool.fetchrow(SQL_TX_BY_KEY, subject_id, key)
            if row is None or row["amount"] != amount or row["type"] != type:
                raise Conflict(
                    "idempotency key already used for a different request", param="idempotency_key"
                ) from None
            return _transaction(row)
        if row is None:
            raise AccountNotFound(f"no credit account {subject_id!r}", param="user_id")
        return _transaction(row)

    async def refund(
        self,
        subject_id: str,
        transaction_id: int,
        amount: int | None = None,
        *,
        idempotency_key: str | None = None,
        description: str | None = None,
    ) -> Transaction:
        """Give back (part of) a usage charge: never more than what is left of it to refund.

        The account row is locked first, so two refunds of the same charge run one after the
        other and the second sees the first.
        """
        key = idempotency_key or f"refund:{uuid.uuid4()}"
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(SQL_LOCK_ACCOUNT, subject_id) is None:
                raise AccountNotFound(f"no credit account {subject_id!r}", param="user_id")
            replay = await conn.fetchrow(SQL_TX_BY_KEY, subject_id, key)
            if replay is not None:
                if replay["type"] != "refund" or (amount is not None and replay["amount"] != amount):
                    raise Conflict(
                        "idempotency key already used for a different request", param="idempotency_key"
                    )
                return _transaction(replay)
            original = await conn.fetchrow(SQL_REFUNDABLE, subject_id, transaction_id)
            if original is None:
                raise NotFound(f"no transaction {transaction_id} on this account", param="transaction_id")
            if original["type"] != "usage":
                raise InvalidRequest("only usage can be refunded", param="transaction_id")
            refundable = original["refundable"]
            amount = refundable if amount is None else amount
            if refundable <= 0:
                raise Conflict("this charge has been refunded in full", param="transaction_id")
            if not 0 < amount <= refundable:
                raise RefundTooLarge(
                    f"at most {format_credits(refundable)} of this charge can be refunded",
                    param="amount",
                    refundable=format_credits(refundable),
                )
            row = await conn.fetchrow(
                SQL_CREDIT, subject_id, amount, "refund", key, description, {}, transaction_id
            )
        return _transaction(row)

    async def credit_many(
        self,
        grants: Mapping[str, int],
        *,
        type: CreditType = "allocation",
        description: str | None = None,
        idempotency_key: str | None = None,
    ) -> list[Transaction]:
        """Credit several accounts in one transaction: all of them, or (on any error) none.

        Accounts are locked in sorted order, so concurrent bulk grants cannot deadlock. With an
        idempotency key, a replay returns the first run's transactions.
        """
        if not grants or any(a <= 0 for a in grants.values()):
            raise InvalidRequest("every amount must be positive", param="items")
        keys = {s: f"{idempotency_key or 'bulk:' + str(uuid.uuid4())}:{s}" for s in grants}
        async with self.pool.acquire() as conn, conn.transaction():
            done = [await conn.fetchrow(SQL_TX_BY_KEY, s, keys[s]) for s in sorted(grants)]
            if all(done):
                return [_transaction(r) for r in done if r]
            if any(done):
                raise Conflict(
                    "idempotency key already used for a different request", param="idempotency_key"
                )
            rows, missing = [], []
            for subject in sorted(grants):
                row = await conn.fetchrow(
                    SQL_CREDIT, subject, grants[subject], type, keys[subject], description, {}, None
                )
                if row is None:
                    missing.append(subject)
                else:
                    rows.append(row)
            if missing:
                raise AccountNotFound(
                    f"{len(missing)} of {len(grants)} accounts do not exist; nothing was credited",
                    param="items",
                    missing=missing,
                )
        return [_transaction(r) for r in rows]

    # holds -------------------------------------------------------------------------------

    async def hold(
        self,
        subject_id: str,
        amount: int,
        *,
        ttl_seconds: int,
        debits: bool = True,
        model: str | None = None,
        power_level: str | None = None,
        hold_id: uuid.UUID | None = None,
    ) -> Hold:
        """Hold ``amount`` against the balance and the monthly cap, or raise a 402/403/404."""
        return await self.hold_quoted(
            subject_id,
            {"": Quote(amount, debits)},
            default_tier="",
            ttl_seconds=ttl_seconds,
            model=model,
            power_level=power_level,
            hold_id=hold_id,
        )

    async def hold_quoted(
        self,
        subject_id: str,
        quotes: Mapping[str, Quote],
        *,
        default_tier: str,
        ttl_seconds: int,
        model: str | None = None,
        power_level: str | None = None,
        hold_id: uuid.UUID | None = None,
    ) -> Hold:
        """Hold the quote for the account's tier (``default_tier``'s for a tier not quoted)."""
        hold_id = hold_id or uuid.uuid4()
        tiers = list(quotes)
        amounts = [q.amount for q in quotes.values()]
        debits = [q.debits for q in quotes.values()]

        async def take() -> asyncpg.Record | None:
            try:
                return await self.pool.fetchrow(
                    SQL_HOLD, subject_id, hold_id, tiers, amounts, debits, default_tier,
                    float(ttl_seconds), model, power_level,
                )  # fmt: skip
            except asyncpg.UniqueViolationError:
                # a retry after a commit whose reply was lost: the hold exists, it is ours
                return await self.pool.fetchrow(SQL_HOLD_AGAIN, subject_id, hold_id)

        row = await self._retry(take)
        if row is not None:
            return Hold(hold_id, subject_id, row["amount"], row["debits"], row["expires_at"], row["tier"])
        raise await self._refusal(subject_id, quotes, default_tier)

    async def _refusal(self, subject_id: str, quotes: Mapping[str, Quote], default_tier: str) -> Exception:
        account = await self.get_account(subject_id)
        if account is None:
            return AccountNotFound(f"no credit account {subject_id!r}", param="user")
        if account.status != "active":
            return AccountDisabled(f"credit account {subject_id!r} is disabled")
        amount = quotes.get(account.tier, quotes[default_tier]).amount
        common = {
            "balance": format_credits(account.balance),
            "held": format_credits(account.held),
            "available": format_credits(account.available),
            "required": format_credits(amount),
        }
        if account.available < amount:
            return InsufficientCredits(
                f"insufficient credits: {format_credits(amount)} required, "
                f"{format_credits(account.available)} available",
                **common,
            )
        cap = account.monthly_cap or 0
        return MonthlyCapExceeded(
            f"monthly cap of {format_credits(cap)} credits reached; it resets at "
            f"{account.resets_at.isoformat()}",
            monthly_cap=format_credits(cap),
            month_spend=format_credits(account.month_spend),
            resets_at=account.resets_at.isoformat(),
            **common,
        )

    async def _resolve(
        self,
        subject_id: str,
        hold_id: uuid.UUID,
        charge: int | None,
        hold_status: str,
        usage_status: str,
        usage: UsageRecord,
    ) -> Settlement | None:
        row = await self._retry(
            lambda: self.pool.fetchrow(
                SQL_RESOLVE,
                subject_id,
                hold_id,
                charge,
                hold_status,
                usage_status,
                usage.service,
                usage.model,
                usage.provider,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.cached_tokens,
                usage.reasoning_tokens,
                usage.cost,
                usage.latency_ms,
                usage.metadata or {},
            )
        )
        if row is None:
            return None
        return Settlement(row["balance"], row["charge"] if row["debits"] else 0, row["transaction_id"])

    async def settle(
        self, subject_id: str, hold_id: uuid.UUID, charge: int, usage: UsageRecord
    ) -> Settlement | None:
        """Charge the actual cost and end the hold; None if it had already ended (an expired hold
        is still settled: the usage is real)."""
        if charge < 0:
            raise InvalidRequest("charge cannot be negative")
        return await self._resolve(subject_id, hold_id, charge, "settled", "success", usage)

    async def void(self, subject_id: str, hold_id: uuid.UUID, usage: UsageRecord | None = None) -> bool:
        """Release the hold without a charge; False if it had already ended."""
        result = await self._resolve(subject_id, hold_id, 0, "voided", "failed", usage or UsageRecord(cost=0))
        return result is not None

    async def expire(self, *, policy: Literal["void", "capture"], batch: int = 500) -> int:
        """Resolve holds past their expiry (database clock) by policy; returns how many."""
        rows = await self.pool.fetch(SQL_EXPIRED_HOLDS, batch)
        done = 0
        for row in rows:
            if policy == "capture":
                result = await self._resolve(
                    row["subject_id"],
                    row["id"],
                    None,
                    "captured",
                    "expired",
                    UsageRecord(metadata={"expired": True}),
                )
            else:
                result = await self._resolve(
                    row["subject_id"],
                    row["id"],
                    0,
                    "expired",
                    "expired",
                    UsageRecord(cost=0, metadata={"expired": True}),
                )
            done += result is not None
        return done

    # reads -------------------------------------------------------------------------------

    async def discrepancies(self) -> list[dict[str, Any]]:
        """Accounts whose balance or held amount disagrees with the ledger; empty when sound."""
        return [dict(r) for r in await self.pool.fetch(SQL_DISCREPANCIES)]


__all__ = [
    "INVALID_INPUT_ERRORS",
    "UNAVAILABLE_ERRORS",
    "Account",
    "Hold",
    "Ledger",
    "Quote",
    "Settlement",
    "Transaction",
    "UsageRecord",
]
