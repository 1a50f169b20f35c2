"""The sweep: holds past their TTL resolved by policy, and grants past their expiry written off.

Every proxy process runs it every ``sweep_interval_seconds``, and ``litellm-credits sweep`` runs it
on demand. A pass claims the sweep first, with a PostgreSQL advisory lock held for the pass: one
pass at a time over all hosts, so N hosts do not read and resolve the same oldest expired holds N
times over (which was safe, each hold ends once, but N times the work and the lock waits). A
process that finds the sweep claimed skips its turn; the command waits for it.

The lock is held on a connection of its own, opened for the pass and closed after it (closing it
releases the lock, whatever happened): not a pooled one, which the pass's own resolutions could
need (a pool of one or two connections would wait on itself), and which would go back to the pool
still holding the lock if its release failed (the pool's reset does not unlock: see
``db._keep_session``).
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


async def sweep(
    ledger: Ledger,
    dsn: str,
    *,
    policy: Literal["void", "capture"],
    batch: int,
    wait: bool = False,
) -> Swept | None:
    """One pass of the sweep, or None when another process holds the sweep (``wait``: wait for
    it instead). ``dsn``: the ledger's database, where the claim is taken."""
    conn = await asyncpg.connect(
        dsn, server_settings={"application_name": f"litellm-credits pid {os.getpid()} sweep"}
    )
    try:
        if wait:
            await conn.execute("SELECT pg_advisory_lock($1)", SWEEP_LOCK_ID)
        elif not await conn.fetchval("SELECT pg_try_advisory_lock($1)", SWEEP_LOCK_ID):
            return None
        holds = await ledger.expire(policy=policy, batch=batch)
        grants = await Grants(ledger.pool, ledger.changed).expire_due(batch=batch)
        return Swept(holds, grants)
    finally:
        await _close(conn)


async def _close(conn: asyncpg.Connection) -> None:
    """Closed, and the lock released with the session, whatever else went wrong."""
    try:
        await conn.close(timeout=5)
    except Exception:  # the server is gone or silent: nothing holds the lock but this socket
        conn.terminate()
    except BaseException:  # cancelled amid the goodbye
        conn.terminate()
        raise


__all__ = ["SWEEP_LOCK_ID", "Swept", "sweep"]
