"""A lean Redis connection for the request path: commands pipelined on one socket per event loop.

Every proxied request runs a few Redis scripts (the API key's owner, the cache invalidations
after its hold and its settlement). Through redis-py's asyncio client each command takes a pool
connection under a lock and a timeout, wraps the write in ``wait_for`` (a task per command),
goes through its retry and observability layers, and packs its arguments in Python: measured
in the proxy, that was a quarter of the plugin's CPU per request, more than the hold and the
settlement together. Here a command is packed by hiredis (C), written at once, and answered in
its turn (Redis answers a connection's commands in the order they came), so concurrent callers
share one socket without waiting for each other: no pool, no lock, no task per call.

Only what the request path needs: ``execute`` and ``script`` (EVALSHA, loading the script when
Redis answers NOSCRIPT) on a plain ``redis://`` URL (host, port, database, user and password).
Everything else, and every other URL (TLS, Unix sockets, Sentinel), goes through redis-py
(``RedisLink.client``). Timeouts and the circuit breaker stay with the caller (``RedisLink``),
which closes the connection after a timeout; a lost connection fails every call waiting on it
with redis-py's ``ConnectionError``, an error reply raises its ``ResponseError``, so callers
handle both as they do redis-py's.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError


def supports(url: str) -> bool:
    """Whether a URL is one this connection speaks to (``redis://``, TCP, no TLS)."""
    return urlsplit(url).scheme == "redis"


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                future = self.waiting.popleft()
                if not future.done():  # (its caller may have given up: the reply is dropped)
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError):  # garbage, or a reply nobody asked for
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(RedisConnectionError("connection to Redis lost"))

    def send(self, future: asyncio.Future[Any], command: bytes) -> None:
        if self.closed or self.transport is None:
            raise RedisConnectionError("connection to Redis closed")
        self.waiting.append(future)
        self.transport.write(command)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class RedisWire:
    """One pipelined connection to the Redis at ``url``, opened on first use and after a loss."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"RedisWire speaks redis:// only, not {parts.scheme}://")
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 6379
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        db = parts.path.lstrip("/") or parse_qs(parts.query).get("db", ["0"])[0]
        self.db = int(db or 0)
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._shas: dict[str, str] = {}

    async def execute(self, *args: Any) -> Any:
        """Send one command; its reply (an error reply raises ``ResponseError``)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        return await self._send(protocol, args)

    async def script(self, lua: str, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script by its SHA1, loading it first if this Redis does not have it."""
        sha = self._shas.get(lua)
        if sha is None:
            sha = self._shas[lua] = hashlib.sha1(lua.encode()).hexdigest()  # noqa: S324 (Redis's name)
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:  # a Redis restarted or flushed: load it, then once more
            await self.execute("SCRIPT", "LOAD", lua)
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

    def close(self) -> None:
        """Drop the connection (calls waiting on it fail); the next call opens a new one."""
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None

    @staticmethod
    async def _send(protocol: _Protocol, args: tuple[Any, ...]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        protocol.send(future, hiredis.pack_command(args))
        reply = await future
        if isinstance(reply, hiredis.ReplyError):
            message = str(reply)
            if message.startswith("NOSCRIPT"):
                raise NoScriptError(message)
            raise ResponseError(message)
        return reply

    async def _connect(self) -> _Protocol:
        # concurrent callers share one attempt
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_Protocol, self.host, self.port)
        try:
            if self.password is not None:
                auth = (self.username, self.password) if self.username else (self.password,)
                await self._send(protocol, ("AUTH", *auth))
            if self.db:
                await self._send(protocol, ("SELECT", self.db))
        except BaseException:
            protocol.close()
            raise
        self._protocol = protocol
        return protocol


__all__ = ["RedisWire", "supports"]
