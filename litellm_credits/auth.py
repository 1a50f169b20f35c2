"""API keys issued by this plugin, and a ``custom_auth`` function for the proxy.

Use it when the proxy has no LiteLLM key database::

    general_settings:
      master_key: os.environ/LITELLM_MASTER_KEY
      custom_auth: litellm_credits.auth.custom_auth

A key is ``sk-cr-`` followed by 32 random bytes (URL-safe base64). It is shown once, when it is
created; the database keeps only its SHA-256. The proxy's master key authenticates as proxy
admin.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from .errors import AuthenticationError, CreditsError, ServiceUnavailable, to_proxy_exception
from .identity import WHEN_SHORT_KEY
from .ledger import UNAVAILABLE_ERRORS

KEY_PREFIX = "sk-cr-"
ROLE_ADMIN = "admin"
ROLE_SERVICE = "service"
ROLE_USER = "user"

SQL_INSERT_KEY = """
INSERT INTO credits.api_keys (key_hash, subject_id, key_prefix, role, name, when_short)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id
"""
KEY_COLUMNS = "id, subject_id, key_prefix, role, name, when_short, created_at, revoked_at"
SQL_LIST_KEYS = f"SELECT {KEY_COLUMNS} FROM credits.api_keys WHERE subject_id = $1 ORDER BY id"
SQL_REVOKE_KEY = f"""
UPDATE credits.api_keys SET revoked_at = now()
WHERE id = $1 AND revoked_at IS NULL
RETURNING {KEY_COLUMNS}, key_hash
"""
SQL_GET_KEY = f"SELECT {KEY_COLUMNS} FROM credits.api_keys WHERE id = $1"
SQL_LOOKUP_KEY = """
SELECT subject_id, role, when_short FROM credits.api_keys WHERE key_hash = $1 AND revoked_at IS NULL
"""


@dataclass(frozen=True)
class IssuedKey:
    key: str
    subject_id: str
    role: str
    prefix: str
    id: int = 0
    when_short: str | None = None


@dataclass(frozen=True)
class KeyOwner:
    """Who a live key belongs to, and what it chose: its account, role and ``when_short``."""

    subject_id: str
    role: str
    when_short: str | None = None


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


async def issue_key(
    conn: asyncpg.Pool | asyncpg.Connection,
    subject_id: str,
    *,
    role: str = ROLE_USER,
    name: str | None = None,
    when_short: str | None = None,
) -> IssuedKey:
    """A new key for the account (its ``when_short`` overrides the tier's, when given)."""
    key = new_key()
    prefix = key[: len(KEY_PREFIX) + 6]
    key_id = await conn.fetchval(SQL_INSERT_KEY, hash_key(key), subject_id, prefix, role, name, when_short)
    return IssuedKey(key, subject_id, role, prefix, id=key_id, when_short=when_short)


def key_json(row: asyncpg.Record) -> dict[str, Any]:
    """What may be shown of a key: never the key, only its id, prefix and state."""
    return {
        "id": row["id"],
        "user_id": row["subject_id"],
        "prefix": row["key_prefix"],
        "role": row["role"],
        "name": row["name"],
        "when_short": row["when_short"],
        "created_at": row["created_at"].isoformat(),
        "revoked_at": row["revoked_at"].isoformat() if row["revoked_at"] else None,
    }


async def list_keys(conn: asyncpg.Pool | asyncpg.Connection, subject_id: str) -> list[dict[str, Any]]:
    return [key_json(r) for r in await conn.fetch(SQL_LIST_KEYS, subject_id)]


# told the hash of a key that was just revoked (the cache forgets it)
Revoked = Callable[[bytes], Awaitable[None]]


async def revoke_key(
    conn: asyncpg.Pool | asyncpg.Connection, key_id: int, *, on_revoked: Revoked | None = None
) -> dict[str, Any] | None:
    """Revoke a live key; None if there is no such live key."""
    row = await conn.fetchrow(SQL_REVOKE_KEY, key_id)
    if row is None:
        return None
    if on_revoked is not None:
        await on_revoked(bytes(row["key_hash"]))
    return key_json(row)


async def rotate_key(
    conn: asyncpg.Connection, key_id: int, *, on_revoked: Revoked | None = None
) -> IssuedKey | None:
    """Revoke a live key and issue its successor (same account, role, name and when_short),
    atomically."""
    async with conn.transaction():
        row = await conn.fetchrow(SQL_REVOKE_KEY, key_id)
        if row is None:
            return None
        issued = await issue_key(
            conn, row["subject_id"], role=row["role"], name=row["name"], when_short=row["when_short"]
        )
    if on_revoked is not None:
        await on_revoked(bytes(row["key_hash"]))
    return issued


async def lookup_key(conn: asyncpg.Pool | asyncpg.Connection, key: str) -> KeyOwner | None:
    """Who a live key belongs to, else None."""
    row = await conn.fetchrow(SQL_LOOKUP_KEY, hash_key(key))
    return KeyOwner(row["subject_id"], row["role"], row["when_short"]) if row else None


def _master_key() -> str | None:
    from litellm.proxy import proxy_server

    key = proxy_server.master_key
    return key if isinstance(key, str) and key else None


def is_master_key(api_key: str, master_key: str | None) -> bool:
    return bool(master_key) and hmac.compare_digest(api_key.encode(), str(master_key).encode())


def _strip_bearer(api_key: str | None) -> str:
    key = (api_key or "").strip()
    if key.lower().startswith("bearer "):
        key = key[7:].strip()
    return key


async def custom_auth(request: Any, api_key: str) -> Any:
    """LiteLLM ``custom_auth``: the master key is admin, plugin keys are their account."""
    from litellm.proxy._types import LitellmUserRoles, UserAPIKeyAuth

    from .process import process_runtime

    runtime = process_runtime()
    key = _strip_bearer(api_key)
    try:
        if not key:
            raise AuthenticationError("missing API key; send 'Authorization: Bearer <key>'")
        if is_master_key(key, _master_key()):
            return UserAPIKeyAuth(api_key=key, user_role=LitellmUserRoles.PROXY_ADMIN)
        if not key.startswith(KEY_PREFIX):
            raise AuthenticationError("invalid API key")
        digest = hash_key(key).hex()
        try:
            found = await runtime.lookup_key(key, digest)
        except UNAVAILABLE_ERRORS:
            raise ServiceUnavailable("the credit ledger is unavailable; try again") from None
        if found is None:
            raise AuthenticationError("invalid API key")
    except CreditsError as err:
        raise to_proxy_exception(err) from None
    return _key_auth(digest, found)


# The UserAPIKeyAuth of each key seen lately, by its digest and owner, with the names of its
# fields that hold a list, dict or set: LiteLLM's pydantic model costs about 40 us to build and
# 6 to copy. Each request gets its own copy (LiteLLM sets fields on it) with its own containers;
# a key revoked or changed is a new owner, or no owner at all.
_AUTHS: dict[tuple[str, KeyOwner], tuple[Any, tuple[str, ...]]] = {}
_AUTHS_KEPT = 1024  # (about 5.5 KB each)


def _key_auth(digest: str, found: KeyOwner) -> Any:
    from litellm.proxy._types import LitellmUserRoles, UserAPIKeyAuth

    kept = _AUTHS.get((digest, found))
    if kept is None:
        metadata = {"credits_role": found.role}
        if found.when_short is not None:
            metadata[WHEN_SHORT_KEY] = found.when_short
        template = UserAPIKeyAuth(
            api_key=digest,
            token=digest,
            user_id=found.subject_id,
            user_role=LitellmUserRoles.PROXY_ADMIN
            if found.role == ROLE_ADMIN
            else LitellmUserRoles.INTERNAL_USER,
            metadata=metadata,
        )
        containers = tuple(
            name for name, value in template.__dict__.items() if isinstance(value, list | dict | set)
        )
        if len(_AUTHS) >= _AUTHS_KEPT:
            _AUTHS.pop(next(iter(_AUTHS)), None)  # the oldest
        kept = _AUTHS[(digest, found)] = (template, containers)
    template, containers = kept
    values = template.__dict__
    return template.model_copy(update={name: values[name].copy() for name in containers})


__all__ = [
    "KEY_PREFIX",
    "IssuedKey",
    "KeyOwner",
    "custom_auth",
    "hash_key",
    "issue_key",
    "lookup_key",
    "new_key",
]
