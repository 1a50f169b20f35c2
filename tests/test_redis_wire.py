"""The pipelined Redis connection of the request path, against a real redis-server."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from litellm_credits.redis_link import RedisDown, RedisLink
from litellm_credits.redis_wire import RedisWire, supports
from tests.redis_server import RedisServer

ECHO = "return {KEYS[1], ARGV[1]}"


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


async def test_concurrent_calls_share_one_connection_and_each_gets_its_own_reply(
    own_redis: RedisServer,
) -> None:
    wire = RedisWire(own_redis.url)
    try:
        n = 500
        replies = await asyncio.gather(*(wire.script(ECHO, [f"k{i}"], [i]) for i in range(n)))
        assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(n)]
        with redis.Redis.from_url(own_redis.url) as raw:
            others = [c for c in raw.client_list() if int(c["id"]) != raw.client_id()]
        assert len(others) == 1  # pipelined on one socket, no pool
    finally:
        wire.close()


async def test_a_caller_that_gave_up_does_not_shift_the_replies_of_the_others(own_redis: RedisServer) -> None:
    wire = RedisWire(own_redis.url)
    try:
        await wire.execute("SET", "slow", "1")
        # DEBUG SLEEP holds the reply; the first caller stops waiting, its reply comes later
        late = asyncio.ensure_future(wire.execute("DEBUG", "SLEEP", "0.2"))
        await asyncio.sleep(0.05)
        late.cancel()
        after = await wire.execute("GET", "slow")
        assert after == b"1"  # not the sleeper's "OK"
        assert await wire.execute("ECHO", "next") == b"next"
    finally:
        wire.close()


async def test_error_replies_and_scripts_redis_lost(own_redis: RedisServer) -> None:
    wire = RedisWire(own_redis.url)
    try:
        with pytest.raises(ResponseError, match="unknown command"):
            await wire.execute("NOSUCHCOMMAND")
        assert await wire.script(ECHO, ["a"], ["b"]) == [b"a", b"b"]
        await wire.execute("SCRIPT", "FLUSH")
        assert await wire.script(ECHO, ["c"], ["d"]) == [b"c", b"d"]  # NOSCRIPT: loaded, sent again
        with pytest.raises(ResponseError):
            await wire.script("return redis.call('NOSUCHCOMMAND')", [], [])
        assert await wire.execute("PING") == b"PONG"  # the connection is still in step
    finally:
        wire.close()


async def test_redis_killed_fails_waiting_calls_and_a_restart_is_reconnected(own_redis: RedisServer) -> None:
    wire = RedisWire(own_redis.url)
    try:
        await wire.execute("SET", "k", "v")
        waiting = asyncio.ensure_future(wire.execute("DEBUG", "SLEEP", "5"))
        await asyncio.sleep(0.1)
        own_redis.stop()
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(waiting, 5)
        with pytest.raises(OSError):  # refused while it is down
            await wire.execute("PING")
        own_redis.start()
        assert await wire.execute("PING") == b"PONG"
    finally:
        wire.close()


async def test_database_user_and_password_from_the_url(own_redis: RedisServer) -> None:
    password = secrets.token_urlsafe(12)
    with redis.Redis.from_url(own_redis.url) as raw:
        raw.execute_command("ACL", "SETUSER", "wire", "on", f">{password}", "~*", "+@all")
        raw.config_set("requirepass", password)
    base = f"127.0.0.1:{own_redis.port}"
    for url, db in ((f"redis://wire:{password}@{base}/3", 3), (f"redis://:{password}@{base}?db=2", 2)):
        wire = RedisWire(url)
        try:
            await wire.execute("SET", "where", url)
        finally:
            wire.close()
        with redis.Redis(port=own_redis.port, password=password, db=db) as raw:
            assert raw.get("where") == url.encode()
    with pytest.raises(ResponseError):
        await RedisWire(f"redis://wire:wrong@{base}/0").execute("PING")


def test_only_plain_redis_urls_take_the_wire() -> None:
    assert supports("redis://h:1/0")
    assert not supports("rediss://h:1/0") and not supports("unix:///tmp/redis.sock")
    with pytest.raises(ValueError):
        RedisWire("rediss://h:1/0")


async def test_the_link_runs_scripts_on_the_wire_or_on_redis_py(own_redis: RedisServer) -> None:
    link = RedisLink(own_redis.url, timeout=0.2, retry_seconds=0.1)
    assert link.wire() is not None
    assert await link.script(ECHO, ["x"], [1]) == [b"x", b"1"]
    await link.close()
    link = RedisLink(own_redis.url, timeout=0.2, retry_seconds=0.1)
    link._wire_ok = False  # as for a rediss:// or unix:// URL: redis-py's client
    assert link.wire() is None
    assert await link.script(ECHO, ["y"], [2]) == [b"y", b"2"]
    await link.close()


async def test_a_stalled_redis_opens_the_breaker_and_the_next_call_starts_a_new_connection(
    own_redis: RedisServer,
) -> None:
    link = RedisLink(own_redis.url, timeout=0.05, retry_seconds=0.05)
    try:
        assert await link.script(ECHO, ["a"], [1]) == [b"a", b"1"]
        first = link.wire()
        assert first is not None and first._protocol is not None
        with redis.Redis.from_url(own_redis.url) as raw:
            raw.execute_command("CLIENT", "PAUSE", "300", "ALL")
        with pytest.raises(RedisDown):
            await link.script(ECHO, ["b"], [2])
        assert first._protocol is None  # closed: its late reply can never be read as another's
        await asyncio.sleep(0.4)
        assert await link.script(ECHO, ["c"], [3]) == [b"c", b"3"]
    finally:
        await link.close()
