"""Read caching for accounts, API keys and analytics: in this process, then Redis, then the source.

Two levels. This process keeps recent entries in memory (an LRU with a TTL); Redis keeps them
for every instance (``SET .. PX ttl``). A change to an account invalidates its entry *after the
transaction commits*: here, in Redis, and, through a Redis pub/sub message, in the memory of every
other instance. So a top-up through one proxy is visible through another at once, not after the
TTL.

Two races are closed explicitly:

- A reader that loaded an old value from PostgreSQL just before a writer committed must not put
  it back after the writer's invalidation. In Redis, every entry has a version counter that an
  invalidation increments; a fill succeeds only if the version is the one the reader saw before
  it loaded (one Lua script). In memory, an invalidation leaves a tombstone with a sequence
  number, and a fill that started before it is dropped.
- Memory entries are trusted only while this process is subscribed to the invalidation channel.
  When the subscription is lost (Redis down), memory is cleared and bypassed until it is back.

Without Redis (``CREDITS_REDIS_URL`` unset) the memory level alone serves a single instance. With
Redis down, reads go to PostgreSQL (counted as ``cache_bypassed``) and invalidations that could
not reach Redis are replayed before Redis is trusted again.

The balance hold never reads this cache: it is one atomic SQL statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

from redis.exceptions import RedisError

from .metrics import metrics
from .redis_link import RedisDown, RedisLink

log = logging.getLogger("litellm_credits.cache")

T = TypeVar("T")

# the entry, or (when absent) the version a fill must still find
LUA_READ = """
local value = redis.call('GET', KEYS[1])
if value then return {1, value, redis.call('PTTL', KEYS[1])} end
return {0, redis.call('GET', KEYS[2]) or ''}
"""
LUA_FILL = """
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
# KEYS: entry, version (one account: one hash slot); ARGV: version ttl ms. The batch's PUBLISH
# follows in the same pipeline, so subscribers hear of it after the entries are gone.
LUA_INVALIDATE = """
redis.call('DEL', KEYS[1])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""
# keys per pipeline when invalidations are sent in batches
BATCH = 500
# a fill that took longer than this is not kept (tombstones are pruned after it)
MAX_READ_SECONDS = 30.0
# the subscription pings this often; memory is trusted only while Redis answered recently, so a
# connection that went silent (a partition, a frozen server) cannot leave stale entries in use
PING_SECONDS = 1.0
SILENT_AFTER = 3.0
# background fills of Redis at once, per process (a burst of misses must not drain the pool)
MAX_FILLS = 8


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
        self._memory: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._seq = 0  # counts invalidation events
        self._tombstones: dict[str, tuple[int, float]] = {}  # key -> (seq, monotonic time)
        self._prune_at = 10_000
        self._flushed_seq = 0  # seq of the last "forget everything" (subscription lost or made)
        # invalidations Redis has not seen yet: key -> times deferred (a replay in flight removes
        # a key only if it was not deferred again meanwhile)
        self._pending: dict[str, int] = {}
        self._listeners: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}
        self._subscribed = not link.configured  # memory is trusted only while true (and heard)
        self._heard = 0.0  # monotonic time of the subscription's last message or pong
        self._replayer: asyncio.Task[None] | None = None
        self._fills = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._queues: dict[asyncio.AbstractEventLoop, _Queue] = {}  # invalidations to send
        self._scripts: dict[str, Any] = {}

    # reads -------------------------------------------------------------------------------

    async def get(
        self,
        key: str,
        load: Callable[[], Awaitable[T | None]],
        codec: Codec[T],
        *,
        ttl: float | None = None,
    ) -> T | None:
        """The value at ``key``: from memory, Redis, or ``load()`` (whose ``None`` is not kept)."""
        ttl = self.ttl if ttl is None else ttl
        if ttl <= 0:
            return await load()
        self._ensure_listening()
        start, started = self._seq, time.monotonic()
        if self._trusted(started):
            entry = self._memory.get(key)
            if entry is not None:
                if entry[0] > started:
                    self._memory.move_to_end(key)
                    metrics.incr("cache_hits_local")
                    return entry[1]  # type: ignore[no-any-return]
                del self._memory[key]
        if not self.link.configured:
            value = await load()
            metrics.incr("cache_misses")
            if value is not None:
                self._remember(key, value, ttl, start, started)
            return value
        if self._pending:  # Redis may hold entries this process changed: not until replayed
            self._start_replay()
            metrics.incr("cache_bypassed")
            return await load()
        try:
            found = await self._script(LUA_READ, [key, self.keys.version(key)], [])
        except RedisDown:
            metrics.incr("cache_bypassed")
            return await load()
        if found[0] == 1:
            try:
                value = codec.load(_text(found[1]))
            except (ValueError, TypeError, KeyError):  # corrupt, or another version's format
                log.warning("litellm-credits: unreadable cache entry %s; reading the source", key)
                metrics.incr("cache_bypassed")
                return await load()
            metrics.incr("cache_hits_redis")
            remaining = int(found[2]) / 1000 if int(found[2]) > 0 else ttl
            self._remember(key, value, min(ttl, remaining), start, started)
            return value
        metrics.incr("cache_misses")
        value = await load()
        if value is None:
            return None
        self._remember(key, value, ttl, start, started)
        if self._fills < MAX_FILLS and time.monotonic() - started <= MAX_READ_SECONDS:
            # Redis is filled behind the answer (a round trip saved on every miss); the version
            # check refuses the fill if a change came in meanwhile, and that change's message (or
            # tombstone) drops the memory entry. Fills beyond MAX_FILLS are skipped, not queued.
            self._fills += 1
            fill = self._script(
                LUA_FILL,
                [key, self.keys.version(key)],
                [_text(found[1]), codec.dump(value), max(1, int(ttl * 1000))],
            )
            task = asyncio.get_running_loop().create_task(self._fill(fill))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return value

    async def _fill(self, op: Awaitable[Any]) -> None:
        try:
            with contextlib.suppress(RedisDown):
                await op
        finally:
            self._fills -= 1

    def _trusted(self, now: float) -> bool:
        """Memory may answer: subscribed (or no Redis at all), and Redis was heard recently."""
        if not self.link.configured:
            return True
        return self._subscribed and now - self._heard < SILENT_AFTER

    def _remember(self, key: str, value: Any, ttl: float, start: int, started: float) -> None:
        if not self._trusted(started) or self._flushed_seq > start:
            return
        tomb = self._tombstones.get(key)
        if (tomb is not None and tomb[0] > start) or time.monotonic() - started > MAX_READ_SECONDS:
            return  # invalidated while it was being read
        self._memory[key] = (started + ttl, value)
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)

    # invalidation ------------------------------------------------------------------------

    async def invalidate(self, keys: Iterable[str]) -> None:
        """Forget ``keys`` here, in Redis and in every other instance (call after the commit);
        returns once Redis has them (or they are kept to replay, if it is away)."""
        sent = self.invalidate_soon(keys)
        if sent is not None:
            await sent

    def invalidate_soon(self, keys: Iterable[str]) -> asyncio.Future[None] | None:
        """Invalidate without waiting for Redis (the local part happens now); for the request
        path: holds and settlements. Returns the batch's future (None without Redis)."""
        keys = list(keys)
        self._forget(keys)
        metrics.incr("cache_invalidations", len(keys))
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
        version_ttl = int(max(self.ttl * 2, 60) * 1000)

        async def run(client: Any) -> None:
            script = self._registered(LUA_INVALIDATE, client)
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    await script(keys=[key, self.keys.version(key)], args=[version_ttl], client=pipe)
                pipe.publish(self.keys.invalidations, "\n".join(keys))
                await pipe.execute()

        await self.link.call(run)

    def _defer(self, keys: list[str]) -> None:
        """Keep invalidations Redis did not take, and replay them in the background; until then
        this process reads around Redis (it may hold entries these keys name)."""
        for key in keys:
            self._pending[key] = self._pending.get(key, 0) + 1
        metrics.incr("cache_invalidations_deferred", len(keys))
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

    def _registered(self, lua: str, client: Any) -> Any:
        script = self._scripts.get(lua)
        if script is None:
            script = self._scripts[lua] = client.register_script(lua)
        return script

    async def _script(self, lua: str, keys: list[str], args: list[Any]) -> Any:
        async def run(client: Any) -> Any:
            return await self._registered(lua, client)(keys=keys, args=args, client=client)

        return await self.link.call(run)

    def _ensure_listening(self) -> None:
        if not self.link.configured:
            return
        loop = asyncio.get_running_loop()
        task = self._listeners.get(loop)
        if task is None or task.done():
            self._listeners[loop] = loop.create_task(self._listen())

    async def _listen(self) -> None:
        """Drop entries other instances invalidate; trust memory only while subscribed."""
        delay = 0.1
        me = asyncio.current_task()
        while me is None or not me.cancelling():
            client = self.link.pubsub_client()
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.keys.invalidations)
                confirmed = await pubsub.get_message(timeout=max(self.link.timeout, 1.0))
                if confirmed is None or confirmed.get("type") != "subscribe":
                    raise TimeoutError("no confirmation of the subscription")
                # anything may have changed while not subscribed: start from empty memory
                self._flush_memory()
                self._heard = time.monotonic()
                self._subscribed = True
                delay = 0.1
                pinged = 0.0
                while True:
                    # redis-py's timed reads can swallow a cancellation (it turns into their
                    # timeout): look for it here too, or close() would wait forever
                    if me is not None and me.cancelling():
                        raise asyncio.CancelledError
                    now = time.monotonic()
                    if now - self._heard > SILENT_AFTER:
                        raise TimeoutError("the subscription went silent")
                    if now - pinged >= PING_SECONDS:
                        await asyncio.wait_for(pubsub.ping(), self.link.timeout)
                        pinged = now
                    message = await pubsub.get_message(timeout=PING_SECONDS / 2)
                    if message is None:
                        continue
                    self._heard = time.monotonic()
                    if message.get("type") == "message":
                        self._forget(_text(message["data"]).split("\n"))
            except asyncio.CancelledError:
                self._subscribed = False
                raise
            except Exception as exc:  # Redis gone, silent, or a message we could not read
                if self._subscribed:
                    self._subscribed = False
                    self._flush_memory()
                    if isinstance(exc, RedisError | OSError):
                        self.link.failed(exc)
                    else:
                        log.warning("litellm-credits: cache subscription lost (%s)", exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        self._subscribed = False

    def status(self) -> dict[str, Any]:
        return {
            "entries_in_memory": len(self._memory),
            "memory_trusted": self._trusted(time.monotonic()),
            "invalidations_pending": len(self._pending),
            "ttl_seconds": self.ttl,
        }

    async def drain(self) -> None:
        """Wait for the background work started so far (fills, batches of invalidations; not the
        replay of invalidations, which waits for Redis to come back)."""
        while others := [t for t in self._tasks if t is not self._replayer]:
            await asyncio.gather(*others, return_exceptions=True)

    async def close(self) -> None:
        """Stop this loop's subscriber; send what is queued (one attempt for deferred ones)."""
        task = self._listeners.pop(asyncio.get_running_loop(), None)
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=5)
        await self.drain()
        if self._replayer is not None and not self._replayer.done():
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
        if self._pending:
            keys, self._pending = list(self._pending), {}
            try:
                await self._invalidate_in_redis(keys)
            except RedisDown:
                log.warning(
                    "litellm-credits: %d cache invalidations never reached Redis; other instances "
                    "may show those accounts' old values for up to %s s",
                    len(keys),
                    self.ttl,
                )
        self._subscribed = not self.link.configured
        self._flush_memory()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["JSON_CODEC", "Cache", "Codec"]
