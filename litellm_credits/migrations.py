"""Numbered, append-only SQL migrations, applied in order under an advisory lock.

Each file in ``sql/migrations/NNNN_name.sql`` runs in its own transaction together with the
row that records it, so a failing migration leaves the database exactly as it was. Several
processes starting at once serialise on the lock; the late ones find nothing to do.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

# any stable 64-bit number; the same for every process of this plugin
ADVISORY_LOCK_ID = 0x6C6C6D637264  # "llmcrd"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_TABLE = re.compile(r"CREATE TABLE (credits\.\w+)", re.IGNORECASE)
_VIEW = re.compile(r"CREATE (?:OR REPLACE )?VIEW (credits\.\w+)", re.IGNORECASE)
_INDEX = re.compile(r"CREATE (?:UNIQUE )?INDEX (?:IF NOT EXISTS )?(\w+)", re.IGNORECASE)

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS credits;
CREATE TABLE IF NOT EXISTS credits.schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass
class CheckReport:
    pending: list[Migration]
    changed: list[int]
    missing: list[str]

    @property
    def ok(self) -> bool:
        return not (self.pending or self.changed or self.missing)


def migrations_dir() -> Path:
    """``sql/migrations`` inside the installed wheel, else the source tree's."""
    packaged = Path(str(resources.files("litellm_credits"))) / "sql" / "migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql" / "migrations"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    found = []
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise ValueError(f"migration file name must look like 0001_name.sql: {path.name}")
        found.append(Migration(int(m.group(1)), m.group(2), path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError("two migrations share a version number")
    return found


async def _applied(conn: asyncpg.Connection) -> dict[int, str]:
    exists = await conn.fetchval("SELECT to_regclass('credits.schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM credits.schema_migrations")
    return {r["version"]: r["checksum"] for r in rows}


async def migrate(conn: asyncpg.Connection, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply every pending migration; returns the ones applied (none on a second run)."""
    migrations = load_migrations() if migrations is None else migrations
    await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_ID)
    try:
        async with conn.transaction():
            await conn.execute(_BOOTSTRAP)
        done = await _applied(conn)
        applied = []
        for m in migrations:
            if m.version in done:
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO credits.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
            applied.append(m)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_ID)


def expected_objects(migrations: list[Migration]) -> tuple[set[str], set[str]]:
    """Tables/views (qualified) and index names the migrations create."""
    relations: set[str] = set()
    indexes: set[str] = set()
    for m in migrations:
        relations.update(x.lower() for x in _TABLE.findall(m.sql) + _VIEW.findall(m.sql))
        indexes.update(x.lower() for x in _INDEX.findall(m.sql))
    return relations, indexes


async def check(conn: asyncpg.Connection, migrations: list[Migration] | None = None) -> CheckReport:
    """What is pending, which applied files changed, and which expected objects are missing."""
    migrations = load_migrations() if migrations is None else migrations
    done = await _applied(conn)
    pending = [m for m in migrations if m.version not in done]
    changed = [m.version for m in migrations if m.version in done and done[m.version] != m.checksum]
    relations, indexes = expected_objects([m for m in migrations if m.version in done])
    missing = []
    for rel in sorted(relations):
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", rel):
            missing.append(rel)
    for idx in sorted(indexes):
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"credits.{idx}"):
            missing.append(f"index credits.{idx}")
    return CheckReport(pending=pending, changed=changed, missing=missing)


__all__ = [
    "CheckReport",
    "Migration",
    "check",
    "expected_objects",
    "load_migrations",
    "migrate",
    "migrations_dir",
]
