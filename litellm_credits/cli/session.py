"""One command's connection to the ledger: the database it resolves, a small pool, and the
runtime whose change announcements reach the proxies' caches (through Redis) like their own."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import typer

from .. import db, migrations
from ..errors import CreditsError
from ..ledger import Ledger
from ..money import AmountError
from ..runtime import Runtime
from ..settings import Settings
from .output import CliError, err

T = TypeVar("T")


@dataclass
class Session:
    settings: Settings
    dsn: str
    pool: asyncpg.Pool
    runtime: Runtime
    ledger: Ledger


def embedded_note(settings: Settings) -> None:
    """Say which embedded database a command uses: a second one, made by running from another
    directory, looks like a database whose accounts have vanished."""
    if not settings.database_url:
        print(
            f"litellm-credits: embedded PostgreSQL under {settings.data_dir} "
            "(set CREDITS_DATA_DIR or CREDITS_DATABASE_URL for another)",
            file=sys.stderr,
            flush=True,
        )


async def resolve_dsn(settings: Settings) -> str:
    embedded_note(settings)
    return await db.resolve_dsn(settings.database_url, settings.data_dir)


@asynccontextmanager
async def session(*, migrate: bool = True) -> AsyncIterator[Session]:
    """The ledger, on a migrated schema (unless ``auto_migrate`` is off or ``migrate`` False)."""
    settings = Settings.load()
    dsn = await resolve_dsn(settings)
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    runtime = Runtime(settings.model_copy(update={"database_url": dsn, "sweeper": False}))
    try:
        if migrate and settings.auto_migrate:
            async with pool.acquire() as conn:
                await migrations.migrate(conn)
        yield Session(settings, dsn, pool, runtime, Ledger(pool, on_change=runtime.accounts_changed))
    finally:
        await runtime.close()
        await pool.close()


def run(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one command's coroutine; refused input ends it with a one-line error and exit code 2
    (or the ``CliError``'s own)."""
    try:
        return asyncio.run(work())
    except CliError as e:
        err().print(f"error: {e}", markup=False)
        raise typer.Exit(e.code) from None
    except (CreditsError, AmountError) as e:
        err().print(f"error: {e}", markup=False)
        raise typer.Exit(2) from None
    except (OSError, asyncpg.PostgresConnectionError) as e:
        err().print(f"error: cannot reach the database: {e}", markup=False)
        raise typer.Exit(2) from None
    except asyncpg.PostgresError as e:
        if not ended_by_the_database(e):
            raise  # a fault of the command's own (its traceback is what a report needs)
        err().print(f"error: the database ended the command: {e} (SQLSTATE {e.sqlstate})", markup=False)
        raise typer.Exit(1) from None


def ended_by_the_database(e: asyncpg.PostgresError) -> bool:
    """An error of the server's circumstances, not of the command: a lock timeout (the DSN's own),
    an idle transaction ended, a deadlock or serialization failure (class 40), no resources left
    (class 53: connections, disk, memory), a statement timeout or an operator's or a crash's
    shutdown (class 57)."""
    state = e.sqlstate or ""
    return state in ("55P03", "25P03") or state[:2] in ("40", "53", "57")


__all__ = ["Session", "embedded_note", "resolve_dsn", "run", "session"]
