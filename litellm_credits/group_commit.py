"""Group commit: callers submit items one at a time; one task sends them to the database in batches.

Natural batching: while no batch is in flight, the first item leaves at once (on the event loop's
next turn, with whatever was submitted in the same turn); items that arrive while a batch is in
flight wait for it to return and leave together in the next one, at most ``max_size`` at a time.
No timer, so an idle process adds no wait, and a busy one sends fuller batches.

Lanes: one batch in flight at a time runs on one database backend, one CPU of the server; items
can be spread over several lanes by a key (the account), each with its own batch in flight. Items
of one key stay in one lane, in order; batches of different lanes rarely share an account (when
they do, the second waits for the first's row locks, in the one lock order: no deadlock).

The batch function answers every item: a result, or the exception that item's caller gets. A
caller cancelled before its batch left is dropped from it; one cancelled later does not disturb
the batch (its item's result is thrown away). The drain task exists only while items are queued
or in flight, and belongs to the event loop of the first caller that found none running.

    >>> async def double(items: list[int]) -> list[int | BaseException]:
    ...     return [2 * i for i in items]
    >>> batcher = GroupCommit(double, max_size=64)
    >>> # await asyncio.gather(*(batcher.submit(i) for i in range(100)))  # 2 batches: 64, then 36
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from .errors import ServiceUnavailable

log = logging.getLogger("litellm_credits.group_commit")

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


class GroupCommit(Generic[I, R]):
    """Batches the items of concurrent callers for ``run``, one batch in flight per lane.

    With ``lanes`` > 1, ``key`` picks an item's lane (the same key, the same lane: its items keep
    their order), and the lanes' batches are in flight side by side.
    """

    def __init__(
        self,
        run: Callable[[list[I]], Awaitable[list[R | BaseException]]],
        *,
        max_size: int = 64,
        lanes: int = 1,
        key: Callable[[I], str] | None = None,
        on_batch: Callable[[int], None] | None = None,
        on_orphan: Callable[[I, R], None] | None = None,
    ) -> None:
        if max_size < 1 or lanes < 1:
            raise ValueError("max_size and lanes must be at least 1")
        if lanes > 1 and key is None:
            raise ValueError("lanes need a key")
        self.run = run
        self.max_size = max_size
        self.key = key
        self.on_batch = on_batch  # told each batch's size as it leaves
        # told an item's result when its caller was cancelled after the item left (what the
        # batch did for it is done, and nobody will read the answer)
        self.on_orphan = on_orphan
        self.batches = 0  # batches sent, and the items in them (for tests and benchmarks)
        self.items = 0
        self._queues: list[deque[tuple[I, asyncio.Future[R]]]] = [deque() for _ in range(lanes)]
        self._tasks: list[asyncio.Task[None] | None] = [None] * lanes
        self._closed = False

    def _lane(self, item: I) -> int:
        if self.key is None or len(self._queues) == 1:
            return 0
        return zlib.crc32(self.key(item).encode()) % len(self._queues)

    async def submit(self, item: I) -> R:
        """The item's result, once the batch it went in returned."""
        if self._closed:
            raise ServiceUnavailable("the credit ledger is shutting down; try again")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        lane = self._lane(item)
        self._queues[lane].append((item, future))
        task = self._tasks[lane]
        # (a drain task cancelled before its first step never ran its clean-up: replace it)
        if task is None or task.done():
            self._tasks[lane] = loop.create_task(self._drain(lane))
        return await future

    async def close(self) -> None:
        """Refuse new items and wait for the queued ones to be sent (then no task is left)."""
        self._closed = True
        for lane in range(len(self._tasks)):
            while (task := self._tasks[lane]) is not None:
                await asyncio.shield(task)

    @property
    def idle(self) -> bool:
        """No batch queued or in flight (no drain task left)."""
        return all(task is None for task in self._tasks)

    async def _drain(self, lane: int) -> None:
        queue = self._queues[lane]
        batch: list[tuple[I, asyncio.Future[R]]] = []
        try:
            while queue:
                batch = []
                while queue and len(batch) < self.max_size:
                    item, future = queue.popleft()
                    if not future.done():  # a caller cancelled before its batch left
                        batch.append((item, future))
                if not batch:
                    continue
                self.batches += 1
                self.items += len(batch)
                if self.on_batch is not None:
                    try:
                        self.on_batch(len(batch))
                    except Exception:  # a metric must never stop the ledger
                        log.exception("group commit: on_batch failed")
                try:
                    results = await self.run([item for item, _ in batch])
                    if len(results) != len(batch):
                        raise AssertionError(f"{len(results)} results for {len(batch)} items")
                except Exception as exc:  # run answers per item; this is a bug: fail the batch, go on
                    log.exception("group commit: a batch of %d failed", len(batch))
                    results = [exc] * len(batch)
                for (item, future), result in zip(batch, results, strict=True):
                    if future.done():  # its caller was cancelled meanwhile
                        if self.on_orphan is not None and not isinstance(result, BaseException):
                            try:
                                self.on_orphan(item, result)
                            except Exception:
                                log.exception("group commit: on_orphan failed")
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                batch = []
        finally:
            # cancelled (the loop is closing): nobody may wait for ever on what was not sent
            for _, future in (*batch, *queue):
                if not future.done():
                    future.set_exception(ServiceUnavailable("the credit ledger is shutting down; try again"))
            queue.clear()
            self._tasks[lane] = None


__all__ = ["GroupCommit"]
