"""One process's link to Redis: key names, a client per event loop, and a circuit breaker.

Redis only ever speeds things up or spreads them across instances; the ledger never depends on
it. So every call here is bounded by a short timeout, and after a failure the link stays *open*
(calls fail at once, without touching the network) for ``retry_seconds``, then tries again.
Callers catch :class:`RedisDown` and fall back (the cache to PostgreSQL, the rate limiter to
its in-process twin); each fall-back is counted in :mod:`metrics`, and logged once per outage.

Every key name is made here. Keys about one account share a Redis Cluster hash tag (the
account id inside ``{...}``), so a script touching several of them stays on one slot.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .metrics import REDIS_BUSY, REDIS_ERRORS
from .redis_wire import RedisWire

if sys.version_info >= (3, 11):
    from asyncio import timeout as deadline
else:  # (redis-py installs it on these)
    from async_timeout import timeout as deadline

log = logging.getLogger("litellm_credits.redis")

T = TypeVar("T")


class RedisDown(Exception):
    """Redis did not answer in time (or the link is open after a recent failure)."""


class Keys:
    """Every Redis key name this plugin uses."""

    def __init__(self, prefix: str = "credits") -> None:
        self.prefix = prefix

    @staticmethod
    def tag(subject_id: str) -> str:
        # braces would end the hash tag early; % is escaped so the encoding stays one-to-one
        return "{" + quote(subject_id, safe="") + "}"

    def account(self, subject_id: str) -> str:
        return f"{self.prefix}:{self.tag(subject_id)}:account"

    def version(self, key: str) -> str:
        """The version of a cached entry, a random token replaced by every invalidation (same
        hash tag, same slot)."""
        return key + ":v"

    def api_key(self, key_hash_hex: str) -> str:
        return f"{self.prefix}:apikey:{{{key_hash_hex}}}"

    def analytics(self, name: str) -> str:
        return f"{self.prefix}:analytics:{{{quote(name, safe='')}}}"

    def rate(self, subject_id: str, limit: str) -> str:
        return f"{self.prefix}:{self.tag(subject_id)}:rate:{limit}"


class RedisLink:
    """A Redis client per event loop behind a circuit breaker; ``None`` URL = no Redis at all."""

    def __init__(
        self,
        url: str | None,
        *,
        prefix: str = "credits",
        timeout: float = 0.25,
        retry_seconds: float = 2.0,
        max_connections: int = 50,
    ) -> None:
        self.url = url
        self.max_connections = max_connections
        self.keys = Keys(prefix)
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self._clients: dict[asyncio.AbstractEventLoop, aioredis.Redis] = {}
        self._wires: dict[asyncio.AbstractEventLoop, RedisWire] = {}
        self._wire_ok = url is not None and _readable(url)
        self._scripts: dict[str, Any] = {}  # redis-py's script objects, where no wire is used
        self._open_until = 0.0  # monotonic time until which calls fail fast
        self._down_since: float | None = None

    @property
    def configured(self) -> bool:
        return self.url is not None

    @property
    def healthy(self) -> bool:
        return self.configured and self._down_since is None

    def client(self) -> aioredis.Redis:
        if self.url is None:
            raise RedisDown("no Redis configured")
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                # a burst of concurrent calls waits for a connection instead of failing
                max_connections=self.max_connections,
                timeout=self.timeout,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                # one immediate retry re-dials a connection the server dropped (a restart);
                # beyond that the breaker decides when to try again
                retry=Retry(NoBackoff(), 1),
                health_check_interval=30,
            )
            client = aioredis.Redis(connection_pool=pool)
            self._clients[loop] = client
        return client

    def wire(self) -> RedisWire | None:
        """The running loop's pipelined connection for scripts (None for a URL it does not speak)."""
        if not self._wire_ok or self.url is None:
            return None
        loop = asyncio.get_running_loop()
        wire = self._wires.get(loop)
        if wire is None:
            wire = self._wires[loop] = RedisWire(self.url, timeout=self.timeout)
        return wire

    async def call(self, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run ``op`` on the client within the timeout, or raise :class:`RedisDown`."""

        async def bounded() -> T:
            # a deadline on this task, not wait_for's task per call (a fifth of a call's CPU)
            async with deadline(self.timeout * 2):
                return await op(self.client())

        return await self._guarded(bounded)

    async def script(self, lua: str, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script (EVALSHA, loaded on NOSCRIPT) within the timeout, or raise
        :class:`RedisDown`; on the pipelined connection where the URL allows it."""
        wire = self.wire()
        if wire is None:

            async def run(client: aioredis.Redis) -> Any:
                script = self._scripts.get(lua)
                if script is None:
                    script = self._scripts[lua] = client.register_script(lua)
                return await script(keys=keys, args=args, client=client)

            return await self.call(run)
        try:
            # bounded by the wire itself, per reply: see redis_wire._expire
            return await self._guarded(lambda: wire.script(lua, keys, args, timeout=self.timeout * 2))
        except RedisDown:
            # a connection whose oldest call has waited past the timeout is stuck (every reply
            # behind it is as late; one a firewall dropped never answers): the next call opens
            # a new one. An error reply, or one slow call among answered ones, closes nothing.
            wire.close_if_stalled(self.timeout)
            raise

    async def _guarded(self, op: Callable[[], Awaitable[T]]) -> T:
        """``op()`` (which bounds its own wait) behind the breaker; its failures as RedisDown."""
        if self.url is None:
            raise RedisDown("no Redis configured")
        if time.monotonic() < self._open_until:
            raise RedisDown("Redis is unavailable (retrying shortly)")
        try:
            result = await op()
        except RedisConnectionError as exc:
            if str(exc) == "No connection available.":  # our pool is busy, Redis is not down
                REDIS_BUSY.inc()
                raise RedisDown("every Redis connection of this process is busy") from None
            self.failed(exc)
            raise RedisDown(type(exc).__name__) from None
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.failed(exc)
            raise RedisDown(type(exc).__name__) from None
        self.succeeded()
        return result

    def failed(self, exc: BaseException) -> None:
        """Open the breaker for ``retry_seconds``; log once per outage."""
        REDIS_ERRORS.inc()
        self._open_until = time.monotonic() + self.retry_seconds
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "litellm-credits: Redis unavailable (%s); caching bypassed and rate limits kept "
                "per process until it answers again",
                type(exc).__name__,
            )

    def succeeded(self) -> None:
        if self._down_since is not None:
            log.warning(
                "litellm-credits: Redis answers again after %.1f s", time.monotonic() - self._down_since
            )
            self._down_since = None

    def status(self) -> dict[str, Any]:
        return {
            "configured": self.configured,
            "healthy": self.healthy,
            "down_for_seconds": None
            if self._down_since is None
            else round(time.monotonic() - self._down_since, 1),
        }

    async def close(self) -> None:
        """Close the running loop's client and connection."""
        loop = asyncio.get_running_loop()
        wire = self._wires.pop(loop, None)
        if wire is not None:
            wire.close()
        client = self._clients.pop(loop, None)
        if client is not None:
            await client.aclose()


def _readable(url: str) -> bool:
    """Whether the wire speaks to the URL (a plain redis:// one it can read); else redis-py's
    client answers."""
    try:
        RedisWire(url)
    except ValueError:
        return False
    return True


__all__ = ["Keys", "RedisDown", "RedisLink"]
