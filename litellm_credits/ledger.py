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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import asyncpg

from . import metrics
from .accounts import joining_error
from .bulk_credits import BulkItem, credit_each
from .errors import (
    AccountExists,
    AccountIsMember,
    AccountNotFound,
    Conflict,
    CreditsError,
    IdempotencyConflict,
    InvalidRequest,
    NotFound,
    RefundTooLarge,
    ServiceUnavailable,
)
from .ledger_batch import DEFAULT_BATCH_LANES, DEFAULT_BATCH_SIZE, HoldItem, LedgerBatches, ResolveItem
from .ledger_sql import (
    SQL_APPLY_BONUS,
    SQL_CREATE_ACCOUNT,
    SQL_CREDIT,
    SQL_DISCREPANCIES,
    SQL_EXPIRED_HOLDS,
    SQL_GET_ACCOUNT,
    SQL_LOCK_ACCOUNT,
    SQL_REFUNDABLE,
    SQL_RESOLVED,
    SQL_SET_CAP,
    SQL_TX_BY_KEY,
    SQL_TX_REQUEST,
)
from .limits import refused
from .money import format_credits
from .records import DEFAULT_TERMS, Account, GrantTerms, Hold, Quote, Settlement, Transaction, UsageRecord

log = logging.getLogger("litellm_credits.ledger")
T = TypeVar("T")

CreditType = Literal["allocation", "bonus", "refund", "coupon", "adjustment", "topup"]

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


# told (subject ids, whether to wait for other instances) after accounts changed
ChangeHook = Callable[[Sequence[str], bool], Awaitable[None]]


def _account(row: asyncpg.Record) -> Account:
    return Account(**dict(row))


def _transaction(row: asyncpg.Record) -> Transaction:
    return Transaction(**dict(row))


