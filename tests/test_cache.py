"""The cache on a real Redis: hits, read-your-writes across instances, the stale-fill race, Redis
away (killed, or frozen so that calls time out) and back, and the in-process mode without Redis."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import redis.asyncio
from pydantic import ValidationError

from litellm_credits.cache import JSON_CODEC, LUA_INVALIDATE, Cache
from litellm_credits.metrics import metrics
from litellm_credits.money import parse_credits as c
from litellm_credits.records import UsageRecord
from litellm_credits.redis_link import Keys, RedisLink
from litellm_credits.runtime import ACCOUNT_CODEC, Runtime
from litellm_credits.settings import Settings

from .conftest import REDIS_PREFIX, AccountFactory
from .redis_server import RedisServer


class Source:
    """What the cache stands in front of: a value and a count of reads."""

    def __init__(self, value: object) -> None:
        self.value = value
        self.reads = 0

    async def load(self) -> object:
        self.reads += 1
        return self.value


@pytest.fixture
def prefix() -> str:
    return f"{REDIS_PREFIX}-cache-{secrets.token_hex(4)}"


@pytest.fixture
async def instances(redis_url: str, prefix: str) -> AsyncIterator[Callable[[], Cache]]:
    """Makes caches that behave as separate proxy instances on one Redis."""
    made: list[Cache] = []

    def make() -> Cache:
        made.append(Cache(RedisLink(redis_url, prefix=prefix, timeout=0.5, retry_seconds=0.2), ttl=60))
        return made[-1]

    yield make
    for cache in made:
        await cache.close()
        await cache.link.close()


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_hits_come_from_memory_then_redis_and_invalidation_reaches_every_instance(
    instances: Callable[[], Cache],
) -> None:
    a, b = instances(), instances()
    source = Source({"balance": 1})
    key = a.keys.account("acct-1")
    assert await a.get(key, source.load, JSON_CODEC) == {"balance": 1}
    await a.drain()  # Redis is filled behind the answer, giving the key a version
    assert await a.get(key, source.load, JSON_CODEC) == {"balance": 1}  # memory
    before = metrics["cache_hits_redis"]
    assert await b.get(key, source.load, JSON_CODEC) == {"balance": 1}  # Redis, filled by a
    assert metrics["cache_hits_redis"] == before + 1
    assert await b.get(key, source.load, JSON_CODEC) == {"balance": 1}  # b's memory now
    assert source.reads == 1

    source.value = {"balance": 2}
    await a.invalidate([key])  # a committed a change
    assert await a.get(key, source.load, JSON_CODEC) == {"balance": 2}
    # no message to wait for: b's memory entry is refused at b's next read (its version is stale)
    assert key in b._memory
    assert await b.get(key, source.load, JSON_CODEC) == {"balance": 2}


async def test_invalidation_reaches_a_redis_that_lost_its_scripts(
    instances: Callable[[], Cache], redis_url: str
) -> None:
    """Invalidations go as one EVALSHA per batch, without asking first whether Redis has the
    script: a Redis whose scripts were flushed (or that restarted) answers NOSCRIPT, and the batch
    is sent again with the script loaded."""
    a, b = instances(), instances()
    source = Source({"balance": 1})
    key = a.keys.account("acct-flushed")
    assert await b.get(key, source.load, JSON_CODEC) == {"balance": 1}
    await b.drain()
    await a.invalidate([key])  # the script is loaded now
    await b.get(key, source.load, JSON_CODEC)
    await b.drain()
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        await raw.script_flush()
        source.value = {"balance": 2}
        await a.invalidate([key])  # NOSCRIPT, loaded, sent again
        assert await raw.script_exists(hashlib.sha1(LUA_INVALIDATE.encode()).hexdigest()) == [True]
    finally:
        await raw.aclose()
    assert a.status()["invalidations_pending"] == 0  # not deferred: it reached Redis
    assert await b.get(key, source.load, JSON_CODEC) == {"balance": 2}  # b's entry refused


async def test_read_your_writes_across_instances_every_time(instances: Callable[[], Cache]) -> None:
    """Regression: a top-up through one instance was not always seen through the other at once
    (the other's memory answered before the pub/sub message about the write arrived). Now a read
    through b right after a write through a returns always sees it, with no waiting at all."""
    a, b = instances(), instances()
    key = a.keys.account("acct-ryw")
    source = Source(0)
    for value in range(1, 201):
        assert await b.get(key, source.load, JSON_CODEC) == value - 1  # b holds the old value
        source.value = value
        await a.invalidate([key])  # a's write returned
        assert await b.get(key, source.load, JSON_CODEC) == value
    hits = metrics["cache_hits_local"]
    assert await b.get(key, source.load, JSON_CODEC) == 200
    assert metrics["cache_hits_local"] == hits + 1  # memory still answers while nothing changed


async def test_an_expired_version_never_validates_an_old_entry(instances: Callable[[], Cache]) -> None:
    """Versions are random tokens: one that expired (or was evicted) and is set again cannot
    equal the version an old memory entry holds."""
    a, b = instances(), instances()
    key = a.keys.account("acct-aba")
    source = Source(1)
    assert await b.get(key, source.load, JSON_CODEC) == 1
    await a.link.call(lambda client: client.delete(a.keys.version(key)))  # expired, or evicted
    source.value = 2
    await a.invalidate([key])
    assert await b.get(key, source.load, JSON_CODEC) == 2


async def test_a_read_that_raced_an_invalidation_is_not_kept(instances: Callable[[], Cache]) -> None:
    """The reader loaded the old value; the writer committed and invalidated before the reader
    stored it. Neither this instance's memory nor Redis may keep the old value."""
    a, b = instances(), instances()
    key = a.keys.account("acct-race")
    loaded, release = asyncio.Event(), asyncio.Event()
    value = {"balance": 1}

    async def slow_old_read() -> object:
        old = dict(value)
        loaded.set()
        await release.wait()
        return old

    reader = asyncio.create_task(a.get(key, slow_old_read, JSON_CODEC))
    await loaded.wait()
    value["balance"] = 2
    await b.invalidate([key])  # the writer, on another instance
    release.set()
    assert await reader == {"balance": 1}  # the reader's own answer is what it read
    await a.drain()  # its fill of Redis, refused
    fresh = Source(dict(value))
    assert await a.get(key, fresh.load, JSON_CODEC) == {"balance": 2}
    assert await instances().get(key, fresh.load, JSON_CODEC) == {"balance": 2}


async def test_an_entry_dropped_from_memory_during_the_check_is_still_answered(
    instances: Callable[[], Cache],
) -> None:
    """Redis confirms the version memory held; meanwhile another request dropped the entry from
    memory (a flush after a Redis timeout, an invalidation, eviction). The read answers what
    Redis confirmed; it once raised KeyError, which LiteLLM's auth turned into a 500."""
    cache = instances()
    source = Source({"subject": "alice"})
    key = cache.keys.api_key(secrets.token_hex(32))
    assert await cache.get(key, source.load, JSON_CODEC, consistent=True) == source.value
    await until(lambda: key in cache._memory)  # filled behind the first answer
    check = cache.link.script  # this instance's own link

    async def racing(*args: object) -> object:
        found = await check(*args)  # type: ignore[arg-type]
        cache._memory.clear()  # what a concurrent request did while this one waited for Redis
        return found

    cache.link.script = racing  # type: ignore[method-assign]
    assert await cache.get(key, source.load, JSON_CODEC, consistent=True) == source.value
    assert source.reads == 1


async def test_without_redis_one_process_caches_and_invalidates() -> None:
    cache = Cache(RedisLink(None), ttl=60)
    source = Source("v1")
    key = Keys().account("solo")
    assert await cache.get(key, source.load, JSON_CODEC) == "v1"
    assert await cache.get(key, source.load, JSON_CODEC) == "v1"
    assert source.reads == 1
    source.value = "v2"
    await cache.invalidate([key])
    assert await cache.get(key, source.load, JSON_CODEC) == "v2"
    nothing = Source(None)
    assert await cache.get(Keys().account("nobody"), nothing.load, JSON_CODEC) is None
    assert await cache.get(Keys().account("nobody"), nothing.load, JSON_CODEC) is None
    assert nothing.reads == 2  # absence is not cached: an account created later is seen at once


def test_an_empty_redis_url_means_no_redis_an_empty_database_url_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``CREDITS_REDIS_URL=`` in a shell clears it: in-process, not a URL that fails at each use.
    An empty database URL is a deployment mistake, not a wish for a private embedded ledger."""
    monkeypatch.setenv("CREDITS_REDIS_URL", "")
    monkeypatch.delenv("CREDITS_DATABASE_URL", raising=False)
    assert Settings().redis_url is None
    monkeypatch.setenv("CREDITS_DATABASE_URL", " ")
    with pytest.raises(ValidationError, match="set but empty"):
        Settings()


async def test_short_ttl_expires() -> None:
    cache = Cache(RedisLink(None), ttl=0.05)
    source = Source(1)
    key = Keys().analytics("x")
    await cache.get(key, source.load, JSON_CODEC)
    await asyncio.sleep(0.1)
    await cache.get(key, source.load, JSON_CODEC)
    assert source.reads == 2


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


async def test_redis_killed_mid_run_then_started_again(own_redis: RedisServer, prefix: str) -> None:
    cache = Cache(RedisLink(own_redis.url, prefix=prefix, timeout=0.2, retry_seconds=0.1), ttl=60)
    try:
        source = Source(1)
        key = cache.keys.account("acct-down")
        await cache.get(key, source.load, JSON_CODEC)
        own_redis.stop()
        bypassed = metrics["cache_bypassed"]
        source.value = 2
        await cache.invalidate([key])  # a write while Redis is down
        for _ in range(3):
            assert await cache.get(key, source.load, JSON_CODEC) == 2  # served from the source
        assert metrics["cache_bypassed"] >= bypassed + 3
        assert cache.link.status()["healthy"] is False

        own_redis.start()
        await until(lambda: cache.status()["invalidations_pending"] == 0, timeout=10)  # replayed, unasked
        assert await cache.get(key, source.load, JSON_CODEC) == 2
        assert cache.link.status()["healthy"] is True
        await cache.drain()
        await cache.get(key, source.load, JSON_CODEC)
        await cache.drain()
        reads = source.reads
        assert await cache.get(key, source.load, JSON_CODEC) == 2
        assert source.reads == reads  # cached again
    finally:
        await cache.close()
        await cache.link.close()


async def test_invalidations_missed_while_redis_was_frozen_are_replayed(
    own_redis: RedisServer, prefix: str
) -> None:
    """Redis frozen (SIGSTOP: slow, not gone) keeps its data: a change made meanwhile must not
    leave the old entry there for other instances once it thaws."""
    assert own_redis.proc is not None
    link = RedisLink(own_redis.url, prefix=prefix, timeout=0.1, retry_seconds=0.1)
    writer = Cache(link, ttl=60)
    other = Cache(RedisLink(own_redis.url, prefix=prefix, timeout=0.5, retry_seconds=0.1), ttl=60)
    try:
        source = Source({"balance": 1})
        key = writer.keys.account("acct-frozen")
        await writer.get(key, source.load, JSON_CODEC)
        await writer.drain()  # now in Redis
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            source.value = {"balance": 2}
            deferred = metrics["cache_invalidations_deferred"]
            started = time.monotonic()
            await writer.invalidate([key])  # times out, and once more: kept for later
            # bounded by two attempts (the second after the breaker's pause), not hung
            assert time.monotonic() - started < 2 * link.timeout + link.retry_seconds + 1.0
            assert metrics["cache_invalidations_deferred"] == deferred + 1
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        assert await writer.get(key, source.load, JSON_CODEC) == {"balance": 2}  # around Redis
        await until(lambda: writer.status()["invalidations_pending"] == 0)  # replayed, unasked
        assert await other.get(key, source.load, JSON_CODEC) == {"balance": 2}
    finally:
        for cache in (writer, other):
            await cache.close()
            await cache.link.close()


async def test_account_reads_are_invalidated_by_the_ledger(runtime: Runtime, account: AccountFactory) -> None:
    """Every ledger write announces itself: a credit, a hold and its settlement."""
    subject = await account("10")
    ledger = await runtime.ledger()
    assert (await runtime.account(subject)).balance == c("10")  # type: ignore[union-attr]
    await ledger.credit(subject, c("5"))
    assert (await runtime.account(subject)).balance == c("15")  # type: ignore[union-attr]
    hold = await ledger.hold(subject, c("3"), ttl_seconds=60)
    await until(lambda: _held(runtime, subject, c("3")))  # announced without waiting
    await ledger.settle(subject, hold.id, c("2"), UsageRecord(cost=c("2")))
    await until(lambda: _held(runtime, subject, 0))
    assert (await runtime.account(subject)).balance == c("13")  # type: ignore[union-attr]


async def _held(runtime: Runtime, subject: str, amount: int) -> bool:
    account = await runtime.account(subject)
    return account is not None and account.held == amount


async def test_memory_does_not_answer_while_redis_cannot_confirm_it(
    own_redis: RedisServer, prefix: str
) -> None:
    """A partition or a frozen server resets no connection: memory must not answer for an entry
    whose version Redis cannot confirm (another instance may have changed it meanwhile)."""
    assert own_redis.proc is not None
    cache = Cache(RedisLink(own_redis.url, prefix=prefix, timeout=0.2, retry_seconds=0.2), ttl=60)
    try:
        source = Source(1)
        key = cache.keys.account("acct-silent")
        await cache.get(key, source.load, JSON_CODEC)
        await cache.drain()
        await cache.get(key, source.load, JSON_CODEC)
        assert source.reads == 1  # from memory, confirmed by Redis
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            source.value = 2  # changed meanwhile, through an instance Redis cannot tell us about
            started = time.monotonic()
            assert await cache.get(key, source.load, JSON_CODEC) == 2
            assert time.monotonic() - started < 1.0  # bounded by the Redis timeout
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
    finally:
        await cache.close()
        await cache.link.close()


async def test_looking_up_what_does_not_exist_leaves_nothing_in_redis(
    instances: Callable[[], Cache],
) -> None:
    """Regression (review): every read created a version for its key, so requests with made-up
    API keys (no authentication needed) each left a key in Redis for two minutes."""
    cache = instances()
    nothing = Source(None)
    for n in range(50):
        assert await cache.get(cache.keys.api_key(f"{n:064x}"), nothing.load, JSON_CODEC) is None
    await cache.drain()
    left = await cache.link.call(lambda client: client.keys(cache.keys.prefix + ":apikey:*"))
    assert left == []


async def test_an_unreadable_entry_is_a_miss(instances: Callable[[], Cache]) -> None:
    cache = instances()
    key = cache.keys.account("acct-garbled")
    await cache.link.call(lambda client: client.set(key, b"\xff not json"))
    source = Source({"balance": 3})
    assert await cache.get(key, source.load, ACCOUNT_CODEC) == {"balance": 3}
    assert source.reads == 1
