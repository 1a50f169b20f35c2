"""Secrets at rest: provider API keys and webhook signing secrets encrypted with Fernet, under
keys that can be rotated.

``CREDITS_ENCRYPTION_KEYS`` is a comma-separated list of Fernet keys, the current one first;
the others only decrypt (``MultiFernet``), until ``litellm-credits rotate-keys`` has re-encrypted
every stored secret under the current key and they can be dropped.

    >>> box = SecretBox([Fernet.generate_key().decode()])
    >>> token = box.encrypt("sk-or-v1-abc...wxyz")
    >>> box.decrypt(token)
    Secret('…wxyz')

Lookups and de-duplication use a keyed hash (HMAC-SHA-256), never the plaintext; a hash is
made under every configured key, so a secret stored before a rotation is still found. A
decrypted value is a :class:`Secret`, whose ``repr`` and ``str`` show only its last four
characters, so it cannot leak into a log line or an exception by accident.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .errors import CreditsError

_LOOKUP_CONTEXT = b"litellm-credits lookup v1"


class EncryptionNotConfigured(CreditsError):
    status = 503
    type = "encryption_not_configured"


class UndecryptableSecret(CreditsError):
    type = "secret_unreadable"


def mask(value: str) -> str:
    """The last four characters, for display; never the secret itself."""
    return "…" + value[-4:] if len(value) > 8 else "…"


class Secret:
    """A decrypted secret that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    @property
    def tail(self) -> str:
        return mask(self._value)

    def __repr__(self) -> str:
        return f"Secret({self.tail!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)


SQL_CIPHERTEXT_PAGE = """
SELECT subject_id, encrypted_key FROM credits.openrouter_accounts
WHERE subject_id > $1 ORDER BY subject_id LIMIT $2
"""
# compare-and-swap: a row changed meanwhile (by a concurrent rotation) is left to that one
SQL_SWAP_CIPHERTEXT = """
UPDATE credits.openrouter_accounts SET encrypted_key = $3, key_hash = $4
WHERE subject_id = $1 AND encrypted_key = $2
"""
# webhook endpoints' signing secrets: the current one, and the previous one while it still signs
# (past previous_until it is never read again: left as it is)
_SWAP_TRIES = 5  # an endpoint whose secret keeps changing under the run is reported, not chased
_WEBHOOK_CIPHERTEXT = "id, secret, previous_secret, coalesce(previous_until > now(), false) AS previous_valid"
SQL_WEBHOOK_CIPHERTEXT_PAGE = f"""
SELECT {_WEBHOOK_CIPHERTEXT} FROM credits.webhook_endpoints WHERE id > $1 ORDER BY id LIMIT $2
"""
SQL_WEBHOOK_CIPHERTEXT = f"SELECT {_WEBHOOK_CIPHERTEXT} FROM credits.webhook_endpoints WHERE id = $1"
SQL_SWAP_WEBHOOK_CIPHERTEXT = """
UPDATE credits.webhook_endpoints SET secret = $4, previous_secret = $5
WHERE id = $1 AND secret = $2 AND previous_secret IS NOT DISTINCT FROM $3
"""


class SecretBox:
    """Encrypts, decrypts, rotates and hashes secrets under the configured keys."""

    def __init__(self, keys: Sequence[str]) -> None:
        keys = [k.strip() for k in keys if k.strip()]
        if not keys:
            raise EncryptionNotConfigured(
                "no encryption key configured: set CREDITS_ENCRYPTION_KEYS to a Fernet key "
                "(python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
            )
        try:
            self._fernets = [Fernet(k.encode()) for k in keys]
        except ValueError:
            raise EncryptionNotConfigured(
                "CREDITS_ENCRYPTION_KEYS holds a value that is not a Fernet key (32 url-safe base64 bytes)"
            ) from None
        self._multi = MultiFernet(self._fernets)
        self._lookup_keys = [hmac.new(k.encode(), _LOOKUP_CONTEXT, hashlib.sha256).digest() for k in keys]

    @classmethod
    def from_env_value(cls, value: str | None) -> SecretBox:
        return cls((value or "").split(","))

    def __repr__(self) -> str:
        return f"SecretBox({len(self._fernets)} keys)"

    def encrypt(self, plaintext: str) -> bytes:
        return self._multi.encrypt(plaintext.encode())

    def decrypt(self, token: bytes) -> Secret:
        try:
            return Secret(self._multi.decrypt(bytes(token)).decode())
        except InvalidToken:
            raise UndecryptableSecret(
                "a stored secret cannot be decrypted with any configured key (was its key removed?)"
            ) from None

    def is_current(self, token: bytes) -> bool:
        """Whether ``token`` is already encrypted under the current (first) key."""
        try:
            self._fernets[0].decrypt(bytes(token))
        except InvalidToken:
            return False
        return True

    def rotate(self, token: bytes) -> bytes:
        """``token`` re-encrypted under the current key."""
        try:
            return self._multi.rotate(bytes(token))
        except InvalidToken:
            raise UndecryptableSecret("a stored secret cannot be decrypted with any configured key") from None

    def lookup_hash(self, plaintext: str) -> bytes:
        """The keyed hash to store beside a secret (under the current key)."""
        return hmac.new(self._lookup_keys[0], plaintext.encode(), hashlib.sha256).digest()

    def lookup_hashes(self, plaintext: str) -> list[bytes]:
        """Every hash the secret may be stored under, to find it across a key rotation."""
        return [hmac.new(k, plaintext.encode(), hashlib.sha256).digest() for k in self._lookup_keys]


