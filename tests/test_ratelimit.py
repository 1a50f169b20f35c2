"""Rate limits: the algorithm, per account on a real Redis, and in-process when Redis is away."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from litellm_credits.errors import RateLimited
from litellm_credits.metrics import metrics
from litellm_credits.ratelimit import Rate, RateLimiter, gcra
from litellm_credits.redis_link import RedisLink

from .conftest import REDIS_PREFIX
from .redis_server import RedisServer

S = 1_000_000  # µs


def test_a_full_window_at_once_then_the_rate() -> None:
    rate = Rate(5, 10)  # 5 per 10 s: one every 2 s
    tat, now = 0.0, 1000 * S
    for n in range(5):
        decision, tat = gcra(tat, now, rate, 1, False)
        assert decision.allowed and decision.remaining == 4 - n
    decision, tat2 = gcra(tat, now, rate, 1, False)
    assert not decision.allowed and decision.retry_after == pytest.approx(2.0)
    assert tat2 == tat  # a refusal costs nothing
    decision, _ = gcra(tat, now + 2 * S, rate, 1, False)  # one more after 2 s
    assert decision.allowed
    decision, _ = gcra(tat, now + 10 * S, rate, 1, False)  # full again after the window
    assert decision.allowed and decision.remaining == 4


def test_tokens_are_counted_after_the_call_and_put_the_bucket_in_debt() -> None:
    rate = Rate(1000, 60)  # tokens per minute
    now = 1000 * S
    check, tat = gcra(0.0, now, rate, 0, False)
    assert check.allowed
    used, tat = gcra(tat, now, rate, 1500, True)  # the call used more than the limit
    assert used.allowed and used.remaining == 0
    check, _ = gcra(tat, now, rate, 0, False)
    assert not check.allowed and check.retry_after == pytest.approx(30.0)  # 500 tokens of debt
    check, _ = gcra(tat, now + 30 * S, rate, 0, False)
    assert check.allowed


@pytest.fixture
async def limiter(redis_url: str) -> AsyncIterator[RateLimiter]:
    link = RedisLink(redis_url, prefix=f"{REDIS_PREFIX}-ratelimit-{secrets.token_hex(4)}")
    yield RateLimiter(link)
    await link.close()


async def test_limits_are_per_account_on_redis(limiter: RateLimiter) -> None:
    rate = Rate(3, 60)
    for _ in range(3):
        await limiter.check("alice", "api", rate)
    with pytest.raises(RateLimited) as refused:
        await limiter.check("alice", "api", rate)
    body = refused.value.to_body()["error"]
    assert (refused.value.status, body["type"]) == (429, "rate_limited")
    assert 1 <= int(refused.value.headers["Retry-After"]) <= 20
    assert body["details"]["limit"] == "api"
    await limiter.check("bob", "api", rate)  # another account is not affected
    await limiter.check("alice", "api_charge", Rate(1, 60))  # nor another limit


async def test_instances_share_one_bucket(redis_url: str) -> None:
    prefix = f"{REDIS_PREFIX}-ratelimit-{secrets.token_hex(4)}"
    a, b = RedisLink(redis_url, prefix=prefix), RedisLink(redis_url, prefix=prefix)
    try:
        allowed = 0
        for n in range(10):
            decision = await RateLimiter(a if n % 2 else b).hit("carol", "api", Rate(4, 60))
            allowed += decision.allowed
        assert allowed == 4
    finally:
        await a.close()
        await b.close()


async def test_without_redis_and_with_redis_down_the_limit_holds_in_process() -> None:
    local = RateLimiter(RedisLink(None))
    assert [(await local.hit("dave", "api", Rate(2, 60))).allowed for _ in range(3)] == [True, True, False]

    server = RedisServer().start()
    link = RedisLink(server.url, timeout=0.2, retry_seconds=60)
    limiter = RateLimiter(link)
    try:
        assert (await limiter.hit("erin", "api", Rate(2, 60))).allowed
        server.stop()
        fallbacks = metrics["ratelimit_local_fallbacks"]
        decisions = [(await limiter.hit("erin", "api", Rate(2, 60))).allowed for _ in range(3)]
        assert decisions == [True, True, False]  # this process's own count
        assert metrics["ratelimit_local_fallbacks"] == fallbacks + 3
    finally:
        await link.close()
        server.close()
