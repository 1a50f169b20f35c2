"""The ledger's holds and resolutions under group commit (:mod:`~litellm_credits.group_commit`).

Concurrent holds go to PostgreSQL as one ``credits.take_holds`` call, and concurrent settlements,
voids and expiries as one ``credits.resolve_holds`` call (migration 0014): one statement and one
commit per batch, one row per item. A batch of one runs the single-item statement (``SQL_HOLD``,
``SQL_RESOLVE``): the same answer, without the batch's JSON and lock step, so an idle process pays
what it paid before batching. Each kind has ``lanes`` batches in flight side by side, items
spread by account (an account's items stay in one lane, in arrival order).

A transient error (the connection lost, a deadlock) runs the whole batch again; the retry passes
``fresh = false`` for every hold, since the first attempt may have committed with its reply lost.
Any other error means one of the items is bad, and nothing of the batch was written: its items
then run one by one through the single-item statements, so each caller gets its own answer. A
database without migration 0014 (``auto_migrate`` off, not migrated yet) has no batch functions:
the ledger then sends every item on its own statement, as before group commit, until restarted.

Lock order: the batch functions lock accounts members first, then the rest, each in code-point
order, as the single statements and bulk grants do. Two rare cases fall outside that order: an
account that moves into a team (the move locks it, then the team) and a batch of holds that
includes an account which left its team with holds still open (ranked by its current place).
PostgreSQL detects such a deadlock after ``deadlock_timeout`` and the batch runs again; a retry
after a deadlock (or a serialization failure) is known not to follow a commit, so it does not
make the batch's resolutions look for a lost reply.

Two resolutions of one hold in one batch (a callback that fired twice) are one resolution: the
first ends the hold, the later ones find it ended and answer None, even after a retry (where a
resolution that finds its hold ended asks whether it ended exactly as asked: the first attempt's
commit, its reply lost).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import asyncpg
import orjson

from . import metrics
from .errors import ServiceUnavailable
from .group_commit import GroupCommit
from .ledger_sql import SQL_HOLD, SQL_HOLD_AGAIN, SQL_RESOLVE, SQL_RESOLVE_BATCH, SQL_TAKE_BATCH
from .records import UsageRecord

log = logging.getLogger("litellm_credits.ledger")
T = TypeVar("T")
Item = TypeVar("Item", "HoldItem", "ResolveItem")

# errors after which the server has rolled the statement back: a retry after one of them cannot
# follow a commit whose reply was lost (a lost connection can)
ROLLED_BACK = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)

# at 64 concurrent callers, batches of 32 keep a batch of holds and one of settlements at the
# database side by side (a pipeline); batches of 64 took every caller at once, holds then
# settlements, one backend busy at a time (bench/RESULTS.md, "one lane")
DEFAULT_BATCH_SIZE = 32
# batches of each kind in flight at once (lanes by account). One: a batch of holds and one of
# settlements keep two backends busy, about what one proxy process can feed; a second lane split
# the same items into batches half as big, each paying the batch's fixed cost (0.8x the cycles/s
# of one lane at 64 callers on 2 cores). Many proxy processes give the server its concurrency.
DEFAULT_BATCH_LANES = 1


def batch_json(items: list[dict[str, Any]]) -> str:
    """A batch's items as the JSON text its function takes: orjson (a batch of 32 settlements in
    a tenth of the standard library's time), or ``json`` for what orjson refuses (an integer past
    64 bits in an item's metadata, text that is not valid Unicode), which PostgreSQL then judges
    as it always did."""
    try:
        return orjson.dumps(items).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(items)


@dataclass(frozen=True)
class HoldItem:
    """One hold's arguments to ``credits.take_hold``, in its parameters' order."""

    subject_id: str
    hold_id: uuid.UUID
    tiers: list[str]
    amounts: list[int]
    minimums: list[int | None]
    debits: list[bool]
    default_tier: str
    ttl_seconds: int
    model: str | None
    power_level: str | None
    request_hash: bytes | None
    fresh: bool  # a random id just minted, first attempt: not looked for

    def args(self, fresh: bool) -> tuple[Any, ...]:
        return (
            self.subject_id, self.hold_id, self.tiers, self.amounts, self.minimums, self.debits,
            self.default_tier, self.ttl_seconds, self.model, self.power_level, self.request_hash, fresh,
        )  # fmt: skip

    def json(self, fresh: bool) -> dict[str, Any]:
        """The item in take_holds' jsonb (integers stay integers: exact in jsonb)."""
        return {
            "subject": self.subject_id,
            "hold": str(self.hold_id),
            "tiers": self.tiers,
            "amounts": self.amounts,
            "minimums": self.minimums,
            "debits": self.debits,
            "default_tier": self.default_tier,
            "ttl": self.ttl_seconds,
            "model": self.model,
            "power_level": self.power_level,
            "request_hash": None if self.request_hash is None else "\\x" + self.request_hash.hex(),
            "fresh": fresh,
        }


