"""The pipelined Redis connection of the request path, against a real redis-server."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError

from litellm_credits.redis_link import RedisDown, RedisLink
from litellm_credits.redis_wire import RedisWire, supports
from tests.redis_server import RedisServer

ECHO = "return {KEYS[1], ARGV[1]}"


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
async def wire(own_redis: RedisServer) -> AsyncIterator[RedisWire]:
    connection = RedisWire(own_redis.url)
    yield connection
    connection.close()


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


async def test_a_caller_that_gave_up_does_not_shift_the_replies_of_the_others(wire: RedisWire) -> None:
    await wire.execute("SET", "slow", "1")
    # DEBUG SLEEP holds the reply; the first caller stops waiting, its reply comes later
    late = asyncio.ensure_future(wire.execute("DEBUG", "SLEEP", "0.2"))
    await asyncio.sleep(0.05)
    late.cancel()
    after = await wire.execute("GET", "slow")
    assert after == b"1"  # not the sleeper's "OK"
    assert await wire.execute("ECHO", "next") == b"next"


async def test_error_replies_and_scripts_redis_lost(wire: RedisWire) -> None:
    with pytest.raises(ResponseError, match="unknown command"):
        await wire.execute("NOSUCHCOMMAND")
    assert await wire.script(ECHO, ["a"], ["b"]) == [b"a", b"b"]
    await wire.execute("SCRIPT", "FLUSH")
    assert await wire.script(ECHO, ["c"], ["d"]) == [b"c", b"d"]  # NOSCRIPT: loaded, sent again
    with pytest.raises(ResponseError):
        await wire.script("return redis.call('NOSUCHCOMMAND')", [], [])
    assert await wire.execute("PING") == b"PONG"  # the connection is still in step


async def test_redis_killed_fails_waiting_calls_and_a_restart_is_reconnected(
    wire: RedisWire, own_redis: RedisServer
) -> None:
    await wire.execute("SET", "k", "v")
    waiting = asyncio.ensure_future(wire.execute("DEBUG", "SLEEP", "5"))
    await asyncio.sleep(0.1)
    own_redis.stop()
    with pytest.raises(OSError):  # lost, then refused when sent again
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(OSError):  # refused while it is down
        await wire.execute("PING")
    own_redis.start()
    assert await wire.execute("PING") == b"PONG"


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


@pytest.mark.parametrize(
    "url",
    [
        "redis://h", "redis://h:6380", "redis://h:6379/0/", "redis://h/db1", "redis://u:p@h:1/3?db=5",
        "redis://h?password=x&username=y", "redis://h%2Dx/2", "redis://[::1]:6380/1", "redis://:p%40ss@h/4",
        "redis://h/0?socket_timeout=1",
    ],
)  # fmt: skip
def test_urls_are_read_as_redis_py_reads_them(url: str) -> None:
    wire, params = RedisWire(url), parse_url(url)
    assert (wire.host, wire.port, wire.db) == (params["host"], params.get("port", 6379), params.get("db", 0))
    assert (wire.username, wire.password) == (params.get("username"), params.get("password"))


async def silent_server(accepted: list[object], answer_after: float | None = None) -> asyncio.Server:
    """A TCP server that takes connections and never answers (or answers +OK after a while)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read(100)
        if answer_after is not None:
            await asyncio.sleep(answer_after)
            writer.write(b"+OK\r\n")
        await reader.read()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_a_handshake_that_gets_no_answer_is_given_up_and_tried_again() -> None:
    accepted: list[object] = []
    server = await silent_server(accepted)
    port = server.sockets[0].getsockname()[1]
    wire = RedisWire(f"redis://:secret@127.0.0.1:{port}/1", timeout=0.1)
    try:
        for attempt in (1, 2):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(wire.execute("PING"), 2)
            assert len(accepted) == attempt  # a new attempt each time, not the stuck one
    finally:
        wire.close()
        server.close()


async def test_closed_while_connecting_keeps_no_connection() -> None:
    accepted: list[object] = []
    server = await silent_server(accepted, answer_after=0.2)
    port = server.sockets[0].getsockname()[1]
    wire = RedisWire(f"redis://:secret@127.0.0.1:{port}/0", timeout=2)
    try:
        call = asyncio.ensure_future(wire.execute("PING"))
        await asyncio.sleep(0.1)
        wire.close()  # the link shuts down while AUTH waits for its answer
        with pytest.raises(RedisConnectionError):
            await call
        assert wire._protocol is None
    finally:
        wire.close()
        server.close()


