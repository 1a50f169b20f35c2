"""Benchmark: the plugin's own CPU per proxied request, without the proxy around it.

    python bench/hooks_cpu.py                  # 16 callers for 10 s: requests/s and CPU ms per request
    python bench/hooks_cpu.py --profile        # the same under cProfile (top functions)
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=cg.out \\
        python bench/hooks_cpu.py --count 800  # instructions per request: totals in cg.out / 800

Each request goes through what the LiteLLM proxy calls for it: ``custom_auth`` (the key lookup,
cached in memory and confirmed in Redis), the pre-call hook (price, estimate, hold), the response
headers hook and the success callback (price, settle), with a real LiteLLM ``ModelResponse``, on
one model group with one deployment (gpt-4o-mini's prices from LiteLLM's map). PostgreSQL and
Redis are real (as in bench/proxy.py); the proxy is not, so this measures the plugin alone: the
proxy A/B (bench/proxy.py) is the figure that counts, this one is steadier and shows where the
plugin's share goes. Under callgrind only the measured requests are counted (the script turns
collection on and off around them), so instructions per request repeat within a few per cent, whatever
else the machine does: the way to compare two versions of the hot path.

PostgreSQL: CREDITS_DATABASE_URL's server, else 127.0.0.1:5432, else embedded; Redis:
CREDITS_REDIS_URL, else redis://127.0.0.1:6379/9 (keys under a random prefix, removed at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import os
import pstats
import secrets
import shutil
import subprocess
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import harness as h
import litellm

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 16
MODEL = "bench"
DEPLOYMENTS = [
    {
        "model_name": MODEL,
        "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": "http://upstream", "api_key": "fake"},
        "model_info": {"id": "bench-deployment"},
    }
]
SYSTEM = "You are a helpful assistant. Answer in one short sentence."


def callgrind(on: bool) -> None:
    """Turn callgrind's collection on or off for this process (nothing without callgrind)."""
    tool = shutil.which("callgrind_control")
    if tool is not None:
        subprocess.run(
            [tool, "-i", "on" if on else "off", str(os.getpid())], capture_output=True, check=False
        )


async def main(args: argparse.Namespace) -> None:
    server, pg_tmp = await h.admin_dsn(False)
    name = f"credits_bench_hooks_{secrets.token_hex(4)}"
    await h.admin(server, f'CREATE DATABASE "{name}"')
    prefix = f"credits-bench-{secrets.token_hex(4)}"
    redis_url = os.environ.get("CREDITS_REDIS_URL", "redis://127.0.0.1:6379/9")
    os.environ.update(
        CREDITS_DATABASE_URL=h.with_database(server, name),
        CREDITS_REDIS_URL=redis_url,
        CREDITS_REDIS_PREFIX=prefix,
        CREDITS_CONFIG=str(ROOT / "config" / "credits.yaml"),
    )
    from litellm.proxy import proxy_server

    from litellm_credits.auth import custom_auth, issue_key
    from litellm_credits.hooks import CreditsHandler
    from litellm_credits.money import parse_credits
    from litellm_credits.process import process_runtime

    proxy_server.master_key = "sk-master-" + secrets.token_hex(8)
    runtime = process_runtime()
    try:
        handler = CreditsHandler(runtime, deployments=lambda group: DEPLOYMENTS, routes=lambda group: True)
        ledger = await runtime.ledger()
        keys = []
        for i in range(CLIENTS):
            await ledger.create_account(f"bench-{i}", tier=runtime.settings.credits.default_tier)
            await ledger.credit(f"bench-{i}", parse_credits("1000000"))
            keys.append((await issue_key(ledger.pool, f"bench-{i}")).key)
        usage = {"prompt_tokens": 15, "completion_tokens": 4, "total_tokens": 19}
        choice = {"message": {"role": "assistant", "content": "Hello there!"}}
        response = litellm.ModelResponse(model="gpt-4o-mini", choices=[choice], usage=usage)
        start = dt.datetime.now(dt.timezone.utc)
        end = start + dt.timedelta(milliseconds=5)
        done = 0

        async def request(key: str) -> None:
            nonlocal done
            auth = await custom_auth(None, "Bearer " + key)
            data = {
                "model": MODEL,
                "messages": h.chat(SYSTEM, "Say hello, please. (request {n})"),
                "max_tokens": 50,
                "metadata": {},
                "litellm_call_id": secrets.token_hex(8),
                "proxy_server_request": {"headers": {}},
            }
            data = await handler.async_pre_call_hook(auth, None, data, "acompletion")
            await handler.async_post_call_response_headers_hook(data, auth, response)
            kwargs = {
                "litellm_params": {"metadata": data["metadata"], "model_info": {"id": "bench-deployment"}},
                "standard_logging_object": {"model_group": MODEL, "model_id": "bench-deployment"},
                "model": "gpt-4o-mini",
                "custom_llm_provider": "openai",
                "stream": False,
            }
            await handler.async_log_success_event(kwargs, response, start, end)
            done += 1

        async def caller(i: int, stop: float | None, count: int | None) -> None:
            n = 0
            while (stop is None or time.monotonic() < stop) and (count is None or n < count):
                await request(keys[i])
                n += 1

        await asyncio.gather(*(caller(i, None, 20) for i in range(CLIENTS)))  # warm: caches, statements
        if args.count:
            callgrind(True)
            cpu = time.process_time()
            done = 0
            await asyncio.gather(*(caller(i, None, args.count // CLIENTS) for i in range(CLIENTS)))
            cpu = time.process_time() - cpu
            callgrind(False)
            print(f"{done:,} requests, CPU {1000 * cpu / done:.3f} ms per request")
        else:
            profile = cProfile.Profile() if args.profile else None
            done, cpu, t0 = 0, time.process_time(), time.monotonic()
            if profile is not None:
                profile.enable()
            stop = t0 + args.seconds
            await asyncio.gather(*(caller(i, stop, None) for i in range(CLIENTS)))
            if profile is not None:
                profile.disable()
            cpu, wall = time.process_time() - cpu, time.monotonic() - t0
            print(
                f"{CLIENTS} callers, {wall:.1f} s: {done / wall:,.0f} requests/s, "
                f"CPU {1000 * cpu / done:.3f} ms per request ({cpu / wall:.2f} cores busy)"
            )
            if profile is not None:
                stats = pstats.Stats(profile)
                stats.sort_stats(args.sort).print_stats(args.top)
        await runtime.cache.drain()
    finally:
        await runtime.close()
        await h.admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        import redis

        with redis.Redis.from_url(redis_url) as client:
            for key in client.scan_iter(match=prefix + "*", count=1000):
                client.delete(key)
        if pg_tmp is not None:
            h.stop_embedded(pg_tmp)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10, help="seconds of load (default 10)")
    parser.add_argument("--count", type=int, default=0, help="exactly this many requests (for callgrind)")
    parser.add_argument("--profile", action="store_true", help="cProfile the measured requests")
    parser.add_argument(
        "--sort", default="cumulative", help="the profile's order: cumulative (default), tottime, ncalls"
    )
    parser.add_argument("--top", type=int, default=40, help="functions the profile lists (default 40)")
    h.add_loop_argument(parser)
    args = parser.parse_args()
    h.run(main(args), args.loop)