@dataclass(frozen=True)
class ResolveItem:
    """One resolution's arguments to ``credits.resolve_hold``."""

    subject_id: str
    hold_id: uuid.UUID
    charge: int | None
    hold_status: str
    usage_status: str
    usage: UsageRecord

    def args(self) -> tuple[Any, ...]:
        u = self.usage
        return (
            self.subject_id, self.hold_id, self.charge, self.hold_status, self.usage_status, u.service,
            u.model, u.provider, u.prompt_tokens, u.completion_tokens, u.cached_tokens,
            u.reasoning_tokens, u.cost, u.latency_ms, u.metadata or {},
        )  # fmt: skip

    def json(self) -> dict[str, Any]:
        u = self.usage
        return {
            "subject": self.subject_id,
            "hold": str(self.hold_id),
            "charge": self.charge,
            "status": self.hold_status,
            "usage_status": self.usage_status,
            "service": u.service,
            "model": u.model,
            "provider": u.provider,
            "prompt": u.prompt_tokens,
            "completion": u.completion_tokens,
            "cached": u.cached_tokens,
            "reasoning": u.reasoning_tokens,
            "cost": u.cost,
            "latency": u.latency_ms,
            "metadata": u.metadata or {},
        }


# a batch's answer for one item: its row (None: a resolution that found its hold ended) and how
# many attempts the statement took (more than one: the first may have committed, reply lost)
Taken = tuple[asyncpg.Record, int]
Resolved = tuple[asyncpg.Record | None, int]


class Attempts:
    """The attempts of one statement (or batch) that may have committed with their reply lost:
    a retry after one of them must not take a minted hold id for fresh, and a resolution that
    then finds its hold ended asks whether that attempt ended it. An attempt the server rolled
    back (a deadlock, a serialization failure) is not counted."""

    def __init__(self, tried: int = 0) -> None:
        self.count = tried  # attempts made before (a batch's, for one of its items)

    async def run(
        self, retry: Callable[[Callable[[], Awaitable[T]]], Awaitable[T]], op: Callable[[bool], Awaitable[T]]
    ) -> T:
        """``op(first)`` under ``retry``; ``first``: no earlier attempt can have committed."""

        async def attempt() -> T:
            self.count += 1
            try:
                return await op(self.count == 1)
            except ROLLED_BACK:
                self.count -= 1
                raise

        return await retry(attempt)


