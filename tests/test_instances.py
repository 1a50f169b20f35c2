"""Two proxy processes on one PostgreSQL and one Redis, as behind a load balancer: together they
never overspend, a top-up through one shows through the other at once, and rate limits are per
account across both. Then one proxy whose Redis is stopped mid-run and started again."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from litellm_credits.ledger import Ledger
from litellm_credits.money import format_credits
from litellm_credits.money import parse_credits as c

from .conftest import REDIS_PREFIX, TESTS, Proxy, proxy_env, start_proxy, stop_proxy
from .fake_upstream import FakeUpstream
from .redis_server import RedisServer

CONFIG = TESTS / "credits_instances.yaml"


def _start(
    database_url: str, redis_url: str, upstream: FakeUpstream, master: str, log: Any, name: str
) -> tuple[Any, Proxy]:
    # a Redis call counts as failed after 2 s, not 0.25: on a loaded machine (CI, or these tests
    # run under two busy processes) the shorter timeout sends reads around the cache, and the
    # cache's use below could not be seen; correctness never depends on it
    env = proxy_env(
        database_url,
        master,
        upstream.url,
        redis_url,
        CREDITS_CONFIG=str(CONFIG),
        CREDITS_REDIS_TIMEOUT_SECONDS="2",
    )
    path = log / f"{name}.log"
    proc, url = start_proxy(TESTS / "proxy_config.yaml", env, path)
    return proc, Proxy(url=url, master_key=master, log_path=path)


@pytest.fixture(scope="module")
def pair(
    database_url: str, redis_url: str, upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Proxy, Proxy]]:
    master = "sk-master-" + secrets.token_urlsafe(24)
    log = tmp_path_factory.mktemp("instances")
    with ThreadPoolExecutor(2) as pool:  # start both at once
        started = list(
            pool.map(lambda n: _start(database_url, redis_url, upstream, master, log, n), ["a", "b"])
        )
    try:
        yield started[0][1], started[1][1]
    finally:
        for proc, _ in started:
            stop_proxy(proc)


def user(proxy: Proxy, key: str) -> httpx.Client:
    return httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def chat(proxy: Proxy, key: str, content: str, max_tokens: int = 1000) -> Any:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0) as oa:
        return oa.chat.completions.create(
            model="fake-custom", messages=[{"role": "user", "content": content}], max_tokens=max_tokens
        )


async def settled(ledger: Ledger, subject: str) -> None:
    deadline = time.monotonic() + 30
    while await ledger.pool.fetchval(
        "SELECT count(*) FROM credits.holds WHERE subject_id = $1 AND status = 'open'", subject
    ):
        assert time.monotonic() < deadline, "holds still open"
        await asyncio.sleep(0.1)


async def test_concurrent_calls_spread_over_two_instances_never_overspend(
    pair: tuple[Proxy, Proxy], ledger: Ledger
) -> None:
    a, b = pair
    subject, key = a.create_account("20")

    # each call holds its worst case, 1000 output tokens at 3.3e-6 USD = 3.3 credits and a little
    # prompt; 20 credits cover five holds at a time, 16 calls arrive together on both instances
    def one(n: int) -> str:
        try:
            chat(a if n % 2 else b, key, "usage=10,1000 sleep=0.5")
            return "ok"
        except openai.APIStatusError as exc:
            return str(exc.status_code)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    await settled(ledger, subject)
    served = results.count("ok")
    assert set(results) <= {"ok", "402"} and 1 <= served <= 6, results
    account = await ledger.require_account(subject)
    cost = c("0.011") + c("3.3")  # 10 prompt tokens at 1.1e-6 USD and 1000 completion at 3.3e-6
    assert account.balance == c("20") - served * cost >= 0 and account.held == 0
    ledger_sum = await ledger.pool.fetchval(
        "SELECT sum(amount) FROM credits.credit_transactions WHERE subject_id = $1", subject
    )
    assert ledger_sum == account.balance


def test_a_top_up_through_one_instance_shows_through_the_other_at_once(pair: tuple[Proxy, Proxy]) -> None:
    a, b = pair
    subject, key = a.create_account("1")
    with user(b, key) as on_b, a.admin() as admin_a:
        for n in range(2, 7):
            on_b.get("/api/v1/credits/balance").raise_for_status()  # cached on b now
            before = on_b.get("/api/v1/credits/balance").json()["balance"]
            assert before == f"{n - 1}.000000"
            admin_a.post(
                "/api/v1/admin/credits/allocate", json={"user_id": subject, "amount": "1"}
            ).raise_for_status()
            assert on_b.get("/api/v1/credits/balance").json()["balance"] == f"{n}.000000"
        health = admin_a.get("/api/v1/admin/credits/health").json()
        assert health["redis"]["healthy"] and health["database"] == "ok"
    with b.admin() as admin_b:
        counters = admin_b.get("/api/v1/admin/credits/health").json()["counters"]
    assert counters["cache_hits_local"] + counters["cache_hits_redis"] >= 5  # b did serve from cache


def test_a_top_up_from_the_command_line_shows_through_the_proxies_at_once(
    pair: tuple[Proxy, Proxy], database_url: str, redis_url: str
) -> None:
    a, b = pair
    subject, key = a.create_account("1")
    with user(b, key) as on_b:
        assert on_b.get("/api/v1/credits/balance").json()["balance"] == "1.000000"  # cached now
        env = dict(
            os.environ, CREDITS_DATABASE_URL=database_url, CREDITS_REDIS_URL=redis_url,
            CREDITS_REDIS_PREFIX=REDIS_PREFIX, CREDITS_CONFIG=str(CONFIG),
        )  # fmt: skip
        exe = Path(sys.executable).parent / "litellm-credits"
        done = subprocess.run(
            [str(exe), "allocate", subject, "2.5"], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert on_b.get("/api/v1/credits/balance").json()["balance"] == "3.500000"


def test_a_key_revoked_through_one_instance_is_refused_by_the_other_at_once(
    pair: tuple[Proxy, Proxy],
) -> None:
    a, b = pair
    subject, _ = a.create_account("1")
    with a.admin() as admin:
        issued = admin.post("/api/v1/admin/credits/keys", json={"user_id": subject}).json()
        with user(b, issued["api_key"]) as on_b:
            assert on_b.get("/api/v1/credits/balance").status_code == 200  # b has the key cached
            admin.post(f"/api/v1/admin/credits/keys/{issued['id']}/revoke").raise_for_status()
            assert on_b.get("/api/v1/credits/balance").status_code == 401


def test_rate_limits_are_per_account_and_shared_by_the_instances(pair: tuple[Proxy, Proxy]) -> None:
    a, b = pair
    x, x_key = a.create_account("1")
    _, y_key = a.create_account("1")
    with user(a, x_key) as xa, user(b, x_key) as xb, user(a, y_key) as ya:
        first = xa.get("/api/v1/credits/balance")
        assert first.headers["X-RateLimit-Limit"] == "30"
        allowed, refused = 1, None
        for n in range(40):
            r = (xb if n % 2 else xa).get("/api/v1/credits/balance")
            if r.status_code == 429:
                refused = r
                break
            assert r.status_code == 200
            allowed += 1
        assert refused is not None and 30 <= allowed <= 31  # one bucket for both instances
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limited", "429")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert ya.get("/api/v1/credits/balance").status_code == 200  # y has its own budget
    with a.admin() as admin:  # admins are not limited
        for _ in range(5):
            admin.get(f"/api/v1/admin/credits/accounts/{x}").raise_for_status()


def test_charging_routes_have_the_stricter_limit(pair: tuple[Proxy, Proxy]) -> None:
    a, b = pair
    subject, _ = a.create_account("100")
    with a.admin() as admin:
        service = admin.post("/api/v1/admin/credits/keys", json={"user_id": subject, "role": "service"})
        service_key = service.json()["api_key"]
    statuses = []
    with user(a, service_key) as sa, user(b, service_key) as sb:
        for n in range(12):
            body = {"user_id": subject, "amount": "0.5", "idempotency_key": str(uuid.uuid4())}
            statuses.append((sa if n % 2 else sb).post("/api/v1/credits/deduct", json=body).status_code)
    assert statuses.count(200) in (10, 11) and statuses[-1] == 429


async def test_a_tiers_requests_per_minute_on_llm_calls(pair: tuple[Proxy, Proxy], ledger: Ledger) -> None:
    a, b = pair
    subject, key = a.create_account("100")
    with a.admin() as admin:
        admin.patch(f"/api/v1/admin/credits/accounts/{subject}", json={"tier": "limited"}).raise_for_status()
    for n in range(3):
        chat(a if n % 2 else b, key, "usage=10,10", max_tokens=10)
    with pytest.raises(openai.RateLimitError) as refused:
        chat(a, key, "usage=10,10", max_tokens=10)
    assert refused.value.response.headers.get("retry-after")
    assert "rate limit" in str(refused.value.body)
    await settled(ledger, subject)
    account = await ledger.require_account(subject)
    assert account.held == 0 and account.balance == c("100") - 3 * (c("0.011") + c("0.033"))
    # refused before its hold (this instance knew the account's tier), nothing was recorded
    events = await ledger.pool.fetch(
        "SELECT status, metadata FROM credits.usage_events WHERE subject_id = $1 ORDER BY id", subject
    )
    assert [e["status"] for e in events] == ["success"] * 3


async def test_a_call_refused_after_its_hold_releases_it(pair: tuple[Proxy, Proxy], ledger: Ledger) -> None:
    """An instance that has not seen the account yet learns its tier from the hold: if the
    limit is spent, that hold is voided and the refusal recorded."""
    a, b = pair
    subject, key = a.create_account("100")
    with a.admin() as admin:
        admin.patch(f"/api/v1/admin/credits/accounts/{subject}", json={"tier": "limited"}).raise_for_status()
    for _ in range(3):
        chat(a, key, "usage=10,10", max_tokens=10)  # b has never seen this account
    with pytest.raises(openai.RateLimitError):
        chat(b, key, "usage=10,10", max_tokens=10)
    await settled(ledger, subject)
    assert (await ledger.require_account(subject)).held == 0
    events = await ledger.pool.fetch(
        "SELECT status, metadata FROM credits.usage_events WHERE subject_id = $1 ORDER BY id", subject
    )
    assert [e["status"] for e in events] == ["success"] * 3 + ["failed"]
    assert events[-1]["metadata"]["error"] == "rate_limited"


async def test_a_tiers_tokens_per_minute_count_what_calls_used(
    pair: tuple[Proxy, Proxy], ledger: Ledger
) -> None:
    a, b = pair
    subject, key = a.create_account("100")
    with a.admin() as admin:
        admin.patch(f"/api/v1/admin/credits/accounts/{subject}", json={"tier": "thrifty"}).raise_for_status()
    chat(a, key, "usage=40,150", max_tokens=200)  # allowed: the bucket was empty; 190 tokens used
    await settled(ledger, subject)  # tokens are counted when the call settles
    with pytest.raises(openai.RateLimitError) as refused:
        chat(b, key, "usage=1,1", max_tokens=10)  # 90 tokens of debt at 100 a minute
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 60
    assert "tokens" in str(refused.value.body)


@pytest.fixture
def lonely(
    database_url: str, upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Proxy, RedisServer]]:
    """One proxy on a Redis server of its own, which the test may stop."""
    server = RedisServer().start()
    master = "sk-master-" + secrets.token_urlsafe(24)
    proc, proxy = _start(database_url, server.url, upstream, master, tmp_path_factory.mktemp("lonely"), "p")
    try:
        yield proxy, server
    finally:
        stop_proxy(proc)
        server.close()


async def test_redis_stopped_mid_run_and_started_again(
    lonely: tuple[Proxy, RedisServer], ledger: Ledger
) -> None:
    proxy, server = lonely
    subject, key = proxy.create_account("10")
    with user(proxy, key) as me, proxy.admin() as admin:

        def balance() -> str:
            r = me.get("/api/v1/credits/balance")
            assert r.status_code == 200, r.text
            return str(r.json()["balance"])

        assert balance() == balance() == "10.000000"
        server.stop()
        assert balance() == "10.000000"  # from PostgreSQL
        chat(proxy, key, "usage=10,10", max_tokens=10)  # LLM calls go on
        admin.post("/api/v1/admin/credits/allocate", json={"user_id": subject, "amount": "5"})
        await settled(ledger, subject)
        expected = format_credits((await ledger.require_account(subject)).balance)
        assert balance() == expected  # not a stale cached value
        health = admin.get("/api/v1/admin/credits/health").json()
        assert health["redis"]["healthy"] is False and health["counters"]["cache_bypassed"] > 0
        assert health["counters"]["redis_errors"] > 0

        server.start()
        deadline = time.monotonic() + 20
        while not admin.get("/api/v1/admin/credits/health").json()["redis"]["healthy"]:
            assert time.monotonic() < deadline, "the proxy did not go back to Redis"
            assert balance() == expected
            time.sleep(0.2)

        def hits() -> int:
            counters = admin.get("/api/v1/admin/credits/health").json()["counters"]
            return int(counters["cache_hits_local"] + counters["cache_hits_redis"])

        before, deadline = hits(), time.monotonic() + 20
        while hits() == before:  # caching again once the missed invalidations are replayed
            assert time.monotonic() < deadline, "the cache did not come back"
            assert balance() == expected
            time.sleep(0.2)
        health = admin.get("/api/v1/admin/credits/health").json()
        assert health["cache"]["invalidations_pending"] == 0
        assert health["cache"]["memory_checked_against_redis"]
