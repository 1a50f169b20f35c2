"""The sweep: holds past their TTL resolved by policy, and grants past their expiry written off.

Every proxy process runs it every ``sweep_interval_seconds``, and ``litellm-credits sweep`` runs it
on demand. A pass claims the sweep first, with a PostgreSQL advisory lock held for the pass: passes
never overlap over all hosts, so they do not read and resolve the same oldest expired holds side by
side and wait on each other's row locks (which was safe, each hold ends once, but wasted). A process
that finds the sweep claimed skips its turn; the command waits for it (however long: a
``lock_timeout`` or ``statement_timeout`` in the DSN does not cut that wait short).

The lock is a transaction lock (``pg_try_advisory_xact_lock``) in a transaction of its own, on a
connection opened for the pass; the pass's work runs on the ledger's pool. So:

- the lock ends with the transaction whatever happens: the pass ends (rolled back), fails or is
  cancelled (the connection is closed), the process dies or the network is cut (the server ends
  the transaction when it has been idle for ``hold_for`` seconds: ``idle_in_transaction_session_
  timeout``, set for that transaction only). A stuck process cannot stop every host's sweep. The
  pass itself is never cut short (a batch cancelled after it left would commit without its
  caches invalidated): it is bounded by ``batch``, and one slow enough to outlive the claim only
  overlaps another, which is safe;
- it works through PgBouncer in transaction mode (a session lock would stay on a server
  connection PgBouncer keeps);
- it never holds one of the pool's connections (the pass's own resolutions need them: a pool of
  one or two would wait on itself).

Before connecting, a read through the pool tells whether a pass is under way: a process that
would only skip does not open a connection for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import asyncpg

from .grants import Grants, Sweep
from .ledger import Ledger

# pg_advisory_lock key of the sweep ("llmswp"); migrations use "llmcrd"
SWEEP_LOCK_ID = 0x6C6C6D737770


@dataclass(frozen=True)
class Swept:
    """What one pass did: holds resolved, and grants expired."""

    holds: int
    grants: Sweep


SQL_CLAIMED = """
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND classid = ($1::bigint >> 32)::oid AND objid = ($1::bigint & 4294967295)::oid AND objsubid = 1
)
"""


def claim_seconds(interval: float) -> float:
    """How long a pass may keep the claim (idle, on the server's clock): several intervals, and
    never under a minute."""
    return max(60.0, 4 * interval)


async def sweep(
    ledger: Ledger,
    dsn: str,
    *,
    policy: Literal["void", "capture"],
    batch: int,
    hold_for: float,
    wait: bool = False,
) -> Swept | None:
    """One pass of the sweep, or None when another process is sweeping (``wait``: wait for it
    instead). ``dsn``: the ledger's database, where the claim is taken; ``hold_for``: seconds
    after which the server releases the claim, whatever this process does."""
    if not wait and await ledger.pool.fetchval(SQL_CLAIMED, SWEEP_LOCK_ID):
        return None
    conn = await asyncpg.connect(
        dsn,
        timeout=10,
        server_settings={"application_name": f"litellm-credits pid {os.getpid()} sweep"},
    )
    try:
        await conn.execute("BEGIN")
        await conn.execute(
            f"SET LOCAL idle_in_transaction_session_timeout = {max(1, round(hold_for * 1000))}"
        )
        if wait:
            # the wait ends with the pass under way (whose claim ends as above), not with a
            # lock_timeout or statement_timeout the DSN gives every statement
            await conn.execute("SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0")
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SWEEP_LOCK_ID)
        elif not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", SWEEP_LOCK_ID):
            return None
        return await _pass(ledger, policy, batch)
    finally:
        await _close(conn)


async def _pass(ledger: Ledger, policy: Literal["void", "capture"], batch: int) -> Swept:
    holds = await ledger.expire(policy=policy, batch=batch)
    grants = await Grants(ledger.pool, ledger.changed).expire_due(batch=batch)
    return Swept(holds, grants)


async def _close(conn: asyncpg.Connection) -> None:
    """Closed (its transaction, and the lock, end with it), whatever else went wrong."""
    try:
        await conn.close(timeout=5)
    except Exception:  # the server is gone or silent: nothing holds the lock but this socket
        conn.terminate()
    except BaseException:  # cancelled amid the goodbye
        conn.terminate()
        raise


__all__ = ["SWEEP_LOCK_ID", "Swept", "claim_seconds", "sweep"]
