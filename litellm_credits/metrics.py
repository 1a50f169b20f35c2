"""Process-wide counters for what an operator watches: cache use, Redis faults, throttling.

Read them at ``GET /api/v1/admin/credits/health`` (per proxy process).
"""

from __future__ import annotations

from collections import Counter

COUNTERS = (
    "cache_hits_local",  # served from this process's memory
    "cache_hits_redis",  # served from Redis
    "cache_misses",  # read from PostgreSQL
    "cache_bypassed",  # Redis down: read from PostgreSQL without caching
    "cache_invalidations",
    "cache_invalidations_deferred",  # Redis down: replayed once it answers
    "redis_errors",
    "redis_busy",  # every connection of the process's pool in use: that call skipped Redis
    "ratelimit_local_fallbacks",  # Redis down: the limit was checked in this process only
    "rate_limited",  # requests refused with a 429
)


class Metrics:
    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def incr(self, name: str, n: int = 1) -> None:
        self._counts[name] += n

    def __getitem__(self, name: str) -> int:
        return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        return {name: self._counts[name] for name in COUNTERS}


metrics = Metrics()

__all__ = ["COUNTERS", "Metrics", "metrics"]
