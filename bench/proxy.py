"""Benchmark: the real LiteLLM proxy with litellm-credits (A) beside the same proxy without it (B).

    python bench/proxy.py             # A/B (warm-up, then 6 rounds of 10 s a side), a 600-s soak of A
    python bench/proxy.py --soak 0    # the A/B and the hook at half the peak (about 4 minutes)
    python bench/proxy.py --quick     # 2-s rounds and a 20-s soak: a smoke run
    python bench/proxy.py --profile --rounds 0 --soak 0   # only a py-spy profile of A under load
    python bench/proxy.py --soak 0 --no-gc-freeze   # the A/B with A's heap not frozen (as B's)

Both proxies run at once, as subprocesses, with one model served by tests/fake_upstream.py (in its
own process; non-streaming, no delay). A has the plugin's callback and custom_auth and 16 funded
accounts whose keys the clients take in turn; B has plain master-key auth. 16 concurrent clients
(httpx) send chat completions in alternating rounds A B A B ...; per side: the median req/s of the
rounds, p50/p99 latency over all rounds, and the CPU per request of the proxy and of PostgreSQL.
At the end every request A answered must be one settled usage event (else the A/B measured a
broken plugin). --soak prints A's RSS (with any child processes) after a warm-up and at the end;
after the A/B, A at half its peak rate (an open loop), with the pre-call hook's own time read off
A's histogram litellm_credits_pre_call_seconds (the issue's bar: p99 <= 5 ms at half the peak);
--profile the share of py-spy samples (threads holding the GIL) whose stack holds litellm_credits,
and the plugin's top 20 functions.

PostgreSQL: CREDITS_DATABASE_URL, else 127.0.0.1:5432, else embedded; Redis: CREDITS_REDIS_URL,
else redis://127.0.0.1:6379/9. The scratch database, this run's Redis keys and every subprocess
are removed at the end, on an error or Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import itertools
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncpg
import harness as h
import httpx
import yaml

try:
    import psutil
except ImportError:  # /proc instead
    psutil = None

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
Op = Callable[[], Awaitable[None]]
MODEL = "fake-gpt"
SYSTEM = "You are a helpful assistant. Answer in one word."
FUNDING = "100000"  # credits per account: far more than any run spends
CHECK_SQL = """
SELECT (SELECT count(*) FROM credits.usage_events WHERE status = 'success'),
       (SELECT coalesce(sum(charged), 0) FROM credits.usage_events WHERE status = 'success'),
       (SELECT count(*) FROM credits.credit_transactions WHERE type = 'usage'),
       (SELECT count(*) FROM credits.holds WHERE status = 'open')
"""
UPSTREAM = """
import collections
from tests.fake_upstream import FakeUpstream
server = FakeUpstream()
server.requests = collections.deque(maxlen=1)  # it keeps every request otherwise
server.authorizations = collections.deque(maxlen=1)
print(server.url, flush=True)
server.serve_forever()
"""


@dataclass
class Side:
    name: str
    url: str
    pid: int
    keys: list[str]
    users: list[str] = field(default_factory=list)
    ok: int = 0  # requests answered 200, over the whole run
    dsn: str = ""  # the scratch database, for its statistics
    master: str = ""  # the admin key, for the plugin's metrics


XACTS_SQL = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
TABLES_SQL = """
SELECT relname, coalesce(seq_scan, 0) + coalesce(idx_scan, 0), n_tup_ins, n_tup_upd
FROM pg_stat_user_tables WHERE schemaname = 'credits'
"""


async def pg_stats(dsn: str) -> tuple[int, dict[str, tuple[int, int, int]]]:
    """The database's transactions so far, and each table's scans, inserts and updates."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        xacts = await conn.fetchval(XACTS_SQL)
        tables = {r[0]: (r[1], r[2], r[3]) for r in await conn.fetch(TABLES_SQL)}
    finally:
        await conn.close()
    return xacts, tables