async def test_an_error_reply_fails_only_its_own_call(own_redis: RedisServer) -> None:
    link = RedisLink(own_redis.url, timeout=0.5, retry_seconds=60)
    try:
        await link.script("return redis.call('SET', KEYS[1], 'text')", ["s"], [])
        wrong = asyncio.ensure_future(link.script("return redis.call('INCR', KEYS[1])", ["s"], []))
        fine = asyncio.ensure_future(link.script(ECHO, ["after"], ["it"]))  # right behind it
        connection = link.wire()._protocol  # type: ignore[union-attr]
        with pytest.raises(RedisDown):
            await wrong
        assert await fine == [b"after", b"it"]
        assert link.wire()._protocol is connection and not connection.closed  # type: ignore[union-attr]
    finally:
        await link.close()


async def test_a_connection_is_dropped_only_when_its_oldest_call_waited_too_long(
    own_redis: RedisServer,
) -> None:
    wire = RedisWire(own_redis.url)
    try:
        await wire.execute("PING")
        with redis.Redis.from_url(own_redis.url) as raw:
            raw.execute_command("CLIENT", "PAUSE", "300", "WRITE")
        held = asyncio.ensure_future(wire.script(ECHO, ["held"], [1]))
        await asyncio.sleep(0.1)
        assert not wire.close_if_stalled(1.0)  # waited 0.1 s of a 1 s timeout
        first = wire._protocol
        assert wire.close_if_stalled(0.05) and first is not None and first.closed
        assert await held == [b"held", b"1"]  # sent again on a new connection, after the pause
    finally:
        wire.close()


async def test_a_connection_the_server_dropped_is_redialled_without_an_outage(own_redis: RedisServer) -> None:
    link = RedisLink(own_redis.url, timeout=0.5, retry_seconds=60)
    try:
        assert await link.script(ECHO, ["a"], [1]) == [b"a", b"1"]
        with redis.Redis.from_url(own_redis.url) as raw:
            raw.execute_command("CLIENT", "PAUSE", "300", "WRITE")  # holds scripts, not CLIENT KILL
            waiting = asyncio.ensure_future(link.script(ECHO, ["c"], [3]))
            await asyncio.sleep(0.05)
            raw.client_kill_filter(_type="normal", skipme=True)  # while a call waits on it
            assert await waiting == [b"c", b"3"]  # sent again on a new connection
            raw.client_kill_filter(_type="normal", skipme=True)  # while idle
        assert await link.script(ECHO, ["b"], [2]) == [b"b", b"2"]
        assert link.healthy  # the breaker never opened
    finally:
        await link.close()


async def test_arguments_redis_cannot_take_are_a_redis_error(wire: RedisWire) -> None:
    with pytest.raises(DataError):
        await wire.execute("SET", "k", None)


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


async def stalled_then_answered(url: str) -> None:
    link = RedisLink(url, timeout=0.05, retry_seconds=60)
    try:
        # the first call opens the connection, and the process stalls while Redis accepts it (a
        # first request's imports, say)
        asyncio.get_running_loop().call_later(0, time.sleep, 0.3)
        assert await link.script(ECHO, ["a"], [1]) == [b"a", b"1"]
        # the whole process stalls (as in a GC pause) in the loop's next turn, just after the
        # command went out and before its reply is read, for longer than the 0.1 s deadline
        asyncio.get_running_loop().call_later(0, time.sleep, 0.3)
        assert await link.script(ECHO, ["b"], [2]) == [b"b", b"2"]
        assert link.healthy
        # a Redis that does not answer still times out
        with redis.Redis.from_url(url) as raw:
            raw.execute_command("CLIENT", "PAUSE", "400", "WRITE")
        started = time.monotonic()
        with pytest.raises(RedisDown):
            await link.script(ECHO, ["c"], [3])
        assert 0.09 < time.monotonic() - started < 0.3
    finally:
        await link.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_a_reply_that_came_while_the_process_stalled_is_not_a_timeout(
    own_redis: RedisServer, loop: str
) -> None:
    """A full garbage collection of LiteLLM's heap stops the process for up to half a second: the
    timer and the reply that came meanwhile are then due at once, and the reply must win (uvloop,
    which LiteLLM's proxy runs on, runs due timers before it polls the sockets)."""
    if loop == "asyncio":
        await stalled_then_answered(own_redis.url)
    else:
        uvloop = pytest.importorskip("uvloop")
        await asyncio.to_thread(uvloop.run, stalled_then_answered(own_redis.url))
