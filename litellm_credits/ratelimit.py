"""Per-account rate limits: one atomic Redis script per check, in-process when Redis is away.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp):
a bucket allowing ``amount`` units per ``seconds`` stores its "theoretical arrival time"; a
request of ``cost`` units moves it ``cost * seconds / amount`` forward and is allowed if it stays
within ``seconds`` of now. So a full bucket's worth may come at once, then the rate holds. The
clock is Redis's own (``TIME``), the same for every proxy host.

Tokens are only known after a call, so a tokens-per-minute limit is checked before the call (is
the bucket in debt?) and charged after it with the actual count (``force``: the call happened).

Without Redis, or while it is down, the same arithmetic runs in this process: limits then hold
per instance (counted in ``ratelimit_local_fallbacks``), which beats refusing every request.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .errors import RateLimited
from .metrics import RATE_LIMITED, RATELIMIT_FALLBACKS
from .redis_link import RedisDown, RedisLink

# KEYS[1] the bucket; ARGV: µs per unit, burst µs, cost, force (1 = count it even over the limit)
# returns {allowed, µs until allowed, units left}
LUA_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval * cost
local allow_at = new_tat - burst
if allow_at > now and ARGV[4] ~= '1' then
    return {0, math.ceil(allow_at - now), 0}
end
if cost > 0 then
    redis.call('SET', KEYS[1], string.format('%.0f', math.floor(new_tat)),
               'PX', math.ceil((new_tat - now) / 1000) + 1)
end
return {1, 0, math.max(0, math.floor((now - allow_at) / interval))}
"""


@dataclass(frozen=True)
class Rate:
    """``amount`` units (requests or tokens) per ``seconds``."""

    amount: int
    seconds: float

    @property
    def interval_us(self) -> float:
        return self.seconds * 1_000_000 / self.amount

    @property
    def burst_us(self) -> float:
        return self.seconds * 1_000_000


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float  # seconds
    remaining: int
    limit: int


def gcra(tat: float, now: float, rate: Rate, cost: int, force: bool) -> tuple[Decision, float]:
    """One step of the algorithm in this process: (decision, new TAT), times in µs."""
    tat = max(tat, now)
    new_tat = tat + rate.interval_us * cost
    allow_at = new_tat - rate.burst_us
    if allow_at > now and not force:
        return Decision(False, (allow_at - now) / 1e6, 0, rate.amount), tat
    remaining = max(0, math.floor((now - allow_at) / rate.interval_us))
    return Decision(True, 0.0, remaining, rate.amount), new_tat


class RateLimiter:
    def __init__(self, link: RedisLink, *, max_local_buckets: int = 100_000) -> None:
        self.link = link
        self.max_local_buckets = max_local_buckets
        self._local: dict[str, float] = {}  # bucket -> TAT (µs, wall clock)
        self._prune_at = max_local_buckets

    async def hit(
        self, subject_id: str, name: str, rate: Rate, cost: int = 1, *, force: bool = False
    ) -> Decision:
        """Count ``cost`` units against the account's ``name`` bucket (``force``: even over it)."""
        key = self.link.keys.rate(subject_id, name)
        if self.link.configured:
            try:
                return await self._in_redis(key, rate, cost, force)
            except RedisDown:
                RATELIMIT_FALLBACKS.inc()
        return self._in_process(key, rate, cost, force)

    async def check(self, subject_id: str, name: str, rate: Rate, cost: int = 1) -> Decision:
        """Like :meth:`hit`, but a refusal raises a 429 ``rate_limited`` with ``Retry-After``."""
        decision = await self.hit(subject_id, name, rate, cost)
        if not decision.allowed:
            RATE_LIMITED.inc()
            raise RateLimited(
                f"rate limit exceeded: {rate.amount} {_unit(name)} per {rate.seconds:g} s for this "
                f"account; retry in {math.ceil(decision.retry_after)} s",
                retry_after=decision.retry_after,
                limit=name,
            )
        return decision

    async def _in_redis(self, key: str, rate: Rate, cost: int, force: bool) -> Decision:
        args = [repr(rate.interval_us), repr(rate.burst_us), cost, "1" if force else "0"]
        allowed, wait_us, remaining = await self.link.script(LUA_GCRA, [key], args)
        return Decision(bool(allowed), int(wait_us) / 1e6, int(remaining), rate.amount)

    def _in_process(self, key: str, rate: Rate, cost: int, force: bool) -> Decision:
        now = time.time() * 1e6
        decision, tat = gcra(self._local.get(key, 0.0), now, rate, cost, force)
        if tat > now:
            self._local[key] = tat
        if len(self._local) > self._prune_at:  # forget buckets that are full again (amortised)
            self._local = {k: v for k, v in self._local.items() if v > now}
            self._prune_at = max(self.max_local_buckets, 2 * len(self._local))
        return decision


def _unit(name: str) -> str:
    return "tokens" if "tpm" in name else "requests"


__all__ = ["Decision", "Rate", "RateLimiter", "gcra"]