def usage(pid: int) -> tuple[float, float]:
    """RSS (MB) and CPU seconds of the process and its descendants (workers, if it forks any)."""
    rss = cpu = 0.0
    if psutil:
        try:
            procs = [psutil.Process(pid)]
            for p in procs + procs[0].children(recursive=True):
                rss, cpu = rss + p.memory_info().rss, cpu + sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
        return rss / 2**20, cpu
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            rss += int(Path(f"/proc/{p}/status").read_text().split("VmRSS:")[1].split()[0]) * 1024
            cpu += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
            for f in glob.glob(f"/proc/{p}/task/*/children"):
                todo += [int(x) for x in Path(f).read_text().split()]
        except (OSError, IndexError, ValueError):
            pass
    return rss / 2**20, cpu


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(stack: ExitStack, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A subprocess in its own session (Ctrl-C reaches only us), stopped with its group at exit."""
    out = log.open("wb")
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )

    def stop() -> None:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        out.close()

    stack.callback(stop)
    return proc


def wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health/liveliness", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"proxy did not start:\n{log.read_text()[-4000:]}")


def proxy_config(plugin: bool) -> dict:
    params = {"model": "openai/gpt-4o-mini", "api_base": "os.environ/FAKE_UPSTREAM_URL", "api_key": "fake"}
    cfg: dict = {
        "model_list": [{"model_name": MODEL, "litellm_params": params}],
        "litellm_settings": {"num_retries": 0, "request_timeout": 30},
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
    }
    if plugin:
        cfg["litellm_settings"]["callbacks"] = ["litellm_credits.proxy.handler"]
        cfg["general_settings"]["custom_auth"] = "litellm_credits.auth.custom_auth"
    return cfg


def fund_accounts(side: Side, master: str, n: int) -> None:
    with httpx.Client(base_url=side.url, headers={"Authorization": f"Bearer {master}"}, timeout=60) as c:
        for i in range(n):
            user = f"bench-proxy-{i:02d}"
            r = c.post("/api/v1/admin/credits/accounts", json={"user_id": user})
            assert r.status_code == 201, r.text
            side.keys.append(r.json()["api_key"])
            side.users.append(user)
            r = c.post("/api/v1/admin/credits/allocate", json={"user_id": user, "amount": FUNDING})
            assert r.status_code == 200, r.text


def requester(client: httpx.AsyncClient, side: Side) -> Callable[[], Awaitable[None]]:
    keys = itertools.cycle(side.keys)

    async def op() -> None:
        auth = {"Authorization": f"Bearer {next(keys)}"}
        r = await client.post(
            side.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": h.chat(SYSTEM, "Say hello. ({n})")},
            headers=auth,
        )
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.text[:160]}")
        side.ok += 1

    return op


async def run(side: Side, op: Op, clients: int, label: str, seconds: float, warmup: float) -> h.Phase:
    """One measured phase (harness.measure), with the proxy's CPU per request answered."""
    cpu0, ok0 = usage(side.pid)[1], side.ok
    xacts0 = (await pg_stats(side.dsn))[0] if side.dsn else 0
    phase = await h.measure(label, op, clients=clients, seconds=seconds, warmup=warmup)
    answered = max(1, side.ok - ok0)
    phase.cpu["proxy ms/req"] = (usage(side.pid)[1] - cpu0) * 1000 / answered
    if side.dsn:
        # the proxy's own transactions (its settlements run after the answers: a few may fall
        # into the next phase, or the next side's)
        phase.cpu["pg xacts/req"] = ((await pg_stats(side.dsn))[0] - xacts0 - 2) / answered
    return phase


async def ab(sides: list[Side], ops: dict[str, Op], args: argparse.Namespace) -> float:
    """The A/B; returns A's rate (the median of its rounds' req/s)."""
    rounds: dict[str, list[h.Phase]] = {s.name: [] for s in sides}
    dsn = next(s.dsn for s in sides if s.dsn)
    before, ok0 = (await pg_stats(dsn))[1], sides[0].ok
    for r in range(args.rounds + 1):  # round 0 is the warm-up of each side, not counted
        for s in sides:
            label = f"round {r} {s.name}" if r else f"warm-up {s.name}"
            phase = await run(s, ops[s.name], args.clients, label, args.seconds, args.seconds / 5)
            print(phase.line("req"))
            if r:
                rounds[s.name].append(phase)
    print(f"\n== A/B: {args.clients} clients, {args.rounds} alternating rounds of {args.seconds} s a side")
    print("| side | req/s (median of rounds) | p50 ms | p99 ms | proxy CPU ms/req | postgres CPU ms/req |")
    print("|---|---:|---:|---:|---:|---:|")
    figures = {}
    for s, label in zip(sides, ("A: with litellm-credits", "B: without the plugin"), strict=True):
        ps = rounds[s.name]
        pooled = h.Phase(label, latencies=[x for p in ps for x in p.latencies])
        figures[s.name] = f = (
            statistics.median(p.rate for p in ps),
            pooled.pct(0.5),
            pooled.pct(0.99),
            statistics.median(p.cpu["proxy ms/req"] for p in ps),
            statistics.median(p.cpu.get("postgres", 0) * 1000 / max(1.0, p.rate) for p in ps),
        )
        errors = sum(p.errors for p in ps)
        print(
            f"| {label} | {f[0]:,.1f} | {f[1]:.2f} | {f[2]:.2f} | {f[3]:.2f} | {f[4]:.2f} |"
            + (f" errors: {errors}" if errors else "")
        )
    q = [x / y if y else float("nan") for x, y in zip(figures["A"], figures["B"], strict=True)]
    print(f"ratio A/B: req/s {q[0]:.3f}, p50 {q[1]:.3f}, p99 {q[2]:.3f}, proxy CPU per request {q[3]:.3f}")
    # each round of A beside the round of B right after it: the machine's drift between rounds
    # (one side moved by a quarter from one round to the next on a busy VM) cancels in a pair
    pairs = [a.rate / b.rate for a, b in zip(rounds["A"], rounds["B"], strict=True) if b.rate]
    if pairs:
        print(
            f"ratio A/B of req/s, median of the {len(pairs)} pairs of rounds: {statistics.median(pairs):.3f} "
            f"(pairs: {' '.join(f'{p:.2f}' for p in pairs)})"
        )
    if figures["A"][3] and figures["B"][3]:
        extra = figures["A"][3] - figures["B"][3]
        share = extra / figures["A"][3]
        note = "" if args.no_gc_freeze else "; A's start-up heap is frozen, B's not: --no-gc-freeze"
        print(f"the plugin's CPU in the proxy: {extra:+.2f} ms per request ({share:.1%} of A's{note})")
    xacts = statistics.median(p.cpu["pg xacts/req"] for p in rounds["A"])
    print(f"A's PostgreSQL transactions per request (median of rounds): {xacts:.2f}")
    await asyncio.sleep(1)  # statistics reach the server within a second
    after = (await pg_stats(dsn))[1]
    answered = max(1, sides[0].ok - ok0)
    print("A's work per request by table, over the whole A/B (scans, inserts, updates):")
    for name in sorted(after, key=lambda n: -sum(after[n]) + sum(before.get(n, (0, 0, 0)))):
        d = [x - y for x, y in zip(after[name], before.get(name, (0, 0, 0)), strict=True)]
        if any(d):
            print(f"    {name}: " + ", ".join(f"{v / answered:.2f}" for v in d))
    return figures["A"][0]


async def hook_histogram(side: Side) -> dict[float, float]:
    """Proxy ``side``'s pre-call hook histogram: observations at or under each bucket's edge."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(base_url=side.url, headers={"Authorization": f"Bearer {side.master}"}) as c:
        r = await c.get("/api/v1/admin/credits/metrics")
        r.raise_for_status()
    return {
        float(s.labels["le"]): s.value
        for family in text_string_to_metric_families(r.text)
        if family.name == "litellm_credits_pre_call_seconds"
        for s in family.samples
        if s.name.endswith("_bucket")
    }


async def hook_at_half(a: Side, op: Op, peak: float, args: argparse.Namespace) -> None:
    """A at half its peak rate (the A/B's median req/s), arrivals at a steady pace: the time the
    pre-call hook took inside the proxy, from A's own histogram (the issue's bar: p99 <= 5 ms at
    half the peak rate), beside the requests' latency as the clients saw it."""
    rate, seconds = peak / 2, 3 * args.seconds  # (3 rounds' time: a p99 of 1,000 hooks or more)
    await h.measure_rate("warm-up", op, rate=rate, seconds=args.seconds / 5, warmup=0)
    before = await hook_histogram(a)
    label = f"A at half its peak ({rate:,.1f}/s)"
    phase = await h.measure_rate(label, op, rate=rate, seconds=seconds, warmup=0)
    after = await hook_histogram(a)
    cum = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = cum.get(math.inf, 0.0)
    if not total:
        print(f"\n== the pre-call hook at half A's peak: no observations ({phase.line('req')})")
        return
    p99 = next(le for le, n in cum.items() if n >= 0.99 * total)
    edges = [le for le in cum if le != math.inf]
    shares = ", ".join(f"<= {le * 1000:g} ms {cum[le] / total:.2%}" for le in edges if 0.001 <= le <= 0.025)
    bound = f"<= {p99 * 1000:g} ms" if p99 != math.inf else f"> {edges[-1] * 1000:g} ms"
    print(
        f"\n== the pre-call hook inside A at half its peak ({rate:,.1f} req/s, open loop, {seconds:g} s): "
        f"{int(total):,} hooks, p99 {bound} (its histogram's buckets); {shares}"
    )
    print("    requests as the clients saw them: " + phase.line("req").split(": ", 1)[1])


async def soak(a: Side, op: Op, args: argparse.Namespace) -> None:
    warm = 5 if args.quick else 60
    series: list[float] = []

    async def sample() -> None:
        await asyncio.sleep(warm)
        while True:
            series.append(usage(a.pid)[0])
            await asyncio.sleep(max(1.0, (args.soak - warm) / 5))

    sampler = asyncio.create_task(sample())
    phase = await run(a, op, args.clients, "soak A", max(1, args.soak - warm), warm)
    sampler.cancel()
    series.append(usage(a.pid)[0])
    print(
        f"\n== soak: proxy A, {args.clients} clients, {args.soak} s ({warm} s warm-up)\n{phase.line('req')}"
    )
    growth = series[-1] - series[0]
    print(
        f"RSS after warm-up {series[0]:.1f} MB, at the end {series[-1]:.1f} MB, growth {growth:+.1f} MB "
        f"over {phase.ops:,} requests ({growth * 1024 / max(1, phase.ops):.2f} KB/request); "
        "samples: " + ", ".join(f"{x:.0f}" for x in series)
    )


def frame(text: str) -> tuple[str, str]:
    """py-spy's 'func (path:line)' -> (func, path)."""
    func, _, rest = text.partition(" (")
    return func, rest.rsplit(":", 1)[0]


def ours(path: str) -> str:
    return path.split("litellm_credits/", 1)[1] if "litellm_credits/" in path else ""


def library(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/")[0].removesuffix(".py")
    if ours(path):
        return "litellm_credits"
    p = Path(path)
    return p.stem if p.parent.name.startswith("python3") else p.parent.name or path


def analyse(raw: Path) -> None:
    total = mine = 0
    incl, self_, nearest, leaves = Counter[str](), Counter[str](), Counter[str](), Counter[str]()
    leaf_of: dict[str, Counter[str]] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n, frames = int(count), [frame(f) for f in stack.split(";")]
        total += n
        named = [f"{ours(path)}:{func}" for func, path in frames if ours(path)]
        if not named:
            continue
        mine += n
        incl.update(dict.fromkeys(named, n))
        nearest[named[-1]] += n  # the innermost frame of ours, with the libraries it calls
        leaf = library(frames[-1][1])
        leaf_of.setdefault(named[-1], Counter())[leaf] += n
        leaves[leaf] += n
        if ours(frames[-1][1]):
            self_[named[-1]] += n
    if not total:
        print("py-spy recorded no samples")
        return
    print(f"samples holding the GIL: {total:,}; litellm_credits on the stack: {mine:,} = {mine / total:.1%}")
    print("\n| litellm_credits function | self | own + libraries it calls | inclusive | mostly in |")
    print("|---|---:|---:|---:|---|")
    for name, n in nearest.most_common(20):
        top = leaf_of[name].most_common(1)[0][0]
        print(f"| {name} | {self_[name] / total:.1%} | {n / total:.1%} | {incl[name] / total:.1%} | {top} |")
    print("inclusive: " + ", ".join(f"{k} {n / total:.1%}" for k, n in incl.most_common(8)))
    print("leaf library: " + ", ".join(f"{k} {n / total:.1%}" for k, n in leaves.most_common(10)))


async def profile(a: Side, op: Op, args: argparse.Namespace, tmp: Path, stack: ExitStack) -> None:
    spy = shutil.which("py-spy", path=f"{BIN}:{os.environ.get('PATH', '')}")
    print(f"\n== profile: proxy A under {args.clients} clients, py-spy for {args.profile_seconds} s")
    if spy is None:
        print("py-spy not found: pip install py-spy")
        return
    raw, log = tmp / "py-spy.txt", tmp / "py-spy.log"
    cmd = [spy, "record", "--pid", str(a.pid), "--subprocesses", "--function", "--gil", "--format", "raw"]
    cmd += ["--rate", "100", "--duration", str(args.profile_seconds), "--output", str(raw)]

    async def record() -> int | None:
        await asyncio.sleep(2)  # after the warm-up
        proc = spawn(stack, cmd, log)
        while proc.poll() is None:
            await asyncio.sleep(0.2)
        return proc.returncode

    spying = asyncio.create_task(record())
    print((await run(a, op, args.clients, "profile A", args.profile_seconds + 1, 2)).line("req"))
    code = await spying
    if code != 0 or not raw.exists():
        print(f"py-spy failed ({code}), ptrace may be denied here:\n{log.read_text()[-1500:]}")
        return
    analyse(raw)


async def check_charged(dsn: str, a: Side, master: str) -> None:
    """Every request A answered is one settled usage event, charged to a funded account."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + 30
        while True:  # settlement runs after the response: let it catch up
            events, charged, rows, holds = await conn.fetchrow(CHECK_SQL)
            if events >= a.ok or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        await conn.close()
    async with httpx.AsyncClient(base_url=a.url, headers={"Authorization": f"Bearer {master}"}) as c:
        left = [
            Decimal((await c.get(f"/api/v1/admin/credits/accounts/{u}")).json()["balance"]) for u in a.users
        ]
    spent = Decimal(FUNDING) * len(a.users) - sum(left)
    print(
        f"\n== charges ({'OK' if events == a.ok and spent > 0 and holds == 0 else 'MISMATCH'}): A answered "
        f"{a.ok:,} requests with 200; {events:,} settled usage events charging {Decimal(charged) / 10**6} "
        f"credits, {rows:,} usage rows in the ledger, {holds} open holds; balances fell by {spent} credits"
    )


async def load_phases(
    a: Side, b: Side, dsn: str, master: str, args: argparse.Namespace, tmp: Path, stack: ExitStack
) -> None:
    conn = await asyncpg.connect(dsn)
    print("\n".join(["== machine", *await h.machine(conn)]))
    await conn.close()
    limits = httpx.Limits(max_connections=2 * args.clients, max_keepalive_connections=2 * args.clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        ops = {s.name: requester(client, s) for s in (a, b)}
        if args.rounds:
            peak = await ab([a, b], ops, args)
            await hook_at_half(a, ops["A"], peak, args)
        if args.soak:
            await soak(a, ops["A"], args)
        if args.profile:
            await profile(a, ops["A"], args, tmp, stack)
    await check_charged(dsn, a, master)


def main(args: argparse.Namespace) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where a shell ignored it
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))  # cleans up like Ctrl-C
    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="credits-bench-proxy-"))
        if args.keep:
            stack.callback(print, f"logs and py-spy output kept in {tmp}")
        else:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        server, pg_tmp = asyncio.run(h.admin_dsn(False))
        if pg_tmp is not None:
            stack.callback(h.stop_embedded, pg_tmp)
        name = f"credits_bench_proxy_{secrets.token_hex(4)}"
        asyncio.run(h.admin(server, f'CREATE DATABASE "{name}"'))
        stack.callback(lambda: asyncio.run(h.admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))
        dsn = h.with_database(server, name)
        redis_url = os.environ.get("CREDITS_REDIS_URL", "redis://127.0.0.1:6379/9")
        prefix = f"credits-bench-{secrets.token_hex(4)}"

        def clean_redis() -> None:
            import redis

            try:
                with redis.Redis.from_url(redis_url) as r:
                    for key in r.scan_iter(match=prefix + "*", count=1000):
                        r.delete(key)
            except redis.RedisError as exc:
                print(f"could not remove the Redis keys {prefix}*: {exc}", file=sys.stderr)

        stack.callback(clean_redis)  # registered before the proxies: runs after they stop
        up = spawn(stack, [sys.executable, "-c", UPSTREAM], tmp / "upstream.log")
        deadline = time.monotonic() + 20
        while not (tmp / "upstream.log").read_text().strip():
            if up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("fake upstream did not start: " + (tmp / "upstream.log").read_text())
            time.sleep(0.1)
        upstream = (tmp / "upstream.log").read_text().split()[0]
        master = "sk-master-" + secrets.token_urlsafe(24)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITS_") and k != "DATABASE_URL"}
        env.update(
            CREDITS_DATABASE_URL=dsn,
            CREDITS_REDIS_URL=redis_url,
            CREDITS_REDIS_PREFIX=prefix,
            CREDITS_CONFIG=str(ROOT / "config" / "credits.yaml"),
            LITELLM_MASTER_KEY=master,
            FAKE_UPSTREAM_URL=upstream,
            LITELLM_LOCAL_MODEL_COST_MAP="True",
            LITELLM_LOG="ERROR",
            CREDITS_GC_FREEZE="false" if args.no_gc_freeze else "true",
        )
        sides = {}
        for side, plugin in (("A", True), ("B", False)):
            # the config lies in a temporary directory: none of our modules sits beside it
            cfg, log, port = tmp / f"proxy-{side}.yaml", tmp / f"proxy-{side}.log", free_port()
            cfg.write_text(yaml.safe_dump(proxy_config(plugin)))
            cmd = [str(BIN / "litellm"), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
            sides[side] = (spawn(stack, cmd, log, env), f"http://127.0.0.1:{port}", log)
        for proc, url, log in sides.values():
            wait_healthy(proc, url, log)
        a = Side("A", sides["A"][1], sides["A"][0].pid, [], dsn=dsn, master=master)
        b = Side("B", sides["B"][1], sides["B"][0].pid, [master])
        fund_accounts(a, master, args.clients)
        print(f"== proxies up: A {a.url} (pid {a.pid}), B {b.url} (pid {b.pid}); upstream {upstream}")
        asyncio.run(load_phases(a, b, dsn, master, args, tmp, stack))
        for side, (_, _, log) in sides.items():
            bad = [ln for ln in log.read_text(errors="replace").splitlines() if "ERROR" in ln or "WARN" in ln]
            print(
                f"proxy {side} log: {len(bad)} warning/error lines"
                + "".join(f"\n    {x[:300]}" for x in bad[:3])
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2-s rounds, 20-s soak, 10-s profile")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per side (default 6; 0: no A/B)")
    parser.add_argument("--seconds", type=float, default=10, help="seconds per round (default 10)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--soak", type=int, default=None, help="soak seconds (default 600; 0: none)")
    parser.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="A without the plugin's freeze of the start-up heap (CREDITS_GC_FREEZE=false), as B",
    )
    parser.add_argument("--profile", action="store_true", help="sample proxy A with py-spy under load")
    parser.add_argument("--profile-seconds", type=int, default=30, help="py-spy duration (default 30)")
    parser.add_argument("--keep", action="store_true", help="keep the proxy logs and py-spy output")
    ns = parser.parse_args()
    if ns.quick:
        ns.seconds, ns.profile_seconds = 2, min(ns.profile_seconds, 10)
    if ns.soak is None:
        ns.soak = 20 if ns.quick else 600
    try:
        main(ns)
    except KeyboardInterrupt:
        print("interrupted; subprocesses, scratch database and Redis keys removed", file=sys.stderr)
        sys.exit(130)
