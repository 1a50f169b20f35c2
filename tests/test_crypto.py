"""Secrets at rest: encryption, masking, keyed hashes, and key rotation on a real PostgreSQL."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
from cryptography.fernet import Fernet

from litellm_credits.alerts import Alerts
from litellm_credits.crypto import (
    SQL_SWAP_WEBHOOK_CIPHERTEXT,
    EncryptionNotConfigured,
    Secret,
    SecretBox,
    UndecryptableSecret,
    mask,
    rotate_stored_secrets,
)
from litellm_credits.ledger import Ledger

from .conftest import AccountFactory

PROVIDER_KEY = "sk-or-v1-0123456789abcdef0123456789abcdef-TAIL"


def new_key() -> str:
    return Fernet.generate_key().decode()


def test_round_trip_and_masking() -> None:
    box = SecretBox([new_key()])
    token = box.encrypt(PROVIDER_KEY)
    assert PROVIDER_KEY.encode() not in token
    secret = box.decrypt(token)
    assert secret.reveal() == PROVIDER_KEY
    for shown in (repr(secret), str(secret), f"{secret}", repr([secret]), repr(box)):
        assert PROVIDER_KEY not in shown and "0123456789" not in shown
    assert secret.tail == "…TAIL" and mask("short") == "…"
    assert secret == Secret(PROVIDER_KEY)


def test_no_key_is_a_clear_refusal() -> None:
    for value in (None, "", " , "):
        with pytest.raises(EncryptionNotConfigured) as err:
            SecretBox.from_env_value(value)
        assert err.value.status == 503 and "CREDITS_ENCRYPTION_KEYS" in err.value.message
    with pytest.raises(EncryptionNotConfigured):
        SecretBox(["not-a-fernet-key"])


def test_old_keys_decrypt_and_rotation_moves_to_the_current_key() -> None:
    old, new = new_key(), new_key()
    token = SecretBox([old]).encrypt(PROVIDER_KEY)
    both = SecretBox([new, old])
    assert both.decrypt(token).reveal() == PROVIDER_KEY and not both.is_current(token)
    rotated = both.rotate(token)
    assert both.is_current(rotated)
    assert SecretBox([new]).decrypt(rotated).reveal() == PROVIDER_KEY
    with pytest.raises(UndecryptableSecret):
        SecretBox([new]).decrypt(token)


def test_lookup_hashes_survive_a_rotation() -> None:
    old, new = new_key(), new_key()
    stored = SecretBox([old]).lookup_hash(PROVIDER_KEY)
    assert stored in SecretBox([new, old]).lookup_hashes(PROVIDER_KEY)
    assert SecretBox([new, old]).lookup_hash(PROVIDER_KEY) != stored
    assert SecretBox([old]).lookup_hash("another key") != stored


async def _store(ledger: Ledger, subject: str, box: SecretBox, plaintext: str) -> None:
    await ledger.pool.execute(
        "INSERT INTO credits.openrouter_accounts (subject_id, key_hash, encrypted_key, key_tail)"
        " VALUES ($1, $2, $3, $4)",
        subject, box.lookup_hash(plaintext), box.encrypt(plaintext), mask(plaintext),
    )  # fmt: skip


async def test_rotation_is_resumable_and_safe_to_rerun(
    ledger: Ledger, account: AccountFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    old, new = new_key(), new_key()
    subjects = [await account("0") for _ in range(5)]
    plaintexts = {s: f"{PROVIDER_KEY}-{i}" for i, s in enumerate(subjects)}
    for s in subjects:
        await _store(ledger, s, SecretBox([old]), plaintexts[s])
    box = SecretBox([new, old])

    async def stored(subject: str) -> bytes:
        sql = "SELECT encrypted_key FROM credits.openrouter_accounts WHERE subject_id = $1"
        return bytes(await ledger.pool.fetchval(sql, subject))

    # interrupted after two rows: those two are rotated, the rest still readable under the old key
    first = await rotate_stored_secrets(ledger.pool, box, batch=2, max_rows=2)
    assert first.seen == 2
    for s in subjects:
        assert box.decrypt(await stored(s)).reveal() == plaintexts[s]
    # the second run finishes the job; a third finds nothing to do
    await rotate_stored_secrets(ledger.pool, box, batch=2)
    again = await rotate_stored_secrets(ledger.pool, box, batch=2)
    assert again.rotated == 0 and again.current >= len(subjects)
    assert not set(subjects) & set(again.unreadable)
    only_new = SecretBox([new])
    for s in subjects:
        token = await stored(s)
        assert only_new.decrypt(token).reveal() == plaintexts[s]
        digest = await ledger.pool.fetchval(
            "SELECT key_hash FROM credits.openrouter_accounts WHERE subject_id = $1", s
        )
        assert bytes(digest) == only_new.lookup_hash(plaintexts[s])
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert PROVIDER_KEY not in logged and old not in logged and new not in logged


async def test_unreadable_secrets_are_reported_not_fatal(ledger: Ledger, account: AccountFactory) -> None:
    lost, kept = new_key(), new_key()
    orphan, fine = await account("0"), await account("0")
    await _store(ledger, orphan, SecretBox([lost]), PROVIDER_KEY)
    await _store(ledger, fine, SecretBox([kept]), PROVIDER_KEY)
    report = await rotate_stored_secrets(ledger.pool, SecretBox([new_key(), kept]))
    assert orphan in report.unreadable and fine not in report.unreadable
    assert report.rotated >= 1


async def _endpoint_secrets(ledger: Ledger, endpoint: int) -> tuple[bytes, bytes | None]:
    row = await ledger.pool.fetchrow(
        "SELECT secret, previous_secret FROM credits.webhook_endpoints WHERE id = $1", endpoint
    )
    return bytes(row["secret"]), None if row["previous_secret"] is None else bytes(row["previous_secret"])


async def _endpoint(
    ledger: Ledger, box: SecretBox, *, rotated_for: float | None = None
) -> tuple[int, list[str]]:
    """A webhook endpoint whose secrets are under ``box``'s key; ``rotated_for``: its secret
    rotated once, the previous one signing for that many more seconds (negative: no longer).
    Its plaintext secrets, current first."""
    alerts = Alerts(ledger.pool, box, allow_private=True)
    made = await alerts.create_endpoint(
        "http://127.0.0.1:9/hook", events=None, format="standard", description=None
    )
    secrets = [made["secret"]]
    if rotated_for is not None:
        again = await alerts.rotate_secret(made["id"], overlap_seconds=max(rotated_for, 0))
        secrets.insert(0, again["secret"])
        if rotated_for < 0:
            await ledger.pool.execute(
                "UPDATE credits.webhook_endpoints SET previous_until = now() - interval '1 s' WHERE id = $1",
                made["id"],
            )
    return made["id"], secrets


async def test_rotation_re_encrypts_webhook_secrets_and_the_previous_one_while_it_signs(
    ledger: Ledger,
) -> None:
    old, new = new_key(), new_key()
    plain, plain_secrets = await _endpoint(ledger, SecretBox([old]))
    rotated, rotated_secrets = await _endpoint(ledger, SecretBox([old]), rotated_for=3600)
    box = SecretBox([new, old])
    report = await rotate_stored_secrets(ledger.pool, box)
    assert f"webhook endpoint {plain}" not in report.unreadable
    assert f"webhook endpoint {rotated}" not in report.unreadable
    only_new = SecretBox([new])
    secret, previous = await _endpoint_secrets(ledger, plain)
    assert only_new.decrypt(secret).reveal() == plain_secrets[0] and previous is None
    secret, previous = await _endpoint_secrets(ledger, rotated)
    assert previous is not None
    assert [only_new.decrypt(secret).reveal(), only_new.decrypt(previous).reveal()] == rotated_secrets
    again = await rotate_stored_secrets(ledger.pool, box)
    assert again.rotated == 0


async def test_a_webhook_secret_no_key_opens_is_reported_and_a_retired_one_left_alone(ledger: Ledger) -> None:
    lost, kept, new = new_key(), new_key(), new_key()
    orphan, _ = await _endpoint(ledger, SecretBox([lost]))
    # its previous secret (under the lost key) no longer signs: nothing needs it, nothing reports it
    retired, retired_secrets = await _endpoint(ledger, SecretBox([lost]), rotated_for=-1)
    await ledger.pool.execute(
        "UPDATE credits.webhook_endpoints SET secret = $2 WHERE id = $1",
        retired,
        SecretBox([kept]).encrypt(retired_secrets[0]),
    )
    report = await rotate_stored_secrets(ledger.pool, SecretBox([new, kept]))
    assert f"webhook endpoint {orphan}" in report.unreadable
    assert f"webhook endpoint {retired}" not in report.unreadable
    secret, previous = await _endpoint_secrets(ledger, retired)
    assert SecretBox([new]).decrypt(secret).reveal() == retired_secrets[0]
    assert previous is not None and SecretBox([lost]).decrypt(previous).reveal() == retired_secrets[1]


def test_cli_rotate_keys(fresh_database: Callable[[], str]) -> None:
    env = {**os.environ, "CREDITS_DATABASE_URL": fresh_database()}
    exe = Path(sys.executable).parent / "litellm-credits"
    missing = subprocess.run([str(exe), "rotate-keys"], env={**env, "CREDITS_ENCRYPTION_KEYS": ""},
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "CREDITS_ENCRYPTION_KEYS" in missing.stderr
    key = new_key()
    ok = subprocess.run([str(exe), "rotate-keys"], env={**env, "CREDITS_ENCRYPTION_KEYS": key},
                        capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "already under the current key" in ok.stdout and key not in ok.stdout + ok.stderr


async def test_a_webhook_secret_rotated_during_the_run_is_not_left_under_the_old_key(ledger: Ledger) -> None:
    """Regression (outside review): an endpoint's secret rotated between the run's read and its
    swap moved the old ciphertext into previous_secret, still under the old key, and the run
    counted the endpoint as done."""
    old, new = new_key(), new_key()
    endpoint, secrets = await _endpoint(ledger, SecretBox([old]))
    box = SecretBox([new, old])
    meddled: list[str] = []

    class Meddling:
        """The pool, but the first swap of the endpoint comes after a rotation of its secret."""

        def __getattr__(self, name: str) -> Any:
            return getattr(ledger.pool, name)

        async def execute(self, query: str, *args: Any) -> str:
            if query == SQL_SWAP_WEBHOOK_CIPHERTEXT and not meddled:
                again = await Alerts(ledger.pool, box, allow_private=True).rotate_secret(
                    endpoint, overlap_seconds=3600
                )
                meddled.append(again["secret"])
            return str(await ledger.pool.execute(query, *args))

    report = await rotate_stored_secrets(cast(asyncpg.Pool, Meddling()), box)
    assert meddled and f"webhook endpoint {endpoint}" not in " ".join(report.unreadable)
    secret, previous = await _endpoint_secrets(ledger, endpoint)
    only_new = SecretBox([new])
    assert previous is not None
    assert [only_new.decrypt(secret).reveal(), only_new.decrypt(previous).reveal()] == [
        meddled[0],
        secrets[0],
    ]


async def test_a_lost_previous_secret_does_not_keep_the_current_one_under_the_old_key(ledger: Ledger) -> None:
    lost, kept, new = new_key(), new_key(), new_key()
    endpoint, secrets = await _endpoint(ledger, SecretBox([lost]), rotated_for=3600)
    await ledger.pool.execute(  # its current secret under a key still configured
        "UPDATE credits.webhook_endpoints SET secret = $2 WHERE id = $1",
        endpoint,
        SecretBox([kept]).encrypt(secrets[0]),
    )
    report = await rotate_stored_secrets(ledger.pool, SecretBox([new, kept]))
    assert f"webhook endpoint {endpoint} (its previous secret, still signing)" in report.unreadable
    secret, _ = await _endpoint_secrets(ledger, endpoint)
    assert SecretBox([new]).decrypt(secret).reveal() == secrets[0]
