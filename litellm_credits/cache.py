"""Read caching for accounts, API keys and analytics: in this process, then Redis, then the source.

Two levels. This process keeps recent entries in memory (an LRU with a TTL); Redis keeps them
for every instance (``SET .. PX ttl``). A change to an account invalidates its entry *after the
transaction commits*, and before the write answers: here, and in Redis, where the entry is
deleted and the key's *version* is replaced by a new random token.

Read-your-writes across instances holds by construction: with Redis configured, a memory entry
is only used after Redis confirmed its version, in the one round trip that would otherwise have
fetched the entry (``LUA_READ``). So once a write through instance A has returned, a read through
instance B cannot answer from B's memory: the version it holds is no longer Redis's. Memory then
saves moving and decoding the value, not the round trip. Versions are random tokens, never
counters, so an expired or evicted version can never come back equal to one a memory entry holds
(a key with none gets a new one from the first fill; reads never write).

A reader that loaded an old value from PostgreSQL just before a writer committed must not put
it back after the writer's invalidation: a fill of Redis succeeds only if the version is still
the one the reader saw before it loaded (``LUA_FILL``), and a memory entry carries that same
version. Without Redis (``CREDITS_REDIS_URL`` unset) nothing tells a process of another's writes (a second
worker, the CLI), so values read with ``consistent=True`` (accounts, API keys) are not cached;
others (analytics) are kept in memory for their TTL, and an invalidation leaves a tombstone that
drops a fill which started before it.

With Redis down, reads go to PostgreSQL (counted as ``cache_bypassed``) and invalidations that
could not reach Redis are replayed before Redis is used again.

The balance hold never reads this cache: it is one atomic SQL statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

from .metrics import (
    CACHE_BYPASS,
    CACHE_HIT_LOCAL,
    CACHE_HIT_REDIS,
    CACHE_INVALIDATED,
    CACHE_INVALIDATION_DEFERRED,
    CACHE_MISS,
)
from .redis_link import RedisDown, RedisLink

log = logging.getLogger("litellm_credits.cache")

T = TypeVar("T")

# KEYS: entry, version. ARGV: the version this process's memory holds ('' for none). Returns
# {2, version} when memory is current, {1, version, entry, pttl} for a Redis hit, {0, version}
# for a miss; version '' when the key has none (reads never write: a lookup of a key that does
# not exist, such as a made-up API key, leaves nothing behind in Redis).
LUA_READ = """
local version = redis.call('GET', KEYS[2]) or ''
if ARGV[1] ~= '' and ARGV[1] == version then return {2, version} end
local value = redis.call('GET', KEYS[1])
if value then return {1, version, value, redis.call('PTTL', KEYS[1])} end
return {0, version}
"""
# KEYS: entry, version. ARGV: the version the reader saw before it loaded, the entry, its ttl ms,
# a new version (for a key that has none), the version's ttl ms. Returns the entry's version, or
# '' when a change came in meanwhile (nothing is stored).
LUA_FILL = """
local version = redis.call('GET', KEYS[2]) or ''
if version ~= ARGV[1] then return '' end
if version == '' then
    version = ARGV[4]
    redis.call('SET', KEYS[2], version, 'PX', ARGV[5])
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return version
"""
# KEYS: entry, version, entry, version ...; ARGV: version ttl ms, the new version. One call per
# batch: a command per key cost the proxy more CPU (packing and parsing in redis-py) than the rest
# of the invalidation (on a Redis Cluster, a batch would have to be split by hash slot)
LUA_INVALIDATE = """
for i = 1, #KEYS, 2 do
    redis.call('DEL', KEYS[i])
    redis.call('SET', KEYS[i + 1], ARGV[2], 'PX', ARGV[1])