class Ledger(LedgerBatches):
    """Accounts, credits, holds and history on one asyncpg pool; holds and resolutions issued
    concurrently go to PostgreSQL in batches of up to ``batch_size`` (:mod:`.ledger_batch`). A
    ledger belongs to one event loop: :meth:`close` it there."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        retries: int = 3,
        retry_delay: float = 0.05,
        on_change: ChangeHook | None = None,
        labels: metrics.LabelBounds | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_lanes: int = DEFAULT_BATCH_LANES,
    ) -> None:
        self.pool = pool
        self._init_batches(batch_size, batch_lanes)
        # the label values the sweeper's captured charges may use (without: all ``other``)
        self.labels = labels or metrics.LabelBounds((), lambda: ())
        self.retries = retries
        self.retry_delay = retry_delay
        # told which accounts changed, after the commit (the cache invalidates them)
        self.on_change = on_change

    async def changed(self, *subject_ids: str, wait: bool = True) -> None:
        """Announce committed changes to accounts; ``wait=False`` on the request path."""
        if self.on_change is None or not subject_ids:
            return
        try:
            await self.on_change(subject_ids, wait)
        except Exception:  # a cache must never fail a committed write
            log.exception("ledger: announcing a change to %d accounts failed", len(subject_ids))

    async def _retry(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run an idempotent statement again after a connection-level failure."""
        for attempt in range(self.retries + 1):
            try:
                return await op()
            except _TRANSIENT as exc:
                if attempt == self.retries:
                    metrics.LEDGER_ERRORS.inc()
                    raise ServiceUnavailable("the credit ledger is unavailable; try again") from exc
                log.warning("ledger: transient database error (%s), retrying", type(exc).__name__)
                metrics.LEDGER_RETRIES.inc()
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
        parent_id: str | None = None,
        daily_cap: int | None = None,
        request_cap: int | None = None,
        exist_ok: bool = False,
        conn: asyncpg.Connection | None = None,
    ) -> Account:
        """Open an account (a member of ``parent_id``'s team when given); ``conn`` runs it inside
        the caller's transaction."""
        try:
            row = await (conn or self.pool).fetchrow(
                SQL_CREATE_ACCOUNT,
                subject_id,
                subject_type,
                tier,
                monthly_cap,
                display_name,
                parent_id,
                daily_cap,
                request_cap,
            )
        except asyncpg.PostgresError as exc:
            raise joining_error(exc, parent_id) or exc from None
        if row is not None:
            if conn is None:  # inside a caller's transaction, the caller announces it
                await self.changed(subject_id)
            return _account(row)
        if exist_ok:
            return await self.require_account(subject_id)
        raise AccountExists(f"credit account {subject_id!r} already exists", param="user_id")

    async def set_monthly_cap(self, subject_id: str, cap: int | None) -> Account:
        row = await self.pool.fetchrow(SQL_SET_CAP, subject_id, cap)
        if row is None:
            raise AccountNotFound(f"no credit account {subject_id!r}", param="user_id")
        await self.changed(subject_id)
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
        terms: GrantTerms = DEFAULT_TERMS,
    ) -> Transaction:
        """Add ``amount`` micro-credits as a grant on ``terms`` (a negative adjustment burns grants);
        a repeated idempotency key returns the first result."""
        if amount <= 0 and type != "adjustment":
            raise InvalidRequest("amount must be positive", param="amount")
        if amount == 0:
            raise InvalidRequest("amount cannot be zero", param="amount")
        key = idempotency_key or f"{type}:{uuid.uuid4()}"
        bonus = None
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    SQL_CREDIT,
                    subject_id,
                    amount,
                    type,
                    key,
                    description,
                    metadata or {},
                    None,
                    *terms.args(),
                    None,
                )
                if row is not None and type == "allocation":
                    # a redeemed percent coupon pays its bonus on the next allocation
                    bonus = await conn.fetchval(SQL_APPLY_BONUS, subject_id, amount, row["id"])
        except asyncpg.UniqueViolationError:
            return await self._replayed(subject_id, key, amount, type, terms)
        if row is None:
            # the key first: a credit made under it before (before the account joined a team,
            # say) is answered as it was, and any other request under it is a conflict
            if idempotency_key is not None and await self.pool.fetchrow(SQL_TX_BY_KEY, subject_id, key):
                return await self._replayed(subject_id, key, amount, type, terms)
            raise await self._not_credited(subject_id)
        metrics.count_credited(type, amount, bonus or 0)  # committed, and not a replay
        await self.changed(subject_id)
        return _transaction(row)

    async def _replayed(
        self, subject_id: str, key: str, amount: int, type: CreditType, terms: GrantTerms
    ) -> Transaction:
        """The credit made under ``key`` when this one asks the same, else a conflict."""
        asked = await self.pool.fetchrow(SQL_TX_REQUEST, subject_id, key)
        if (
            asked is None
            or (asked["amount"], asked["type"]) != (amount, type)
            or GrantTerms.recorded(asked) != terms
        ):
            raise IdempotencyConflict()
        row = await self.pool.fetchrow(SQL_TX_BY_KEY, subject_id, key)
        await self.changed(subject_id)  # the first attempt's announcement may have been lost
        return _transaction(row)

    async def _not_credited(self, subject_id: str) -> CreditsError:
        """Why a credit wrote nothing: no such account, or a member (its team takes credits)."""
        account = await self.get_account(subject_id)
        if account is None:
            return AccountNotFound(f"no credit account {subject_id!r}", param="user_id")
        return AccountIsMember(
            f"{subject_id!r} spends the credits of its team {account.parent_id!r}; allocate to the team",
            param="user_id",
            team_id=account.parent_id,
        )

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
        refunded = 0
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(SQL_LOCK_ACCOUNT, subject_id) is None:
                raise AccountNotFound(f"no credit account {subject_id!r}", param="user_id")
            # the key first: a replay is answered whatever is left to refund now
            first = await conn.fetchrow(SQL_TX_REQUEST, subject_id, key)
            if first is not None:
                if (
                    first["type"] != "refund"
                    or first["refund_of"] != transaction_id
                    or (amount is not None and first["amount"] != amount)
                ):
                    raise IdempotencyConflict()
                row = await conn.fetchrow(SQL_TX_BY_KEY, subject_id, key)
            else:
                row = await self._refund(conn, subject_id, transaction_id, amount, key, description)
                refunded = row["amount"]
        metrics.count_credited("refund", refunded)  # once committed
        # a replay too: the first attempt's announcement may have been lost
        await self.changed(subject_id)
        return _transaction(row)

    @staticmethod
    async def _refund(
        conn: asyncpg.Connection,
        subject_id: str,
        transaction_id: int,
        amount: int | None,
        key: str,
        description: str | None,
    ) -> asyncpg.Record:
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
        return await conn.fetchrow(
            SQL_CREDIT,
            subject_id,
            amount,
            "refund",
            key,
            description,
            {},
            transaction_id,
            None,
            None,
            None,
            None,
        )

    async def credit_many(
        self,
        grants: Mapping[str, int],
        *,
        type: CreditType = "allocation",
        description: str | None = None,
        idempotency_key: str | None = None,
        terms: GrantTerms = DEFAULT_TERMS,
    ) -> list[Transaction]:
        """Credit several accounts in one transaction, all with one description and grant terms:
        all of them, or (on any error) none (:func:`~litellm_credits.bulk_credits.credit_many`)."""
        items = {s: BulkItem(a, description, terms) for s, a in grants.items()}
        return await self.credit_each(items, type=type, idempotency_key=idempotency_key)

    async def credit_each(
        self,
        items: Mapping[str, BulkItem],
        *,
        type: CreditType = "allocation",
        idempotency_key: str | None = None,
    ) -> list[Transaction]:
        """Credit several accounts in one transaction, each with its own amount, description and
        grant terms: all of them, or none (:func:`~litellm_credits.bulk_credits.credit_each`)."""
        done = await credit_each(self.pool, items, type=type, idempotency_key=idempotency_key)
        done.count(type)  # a replay counts nothing: the first run did
        await self.changed(*sorted(items))
        return [_transaction(r) for r in done.rows]

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
        request_hash: bytes | None = None,
    ) -> Hold:
        """Hold the quote for the paying account's tier (``default_tier``'s for a tier not quoted):
        the account's own, or its team's for a member. A quote with a ``minimum`` that does not fit
        whole holds what is left instead, when that is at least the minimum (``Hold.clamped``).

        A ``hold_id`` that exists already returns that hold (``replayed``), whatever the balance
        is now: the caller compares ``request_hash`` (or the amount) to tell a retry of the same
        request from another request under the same key. A refusal raises the 402/403/404 that
        names the limit (``limits.refusal``).
        """
        minted = hold_id is None  # a random id of our own: no hold can have it yet
        hold_id = hold_id or uuid.uuid4()
        tiers = list(quotes)
        amounts = [q.amount for q in quotes.values()]
        # a minimum at or above the whole amount could only refuse: no clamping then
        minimums = [
            q.minimum if q.minimum is not None and q.minimum < q.amount else None for q in quotes.values()
        ]
        debits = [q.debits for q in quotes.values()]

        item = HoldItem(
            subject_id, hold_id, tiers, amounts, minimums, debits, default_tier, int(ttl_seconds), model,
            power_level, request_hash, fresh=minted,
        )  # fmt: skip
        with metrics.HOLD_SECONDS.time():
            row, attempts = await self.take(item)
        if row["outcome"] in ("held", "replayed"):
            # a replay too: the first attempt's reply (and its announcement) may have been lost
            await self.changed(*{subject_id, row["payer_id"]}, wait=False)
            hold = Hold(
                hold_id,
                row["payer_id"],
                row["amount"],
                row["debits"],
                row["expires_at"],
                row["tier"],
                replayed=row["outcome"] == "replayed",
                request_hash=row["request_hash"],
                quoted=row["quoted"],
            )
            # a retry that finds an id it minted found its own first attempt's hold (the reply lost)
            if not hold.replayed or (minted and attempts > 1):
                (metrics.HELD_CLAMPED if hold.clamped else metrics.HELD_FULL).inc()
            return hold
        account = await self.get_account(subject_id)
        team = await self.get_account(account.parent_id) if account and account.parent_id else None
        required = row["quoted"]
        if required is None:
            required = quotes.get(row["tier"] or default_tier, quotes[default_tier]).amount
        raise refused(row, account, team, required=required)

    async def _resolve(
        self,
        subject_id: str,
        hold_id: uuid.UUID,
        charge: int | None,
        hold_status: str,
        usage_status: str,
        usage: UsageRecord,
    ) -> Settlement | None:
        item = ResolveItem(subject_id, hold_id, charge, hold_status, usage_status, usage)
        row, attempts = await self.resolve(item)
        if row is None:
            # an earlier try (here, or the caller's: a resolution with its own id) may have
            # committed with its reply lost: a hold that ended exactly as asked (by that id) is its
            mine = (usage.metadata or {}).get("settlement_id")
            if attempts > 1 or mine is not None:
                return await self._resolved(subject_id, hold_id, charge, hold_status, mine)
            return None
        # the member whose request it was changed too (what it holds and spent of its team's)
        await self.changed(*filter(None, (subject_id, row["member_id"])), wait=False)
        return Settlement(row["balance"], row["charge"] if row["debits"] else 0, row["transaction_id"])

    async def _resolved(
        self,
        subject_id: str,
        hold_id: uuid.UUID,
        charge: int | None,
        hold_status: str,
        settlement_id: str | None = None,
    ) -> Settlement | None:
        """The settlement a resolution made, if the hold ended exactly as it asked (and, when it
        carries a ``settlement_id``, by that resolution: not by a duplicate with the same charge)."""
        row = await self._retry(lambda: self.pool.fetchrow(SQL_RESOLVED, subject_id, hold_id))
        expected = row["amount"] if row is not None and charge is None else charge
        if row is None or row["status"] != hold_status or row["settled_amount"] != expected:
            return None
        if settlement_id is not None and row["settlement_id"] != settlement_id:
            return None
        await self.changed(*filter(None, (subject_id, row["member_id"])), wait=False)
        return Settlement(
            row["balance"], row["settled_amount"] if row["debits"] else 0, row["transaction_id"]
        )

    async def settle(
        self, subject_id: str, hold_id: uuid.UUID, charge: int, usage: UsageRecord
    ) -> Settlement | None:
        """Charge the actual cost and end the hold; None if it had already ended (an expired hold
        is still settled: the usage is real). A settlement with an id of its own
        (``usage.metadata["settlement_id"]``, the same on every try) that finds its hold settled
        by that id is answered that settlement: an earlier try committed with its reply lost. A
        duplicate settlement of the same hold (another id) is not taken for it."""
        if charge < 0:
            raise InvalidRequest("charge cannot be negative")
        with metrics.SETTLE_SECONDS.time():
            result = await self._resolve(subject_id, hold_id, charge, "settled", "success", usage)
        if result is not None:
            metrics.SETTLEMENTS.inc()
        return result

    async def void(self, subject_id: str, hold_id: uuid.UUID, usage: UsageRecord | None = None) -> bool:
        """Release the hold without a charge; False if it had already ended."""
        result = await self._resolve(subject_id, hold_id, 0, "voided", "failed", usage or UsageRecord(cost=0))
        if result is not None:
            metrics.VOIDS.inc()
        return result is not None

    async def expire(self, *, policy: Literal["void", "capture"], batch: int = 500) -> int:
        """Resolve holds past their expiry (database clock) by policy; returns how many."""
        rows = await self.pool.fetch(SQL_EXPIRED_HOLDS, batch)
        if policy == "capture":
            usage, charge, status = UsageRecord(metadata={"expired": True}), None, "captured"
        else:
            usage, charge, status = UsageRecord(cost=0, metadata={"expired": True}), 0, "expired"
        # batched, a batch's worth at a time: the settlements that arrive meanwhile share the lane
        # and go in the next batch, never behind all of the sweep's batches (unbatched, each is its
        # own statement: all at once)
        results: list[Settlement | BaseException | None] = []
        step = self.batch_size if self.batched else max(1, len(rows))
        for start in range(0, len(rows), step):
            results += await asyncio.gather(
                *(
                    self._resolve(r["subject_id"], r["id"], charge, status, "expired", usage)
                    for r in rows[start : start + step]
                ),
                return_exceptions=True,
            )
        done = 0
        for row, result in zip(rows, results, strict=True):
            if result is None or isinstance(result, BaseException):
                continue
            done += 1  # counted one by one: another hold's error leaves this one counted
            metrics.EXPIRIES.labels(policy=policy).inc()
            labels = {"tier": row["tier"], "model_group": row["model"], "service": metrics.OTHER}
            metrics.count_charge(self.labels, result.charged, **labels)  # what a capture debited
        for result in results:
            if isinstance(result, BaseException):
                raise result
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
