"""A lean Redis connection for the request path: commands pipelined on one socket per event loop.

Every proxied request runs a few Redis scripts (the API key's owner, the cache invalidations
after its hold and its settlement). Through redis-py's asyncio client each command takes a pool
connection under a lock and a timeout, wraps the write in ``wait_for`` (a task per command),
goes through its retry and observability layers, and packs its arguments in Python: a quarter
of the plugin's CPU per request (profiled on the hooks' path with real servers; replacing it cut
that path's instructions per request by 17 %, bench/RESULTS.md). Here a command is packed by
hiredis (C), written at once, and answered in its turn (Redis answers a connection's commands in
the order they came), so concurrent callers share one socket without waiting for each other: no
pool, no lock, no task per call.

Only what the request path needs: ``execute`` and ``script`` (EVALSHA, loading the script when
Redis answers NOSCRIPT) on a plain ``redis://`` URL (host, port, database, user and password).
Everything else, and every other URL (TLS, Unix sockets, Sentinel), goes through redis-py
(``RedisLink.client``). The URL is read by redis-py's parser. Opening a connection (connect,
AUTH, SELECT) is bounded by ``timeout``, each reply by the timeout its caller passes; the caller
(``RedisLink``, with its circuit breaker) drops a connection whose oldest call waited past its
timeout. A call whose connection was lost under it is sent once more on a new one (as redis-py's
retry did); a second loss raises redis-py's ``ConnectionError``, an error reply its
``ResponseError``, so callers handle both as they do redis-py's.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError

# how much longer opening a connection is looked at after its timeout (see RedisWire._open)
CONNECT_GRACE = 0.05


def _expire(future: asyncio.Future[Any]) -> None:
    """A reply's time is up: fail its call, unless the reply came. The timer looks at the reply
    itself: a process stalled longer than the timeout (a full garbage collection of LiteLLM's heap
    takes up to half a second) finds the timer and the reply that arrived during the stall due
    together, and the reply wins. (A deadline that cancels the caller's task, asyncio.timeout or
    wait_for, cancelled it even with the reply in: 20 of 20 calls across a 0.3 s stall failed and
    opened the breaker, on asyncio's loop and on uvloop; none do now.)"""
    if not future.done():
        future.set_exception(TimeoutError("no reply from Redis in time"))


def _pack(*args: Any) -> bytes:
    """A command in Redis's wire format (bytes, str, int and float arguments)."""
    try:
        return hiredis.pack_command(args)  # type: ignore[arg-type]  # its stub says a 1-tuple
    except TypeError as exc:  # (redis-py raised DataError for such arguments)
        raise DataError(str(exc)) from None


class _Lost(RedisConnectionError):
    """The connection closed under a call (the server went, or it was dropped here)."""


def supports(url: str) -> bool:
    """Whether a URL is one this connection speaks to (``redis://``, TCP, no TLS)."""
    return urlsplit(url).scheme == "redis"


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        # the calls sent and not answered yet, in order, with when each was sent
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                future, _ = self.waiting.popleft()
                if not future.done():  # (its caller may have given up: the reply is dropped)
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError):  # garbage, or a reply nobody asked for
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(_Lost("connection to Redis lost"))

    def send(self, future: asyncio.Future[Any], command: bytes) -> None:
        if self.closed or self.transport is None:
            raise _Lost("connection to Redis closed")
        self.waiting.append((future, time.monotonic()))
        self.transport.write(command)

    def stalled(self, seconds: float) -> bool:
        """Whether the oldest call waiting has waited longer than ``seconds``."""
        return bool(self.waiting) and time.monotonic() - self.waiting[0][1] > seconds

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class RedisWire:
    """One pipelined connection to the Redis at ``url``, opened on first use and after a loss.

    ``timeout`` bounds opening a connection (connect, AUTH, SELECT), as redis-py's
    ``socket_connect_timeout`` did; a call's wait for its reply is bounded by the ``timeout`` it
    is given."""

    def __init__(self, url: str, *, timeout: float = 0.25) -> None:
        if not supports(url):
            raise ValueError(f"RedisWire speaks redis:// only: {url.split(':', 1)[0]}://")
        params = parse_url(url)  # redis-py's own reading of the URL: the same server and database
        self.host = params.get("host") or "localhost"
        self.port = int(params.get("port") or 6379)
        self.username = params.get("username")
        self.password = params.get("password")
        self.db = int(params.get("db") or 0)
        self.timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._generation = 0  # counts close(): a connection opened across one is not kept
        self._shas: dict[str, str] = {}

    async def execute(self, *args: Any, timeout: float | None = None) -> Any:
        """Send one command; its reply (an error reply raises ``ResponseError``). A call whose
        connection was lost under it is sent once more on a new one (as redis-py's retry did:
        a Redis restarted or a connection killed by the server is not an outage). ``timeout``
        bounds the wait for each reply (``TimeoutError``)."""
        command = _pack(*args)
        for attempt in range(2):
            protocol = self._protocol
            if protocol is None or protocol.closed:
                protocol = await self._connect()
            try:
                return await self._send(protocol, command, timeout)
            except _Lost:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def script(
        self, lua: str, keys: list[str], args: list[Any], *, timeout: float | None = None
    ) -> Any:
        """Run a Lua script by its SHA1, loading it first if this Redis does not have it."""
        sha = self._shas.get(lua)
        if sha is None:
            sha = self._shas[lua] = hashlib.sha1(lua.encode()).hexdigest()  # noqa: S324 (Redis's name)
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args, timeout=timeout)
        except NoScriptError:  # a Redis restarted or flushed: load it, then once more
            await self.execute("SCRIPT", "LOAD", lua, timeout=timeout)
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args, timeout=timeout)

    def close(self) -> None:
        """Drop the connection (calls waiting on it fail); the next call opens a new one."""
        self._generation += 1
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None

    def close_if_stalled(self, seconds: float) -> bool:
        """Drop the connection if its oldest unanswered call has waited longer than
        ``seconds``: every reply behind it is as late, and a connection a firewall dropped
        silently never answers again. (One slow caller's timeout alone closes nothing.)"""
        protocol = self._protocol
        if protocol is None or not protocol.stalled(seconds):
            return False
        self.close()
        return True

    @staticmethod
    async def _send(protocol: _Protocol, command: bytes, timeout: float | None = None) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        protocol.send(future, command)
        expiry = None if timeout is None else loop.call_later(timeout, _expire, future)
        try:
            reply = await future
        finally:
            if expiry is not None:
                expiry.cancel()
        if isinstance(reply, hiredis.ReplyError):
            message = str(reply)
            if message.startswith("NOSCRIPT"):
                raise NoScriptError(message)
            raise ResponseError(message)
        return reply

    async def _connect(self) -> _Protocol:
        # concurrent callers share one attempt, bounded by the timeout
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Protocol:
        generation = self._generation
        dialling = asyncio.ensure_future(self._dial())
        try:
            done, _ = await asyncio.wait({dialling}, timeout=self.timeout)
            if not done:
                # a process that stalled (a full garbage collection, imports on a first request)
                # may not have read the answer that came meanwhile: one more short look
                done, _ = await asyncio.wait({dialling}, timeout=CONNECT_GRACE)
        except BaseException:
            dialling.cancel()
            raise
        if not done:
            dialling.cancel()
            raise TimeoutError("Redis did not accept the connection in time")
        protocol = dialling.result()
        if generation != self._generation:  # closed meanwhile (the link shut down)
            protocol.close()
            raise _Lost("connection to Redis closed")
        self._protocol = protocol
        return protocol

    async def _dial(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_Protocol, self.host, self.port)
        try:
            await self._handshake(protocol)
        except BaseException:
            protocol.close()
            raise
        return protocol

    async def _handshake(self, protocol: _Protocol) -> None:
        if self.password is not None:
            if self.username:
                try:
                    await self._send(protocol, _pack("AUTH", self.username, self.password))
                except ResponseError as exc:
                    if "wrong number of arguments" not in str(exc):
                        raise
                    # Redis before 6 has no users: its AUTH takes the password alone (redis-py's way)
                    await self._send(protocol, _pack("AUTH", self.password))
            else:
                await self._send(protocol, _pack("AUTH", self.password))
        if self.db:
            await self._send(protocol, _pack("SELECT", self.db))


__all__ = ["RedisWire", "supports"]