end
return #KEYS / 2
"""
# keys per script call when invalidations are sent in batches (Redis runs nothing else meanwhile)
BATCH = 500
# a fill that took longer than this is not kept (tombstones are pruned after it)
MAX_READ_SECONDS = 30.0
# background fills of Redis at once, per process (a burst of misses must not drain the pool)
MAX_FILLS = 8


def _new_version() -> str:
    return secrets.token_hex(8)


@dataclass
class _Queue:
    """Invalidations waiting for this event loop's sender, and the future of their batch."""

    keys: set[str] = field(default_factory=set)
    sent: asyncio.Future[None] | None = None
    sender: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class Codec(Generic[T]):
    """How a cached value is written to Redis and read back."""

    dump: Callable[[T], str]
    load: Callable[[str], T]


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):  # sums from SQL: whole numbers stay numbers, the rest exact text
        return int(value) if value == value.to_integral_value() else str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not cacheable as JSON")


JSON_CODEC: Codec[Any] = Codec(
    lambda v: json.dumps(v, separators=(",", ":"), default=_json_default), json.loads
)


class Cache:
    """Cached reads with invalidation across instances; see the module docstring."""

    def __init__(self, link: RedisLink, *, ttl: float = 60.0, max_entries: int = 100_000) -> None:
        self.link = link
        self.keys = link.keys
        self.ttl = ttl
        self.max_entries = max_entries
        # key -> (expires at, Redis version it was read under ('' without Redis), value)
        self._memory: OrderedDict[str, tuple[float, str, Any]] = OrderedDict()
        self._seq = 0  # counts invalidation events
        self._tombstones: dict[str, tuple[int, float]] = {}  # key -> (seq, monotonic time)
        self._prune_at = 10_000
        self._flushed_seq = 0  # seq of the last "forget everything" (Redis failed, or closed)
        # invalidations Redis has not seen yet: key -> times deferred (a replay in flight removes
        # a key only if it was not deferred again meanwhile)
        self._pending: dict[str, int] = {}
        self._replayer: asyncio.Task[None] | None = None
        self._fills = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._queues: dict[asyncio.AbstractEventLoop, _Queue] = {}  # invalidations to send

    # reads -------------------------------------------------------------------------------

    async def get(
        self,
        key: str,
        load: Callable[[], Awaitable[T | None]],
        codec: Codec[T],
        *,
        ttl: float | None = None,
        consistent: bool = False,
    ) -> T | None:
        """The value at ``key``: from memory, Redis, or ``load()`` (whose ``None`` is not kept).

        ``consistent``: the answer must reflect every write that returned before this read, made
        by any process (another worker, the CLI). With Redis that is always so; without it, no
        process can know of another's writes, so such a value is not cached at all.
        """
        ttl = self.ttl if ttl is None else ttl
        if ttl <= 0 or (consistent and not self.link.configured):
            return await load()
        start, started = self._seq, time.monotonic()
        entry = self._memory.get(key)
        if entry is not None and entry[0] <= started:
            del self._memory[key]
            entry = None
        if not self.link.configured:
            if entry is not None:
                self._memory.move_to_end(key)
                CACHE_HIT_LOCAL.inc()
                return entry[2]  # type: ignore[no-any-return]
            value = await load()
            CACHE_MISS.inc()
            if value is not None:
                self._remember(key, "", value, ttl, start, started)
            return value
        if self._pending:  # Redis may hold entries this process changed: not until replayed
            self._start_replay()
            CACHE_BYPASS.inc()
            return await load()
        try:
            found = await self.link.script(
                LUA_READ, [key, self.keys.version(key)], [entry[1] if entry is not None else ""]
            )
        except RedisDown:
            # what memory holds cannot be checked, now or (changes made meanwhile) afterwards
            self._flush_memory()
            CACHE_BYPASS.inc()
            return await load()
        kind, version = int(found[0]), _text(found[1])
        if kind == 2 and entry is not None:  # Redis confirmed the version memory held
            if self._memory.get(key) is entry:  # (others may have dropped it while Redis answered)
                self._memory.move_to_end(key)
            CACHE_HIT_LOCAL.inc()
            return entry[2]  # type: ignore[no-any-return]
        if kind == 1:
            try:
                value = codec.load(_text(found[2]))
            except (ValueError, TypeError, KeyError):  # corrupt, or another version's format
                log.warning("litellm-credits: unreadable cache entry %s; reading the source", key)
                CACHE_BYPASS.inc()
                return await load()
            CACHE_HIT_REDIS.inc()
            if version:  # an entry whose version expired or was evicted is not kept here
                remaining = int(found[3]) / 1000 if int(found[3]) > 0 else ttl
                self._remember(key, version, value, min(ttl, remaining), start, started)
            return value
        CACHE_MISS.inc()
        value = await load()
        if value is None:
            return None
        if version:
            self._remember(key, version, value, ttl, start, started)
        if self._fills < MAX_FILLS and time.monotonic() - started <= MAX_READ_SECONDS:
            # Redis is filled behind the answer (a round trip saved on every miss); the version
            # check refuses the fill if a change came in meanwhile, and a key that had no version
            # gets one then, and this process's entry with it. Fills beyond MAX_FILLS are
            # skipped, not queued.
            self._fills += 1
            args = [version, codec.dump(value), max(1, int(ttl * 1000)), _new_version(), self._version_ttl_ms]
            fill = self.link.script(LUA_FILL, [key, self.keys.version(key)], args)
            remember = None if version else (key, value, ttl, start, started)
            task = asyncio.get_running_loop().create_task(self._fill(fill, remember))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return value

    @property
    def _version_ttl_ms(self) -> int:
        # longer than any entry lives, so an entry never outlives the version it was read under
        return int(max(self.ttl * 2, 60) * 1000)

    async def _fill(self, op: Awaitable[Any], remember: tuple[str, Any, float, int, float] | None) -> None:
        try:
            with contextlib.suppress(RedisDown):
                version = _text(await op)
                if version and remember is not None:
                    key, value, ttl, start, started = remember
                    self._remember(key, version, value, ttl, start, started)
        finally:
            self._fills -= 1

    def _remember(self, key: str, version: str, value: Any, ttl: float, start: int, started: float) -> None:
        if self._flushed_seq > start:
            return
        tomb = self._tombstones.get(key)
        if (tomb is not None and tomb[0] > start) or time.monotonic() - started > MAX_READ_SECONDS:
            return  # invalidated while it was being read
        self._memory[key] = (started + ttl, version, value)
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)

    # invalidation ------------------------------------------------------------------------

    async def invalidate(self, keys: Iterable[str]) -> None:
        """Forget ``keys`` here and in Redis, so that no instance answers from what it had (call
        after the commit); returns once Redis has them.

        If Redis did not take them (a timeout, an open circuit breaker), they are replayed, and
        this waits for one more attempt: a blip here must not let another instance, which may
        reach Redis well, answer with the old value after this write has returned. If Redis is
        still away after that, so it is for the others too, and their reads go around it.
        """
        keys = list(keys)
        sent = self.invalidate_soon(keys)
        if sent is None:
            return
        await sent
        deadline = time.monotonic() + self.link.retry_seconds + 2 * self.link.timeout + 0.5
        # polled: the replay may run on another event loop than this caller's, and this is rare
        while any(k in self._pending for k in keys) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if any(k in self._pending for k in keys):
            log.warning(
                "litellm-credits: a change did not reach Redis in time; instances that still reach "
                "it may show the old value until it is replayed"
            )

    def invalidate_soon(self, keys: Iterable[str]) -> asyncio.Future[None] | None:
        """Invalidate without waiting for Redis (the local part happens now); for the request
        path: holds and settlements. Returns the batch's future (None without Redis)."""
        keys = list(keys)
        self._forget(keys)
        CACHE_INVALIDATED.inc(len(keys))
        return self._enqueue(keys) if self.link.configured else None

    def _enqueue(self, keys: list[str]) -> asyncio.Future[None]:
        """Add ``keys`` to the next batch, which one task per event loop sends: a thousand writes a
        second make a few pipelines, not a thousand concurrent calls."""
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = _Queue()
        queue.keys.update(keys)
        if queue.sent is None:
            queue.sent = loop.create_future()
        sent = queue.sent
        if queue.sender is None or queue.sender.done():
            queue.sender = loop.create_task(self._send_batches(queue))
            self._tasks.add(queue.sender)
            queue.sender.add_done_callback(self._tasks.discard)
        return sent

    async def _send_batches(self, queue: _Queue) -> None:
        while queue.keys:
            keys, queue.keys = list(queue.keys), set()
            sent, queue.sent = queue.sent, None
            try:
                for start in range(0, len(keys), BATCH):
                    await self._invalidate_in_redis(keys[start : start + BATCH])
            except RedisDown:
                self._defer(keys)
            finally:
                if sent is not None and not sent.done():
                    sent.set_result(None)

    def _forget(self, keys: Iterable[str]) -> None:
        now = time.monotonic()
        for key in keys:
            self._seq += 1
            self._tombstones[key] = (self._seq, now)
            self._memory.pop(key, None)
        if len(self._tombstones) > self._prune_at:  # amortised: the threshold follows the size
            horizon = now - MAX_READ_SECONDS
            self._tombstones = {k: v for k, v in self._tombstones.items() if v[1] >= horizon}
            self._prune_at = max(10_000, 2 * len(self._tombstones))

    def _flush_memory(self) -> None:
        self._seq += 1
        self._flushed_seq = self._seq
        self._memory.clear()

    async def _invalidate_in_redis(self, keys: list[str]) -> None:
        version_ttl, version = self._version_ttl_ms, _new_version()
        names = [name for key in keys for name in (key, self.keys.version(key))]
        await self.link.script(LUA_INVALIDATE, names, [version_ttl, version])

    def _defer(self, keys: list[str]) -> None:
        """Keep invalidations Redis did not take, and replay them in the background; until then
        this process reads around Redis (it may hold entries these keys name)."""
        for key in keys:
            self._pending[key] = self._pending.get(key, 0) + 1
        CACHE_INVALIDATION_DEFERRED.inc(len(keys))
        self._start_replay()

    def _start_replay(self) -> None:
        if self._replayer is None or self._replayer.done():
            self._replayer = asyncio.get_running_loop().create_task(self._replay())
            self._tasks.add(self._replayer)
            self._replayer.add_done_callback(self._tasks.discard)

    async def _replay(self) -> None:
        """One task per process: send the deferred invalidations once Redis answers again."""
        while self._pending:
            snapshot = dict(self._pending)
            keys = list(snapshot)
            try:
                for start in range(0, len(keys), BATCH):
                    chunk = keys[start : start + BATCH]
                    await self._invalidate_in_redis(chunk)
                    for key in chunk:
                        if self._pending.get(key) == snapshot[key]:
                            del self._pending[key]
            except RedisDown:
                await asyncio.sleep(self.link.retry_seconds)
                continue
            log.info("litellm-credits: replayed %d cache invalidations Redis had missed", len(keys))

    # Redis plumbing ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "entries_in_memory": len(self._memory),
            # with Redis, memory answers only for entries whose version Redis confirms at each read
            "memory_checked_against_redis": self.link.configured,
            "invalidations_pending": len(self._pending),
            "ttl_seconds": self.ttl,
        }

    async def drain(self) -> None:
        """Wait for the background work started so far (fills, batches of invalidations; not the
        replay of invalidations, which waits for Redis to come back)."""
        while others := [t for t in self._tasks if t is not self._replayer]:
            await asyncio.gather(*others, return_exceptions=True)

    async def close(self) -> None:
        """Send what is queued (one attempt for deferred ones), and forget everything."""
        await self.drain()
        if self._replayer is not None and not self._replayer.done():
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
        if self._pending:
            keys, self._pending = list(self._pending), {}
            try:
                for start in range(0, len(keys), BATCH):  # (a script blocks Redis while it runs)
                    await self._invalidate_in_redis(keys[start : start + BATCH])
            except RedisDown:
                log.warning(
                    "litellm-credits: %d cache invalidations never reached Redis; other instances "
                    "may show those accounts' old values for up to %s s",
                    len(keys),
                    self.ttl,
                )
        self._flush_memory()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["JSON_CODEC", "Cache", "Codec"]