class LedgerBatches:
    """The group-commit half of :class:`~litellm_credits.ledger.Ledger`: its holds and resolutions."""

    pool: asyncpg.Pool

    if TYPE_CHECKING:  # the Ledger's

        async def _retry(self, op: Callable[[], Awaitable[T]]) -> T: ...

        async def void(
            self, subject_id: str, hold_id: uuid.UUID, usage: UsageRecord | None = None
        ) -> bool: ...

    def _init_batches(self, batch_size: int, lanes: int) -> None:
        self.batch_size = batch_size
        self.batched = batch_size > 1  # off: every item on its own statement
        size = metrics.LEDGER_BATCH_SIZE
        self.hold_batches: GroupCommit[HoldItem, Taken] = GroupCommit(
            self._take_batch,
            max_size=batch_size,
            lanes=lanes,
            key=lambda item: item.subject_id,
            on_batch=size.labels(kind="hold").observe,
            on_orphan=self._orphaned,
        )
        self._voiding: set[asyncio.Task[Any]] = set()
        self.resolve_batches: GroupCommit[ResolveItem, Resolved] = GroupCommit(
            self._resolve_batch,
            max_size=batch_size,
            lanes=lanes,
            key=lambda item: item.subject_id,
            on_batch=size.labels(kind="resolve").observe,
        )

    async def close(self) -> None:
        """Send what is queued, then refuse holds and resolutions (the pool is the caller's)."""
        await self.hold_batches.close()
        if self._voiding:
            await asyncio.gather(*self._voiding, return_exceptions=True)
        await self.resolve_batches.close()

    async def take(self, item: HoldItem) -> Taken:
        """The hold's row, in a batch (or on its own statement when batching is off)."""
        if not self.batched:
            return await self._take_one(item)
        return await self.hold_batches.submit(item)

    async def resolve(self, item: ResolveItem) -> Resolved:
        if not self.batched:
            return await self._resolve_one(item)
        return await self.resolve_batches.submit(item)

    def _orphaned(self, item: HoldItem, taken: Taken) -> None:
        """A hold taken for a caller that was cancelled while its batch was at the database: no
        request will end it, so it is voided now rather than held until its TTL (and charged,
        under the capture policy). Only an id minted for that call: nobody else can know it."""
        row = taken[0]
        if not item.fresh or row["outcome"] != "held":
            return
        task = asyncio.get_running_loop().create_task(self.void(row["payer_id"], item.hold_id))
        self._voiding.add(task)
        task.add_done_callback(self._voiding.discard)

    # holds -----------------------------------------------------------------------------------

    async def _take_one(self, item: HoldItem, tried: int = 0) -> Taken:
        """One hold on its own statement; ``tried``: attempts a batch made with it that may have
        committed (their replies lost)."""
        attempts = Attempts(tried)

        async def take(first: bool) -> asyncpg.Record:
            try:
                # a retry may follow a commit whose reply was lost: never fresh then
                return await self.pool.fetchrow(SQL_HOLD, *item.args(item.fresh and first))
            except asyncpg.UniqueViolationError:
                # the same id taken at the same moment by another attempt, which committed first
                row = await self.pool.fetchrow(SQL_HOLD_AGAIN, item.subject_id, item.hold_id)
                if row is None:
                    raise
                return row

        row = await attempts.run(self._retry, take)
        return row, attempts.count

    async def _take_batch(self, items: list[HoldItem]) -> list[Taken | BaseException]:
        if len(items) == 1 or not self.batched:
            return await _each(items, self._take_one)
        attempts = Attempts()

        async def take(first: bool) -> list[asyncpg.Record]:
            batch = batch_json([i.json(i.fresh and first) for i in items])
            return await self.pool.fetch(SQL_TAKE_BATCH, batch)

        try:
            rows = await attempts.run(self._retry, take)
        except ServiceUnavailable:
            return [ServiceUnavailable("the credit ledger is unavailable; try again") for _ in items]
        except asyncpg.UndefinedFunctionError:
            self._unbatched()
            return await _each(items, lambda i: self._take_one(i, attempts.count - 1))
        except Exception as exc:
            log.warning("ledger: a batch of %d holds failed (%s); taking them one by one", len(items), exc)
            # fresh only if no attempt of the batch can have committed (the last one failed)
            return [await _outcome(self._take_one(i, attempts.count - 1)) for i in items]
        by_index = {r["idx"]: r for r in rows}
        return [_answer(by_index.get(n), attempts.count) for n in range(len(items))]

    def _unbatched(self) -> None:
        if self.batched:
            log.warning(
                "ledger: credits.take_holds/resolve_holds are missing (migration 0014 not applied): "
                "holds and settlements go one per statement until the proxy restarts migrated"
            )
        self.batched = False

    # resolutions -----------------------------------------------------------------------------

    async def _resolve_one(self, item: ResolveItem, tried: int = 0) -> Resolved:
        attempts = Attempts(tried)

        async def resolve(first: bool) -> asyncpg.Record | None:
            return await self.pool.fetchrow(SQL_RESOLVE, *item.args())

        row = await attempts.run(self._retry, resolve)
        return row, attempts.count

    async def _resolve_batch(self, items: list[ResolveItem]) -> list[Resolved | BaseException]:
        if len(items) == 1 or not self.batched:
            return await _each(items, self._resolve_one)
        # a later resolution of a hold resolved earlier in the batch: it finds the hold ended,
        # whatever the attempt (the attempt count tells _resolve to look for a lost reply)
        seen: set[tuple[str, uuid.UUID]] = set()
        repeats: list[bool] = []
        for item in items:
            repeats.append((item.subject_id, item.hold_id) in seen)
            seen.add((item.subject_id, item.hold_id))
        attempts = Attempts()

        async def resolve(first: bool) -> list[asyncpg.Record]:
            return await self.pool.fetch(SQL_RESOLVE_BATCH, batch_json([i.json() for i in items]))

        try:
            rows = await attempts.run(self._retry, resolve)
        except ServiceUnavailable:
            return [ServiceUnavailable("the credit ledger is unavailable; try again") for _ in items]
        except asyncpg.UndefinedFunctionError:
            self._unbatched()
            tried_by = {
                id(i): 0 if repeat else attempts.count - 1 for i, repeat in zip(items, repeats, strict=True)
            }
            return await _each(items, lambda i: self._resolve_one(i, tried_by[id(i)]))
        except Exception as exc:
            log.warning("ledger: a batch of %d resolutions failed (%s); one by one", len(items), exc)
            tried = [0 if repeat else attempts.count - 1 for repeat in repeats]
            return [await _outcome(self._resolve_one(i, t)) for i, t in zip(items, tried, strict=True)]
        by_index = {r["idx"]: r for r in rows}
        return [(by_index.get(n), 1 if repeats[n] else attempts.count) for n in range(len(items))]