@dataclass
class RotationReport:
    rotated: int = 0
    current: int = 0  # already under the current key
    # what holds a secret no key opens: an account (its OpenRouter key), "webhook endpoint N"
    unreadable: list[str] = field(default_factory=list)

    @property
    def seen(self) -> int:
        return self.rotated + self.current + len(self.unreadable)


async def rotate_stored_secrets(
    pool: asyncpg.Pool, box: SecretBox, *, batch: int = 100, max_rows: int | None = None
) -> RotationReport:
    """Re-encrypt every stored secret under the current key: the accounts' OpenRouter keys, then
    the webhook endpoints' signing secrets (and the previous secret an endpoint still signs with).

    Each row is swapped on its own, so an interrupted run loses nothing and a second run picks
    up where it stopped; rows already under the current key are skipped, and rows no configured
    key can open are reported (they need their old key back) without stopping the others.
    """
    report = RotationReport()
    await _rotate_provider_keys(pool, box, report, batch, max_rows)
    await _rotate_webhook_secrets(pool, box, report, batch, max_rows)
    return report


async def _rotate_provider_keys(
    pool: asyncpg.Pool, box: SecretBox, report: RotationReport, batch: int, max_rows: int | None
) -> None:
    async for row in _rows(pool, SQL_CIPHERTEXT_PAGE, "subject_id", "", batch, report, max_rows):
        token = bytes(row["encrypted_key"])
        if box.is_current(token):
            report.current += 1
            continue
        try:
            fresh = box.rotate(token)
        except UndecryptableSecret:
            report.unreadable.append(row["subject_id"])
            continue
        digest = box.lookup_hash(box.decrypt(fresh).reveal())
        if await pool.execute(SQL_SWAP_CIPHERTEXT, row["subject_id"], token, fresh, digest) == "UPDATE 1":
            report.rotated += 1
        else:  # its key was replaced meanwhile: a run again tells whether under the current key
            report.unreadable.append(f"{row['subject_id']} (changed during the run: run again)")


async def _rotate_webhook_secrets(
    pool: asyncpg.Pool, box: SecretBox, report: RotationReport, batch: int, max_rows: int | None
) -> None:
    async for row in _rows(pool, SQL_WEBHOOK_CIPHERTEXT_PAGE, "id", 0, batch, report, max_rows):
        await _rotate_endpoint(pool, box, report, row)


async def _rows(
    pool: asyncpg.Pool,
    sql: str,
    key: str,
    start: object,
    batch: int,
    report: RotationReport,
    max_rows: int | None,
) -> AsyncIterator[Any]:
    """The rows of ``sql``'s pages (``batch`` at a time, after ``key``), until the report has seen
    ``max_rows``."""
    after = start
    while max_rows is None or report.seen < max_rows:
        rows = await pool.fetch(sql, after, batch)
        if not rows:
            return
        for row in rows:
            if max_rows is not None and report.seen >= max_rows:
                return
            after = row[key]
            yield row


async def _rotate_endpoint(pool: asyncpg.Pool, box: SecretBox, report: RotationReport, row: Any) -> None:
    """One endpoint's secrets under the current key. A swap that finds the row changed (its
    secret rotated meanwhile: the old one moved to previous_secret) reads it again and retries,
    so a clean report means no live secret is left under an old key."""
    label = f"webhook endpoint {row['id']}"
    for _ in range(_SWAP_TRIES):
        secret = bytes(row["secret"])
        previous = None if row["previous_secret"] is None else bytes(row["previous_secret"])
        new_secret, new_previous = secret, previous
        unreadable: list[str] = []
        if not box.is_current(secret):
            try:
                new_secret = box.rotate(secret)
            except UndecryptableSecret:
                unreadable.append(label)
        if previous is not None and row["previous_valid"] and not box.is_current(previous):
            try:
                new_previous = box.rotate(previous)
            except UndecryptableSecret:  # (`rotate-secret` with no overlap retires it)
                unreadable.append(f"{label} (its previous secret, still signing)")
        if new_secret is secret and new_previous is previous:  # nothing (else) it can do
            if unreadable:
                report.unreadable.extend(unreadable)
            else:
                report.current += 1
            return
        swapped = await pool.execute(
            SQL_SWAP_WEBHOOK_CIPHERTEXT, row["id"], secret, previous, new_secret, new_previous
        )
        if swapped == "UPDATE 1":
            report.unreadable.extend(unreadable)
            if not unreadable:
                report.rotated += 1
            return
        row = await pool.fetchrow(SQL_WEBHOOK_CIPHERTEXT, row["id"])
        if row is None:
            return
    report.unreadable.append(f"{label} (changed during the run: run again)")


__all__ = [
    "EncryptionNotConfigured",
    "Secret",
    "SecretBox",
    "UndecryptableSecret",
    "mask",
    "rotate_stored_secrets",
]