def _answer(row: asyncpg.Record | None, attempts: int) -> Taken | BaseException:
    if row is None:  # take_holds answers every item: a bug, for this item's caller only
        return RuntimeError("credits.take_holds returned no row for a hold")
    return row, attempts


async def _each(items: list[Item], op: Callable[[Item], Awaitable[T]]) -> list[T | BaseException]:
    """Items on their own statements: an account's one after another, in arrival order (so its
    holds are decided in that order, as in a batch), different accounts' side by side."""
    results: list[T | BaseException | None] = [None] * len(items)
    by_account: dict[str, list[int]] = {}
    for n, item in enumerate(items):
        by_account.setdefault(item.subject_id, []).append(n)

    async def run(indexes: list[int]) -> None:
        for n in indexes:
            results[n] = await _outcome(op(items[n]))

    if len(by_account) == 1:  # (a batch of one, mostly: no task for gather to make)
        await run(next(iter(by_account.values())))
    else:
        await asyncio.gather(*(run(indexes) for indexes in by_account.values()))
    return cast(list[T | BaseException], results)


async def _outcome(op: Awaitable[T]) -> T | BaseException:
    """The result, or the exception for the item's caller (a cancellation is not one)."""
    try:
        return await op
    except Exception as exc:
        return exc


__all__ = ["DEFAULT_BATCH_LANES", "DEFAULT_BATCH_SIZE", "HoldItem", "LedgerBatches", "ResolveItem"]
