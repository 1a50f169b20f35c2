"""Per-account OpenRouter keys on a real PostgreSQL, with OpenRouter faked by respx."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
import respx
from cryptography.fernet import Fernet
from pydantic import SecretStr

from litellm_credits.crypto import Secret, SecretBox
from litellm_credits.errors import Conflict, InvalidRequest, NotFound
from litellm_credits.ledger import Ledger
from litellm_credits.money import parse_credits as c
from litellm_credits.openrouter import OpenRouterClient, OpenRouterUnavailable
from litellm_credits.openrouter_accounts import OpenRouterAccounts

from .conftest import AccountFactory

BASE = "https://openrouter.test/api/v1"
NEW_KEY = "sk-or-v1-new-account-key-2222222222222222222222222222222222222222222222-ABCD"
HASH = "9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c"


@pytest.fixture
async def accounts(ledger: Ledger) -> AsyncIterator[OpenRouterAccounts]:
    client = OpenRouterClient(
        provisioning_key=Secret("sk-or-v1-prov"), base_url=BASE, retries=1, backoff=0.001
    )
    yield OpenRouterAccounts(ledger, SecretBox([Fernet.generate_key().decode()]), client, Decimal(1000))
    await client.aclose()


def key_data(limit: float) -> dict[str, object]:
    return {"hash": HASH, "name": "credits:x", "limit": limit, "usage": 0, "disabled": False}


@respx.mock
async def test_provision_caps_the_key_at_what_the_account_can_pay(
    accounts: OpenRouterAccounts, ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("12.345")  # 12.345 credits = 0.012345 USD at 1000 credits/USD
    await ledger.hold(subject, c("2.345"), ttl_seconds=60)  # held credits are not spendable
    created = respx.post(f"{BASE}/keys").respond(201, json={"data": key_data(0.01), "key": NEW_KEY})
    status = await accounts.provision(subject)
    assert json.loads(created.calls.last.request.content)["limit"] == 0.01  # 10 credits, rounded down
    assert (status["key"], status["byok"], status["credit_limit_usd"]) == ("…ABCD", False, "0.010000")
    assert (await accounts.key_for(subject)).reveal() == NEW_KEY  # type: ignore[union-attr]
    stored = await ledger.pool.fetchval(
        "SELECT encrypted_key FROM credits.openrouter_accounts WHERE subject_id = $1", subject
    )
    assert NEW_KEY.encode() not in bytes(stored)
    with pytest.raises(Conflict):
        await accounts.provision(subject)


@respx.mock
async def test_sync_follows_the_balance_and_remove_deletes_the_key(
    accounts: OpenRouterAccounts, ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("5")
    respx.post(f"{BASE}/keys").respond(201, json={"data": key_data(0.005), "key": NEW_KEY})
    await accounts.provision(subject)
    await ledger.credit(subject, c("20"))
    patched = respx.patch(f"{BASE}/keys/{HASH}").respond(
        200, json={"data": {**key_data(0.02), "usage": 0.0042}}
    )
    read = respx.get(f"{BASE}/key").respond(200, json={"data": {
        "label": "sk-or-v1-new...ABCD", "usage": 0.0042, "limit": 0.02, "limit_remaining": 0.0158,
        "is_free_tier": True, "is_provisioning_key": False,
    }})  # fmt: skip
    status = await accounts.sync(subject)
    assert json.loads(patched.calls.last.request.content) == {"limit": 0.02}
    assert read.calls.last.request.headers["authorization"] == f"Bearer {NEW_KEY}"  # the key itself
    assert status["credit_limit_usd"] == "0.020000" and status["last_synced_at"]
    assert (
        status["openrouter_usage_usd"],
        status["openrouter_limit_remaining_usd"],
        status["is_free_tier"],
    ) == ("0.0042", "0.0158", True)
    deleted = respx.delete(f"{BASE}/keys/{HASH}").respond(200, json={"data": {"success": True}})
    await accounts.remove(subject)
    assert deleted.called and await accounts.key_for(subject) is None
    with pytest.raises(NotFound):
        await accounts.status(subject)


@respx.mock
async def test_failed_provisioning_leaves_nothing_behind(
    accounts: OpenRouterAccounts, account: AccountFactory
) -> None:
    subject = await account("5")
    respx.post(f"{BASE}/keys").respond(503)
    with pytest.raises(OpenRouterUnavailable):
        await accounts.provision(subject)
    assert await accounts.key_for(subject) is None


@respx.mock
async def test_bring_your_own_key(accounts: OpenRouterAccounts, account: AccountFactory) -> None:
    subject = await account("1")
    route = respx.get(f"{BASE}/key")
    route.side_effect = [httpx.Response(401, json={"error": {"message": "bad key"}})]
    with pytest.raises(InvalidRequest):
        await accounts.bring_own_key(subject, "sk-or-v1-not-a-real-key-xyz")
    route.side_effect = [
        httpx.Response(200, json={"data": {"usage": 0, "limit": None, "is_free_tier": True}}),
        httpx.Response(200, json={"data": {"usage": 1.25, "limit": 5, "limit_remaining": 3.75}}),
    ]
    status = await accounts.bring_own_key(subject, "sk-or-v1-users-own-key-0000000000000000-WXYZ")
    assert (status["byok"], status["key"], status["is_free_tier"]) == (True, "…WXYZ", True)
    assert status["openrouter_usage_usd"] == "0" and status["last_synced_at"]
    # nothing to cap on the user's own key: only read (a PATCH would hit no route and fail)
    synced = await accounts.sync(subject)
    assert (synced["byok"], synced["credit_limit_usd"], synced["is_free_tier"]) == (True, None, False)
    assert (synced["openrouter_usage_usd"], synced["openrouter_limit_remaining_usd"]) == ("1.25", "3.75")
    await accounts.remove(subject)  # the user's key is forgotten, not deleted at OpenRouter


@respx.mock
async def test_sync_all_and_reconcile(
    accounts: OpenRouterAccounts, ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("30")
    respx.post(f"{BASE}/keys").respond(201, json={"data": key_data(0.03), "key": NEW_KEY})
    await accounts.provision(subject)
    # two settled OpenRouter requests the ledger priced at 0.0011 and 0.0022 USD
    for n, usd in enumerate(("0.0011", "0.0022")):
        await ledger.pool.execute(
            "INSERT INTO credits.usage_events (subject_id, request_id, provider, cost, charged,"
            " status, metadata) VALUES ($1, $2, 'openrouter', 1, 1, 'success', $3)",
            subject, f"or-{n}", {"usd": usd},
        )  # fmt: skip
    respx.get(f"{BASE}/keys/{HASH}").respond(200, json={"data": {**key_data(0.03), "usage": 0.0041}})
    [row] = await accounts.reconcile(only=[subject])
    assert (row["openrouter_usage_usd"], row["ledger_usd"], row["drift_usd"]) == (
        "0.0041",
        "0.0033",
        "0.0008",
    )
    respx.patch(f"{BASE}/keys/{HASH}").respond(200, json={"data": key_data(0.03)})
    respx.get(f"{BASE}/key").respond(200, json={"data": {"usage": 0.0041, "is_free_tier": False}})
    assert await accounts.sync_all(only=[subject]) == {subject: "ok"}


@respx.mock
async def test_sync_all_covers_brought_keys_and_a_failed_read_keeps_the_cap(
    accounts: OpenRouterAccounts, ledger: Ledger, account: AccountFactory
) -> None:
    provisioned, brought = await account("9"), await account("1")
    respx.post(f"{BASE}/keys").respond(201, json={"data": key_data(0.009), "key": NEW_KEY})
    await accounts.provision(provisioned)
    own = "sk-or-v1-users-own-key-1111111111111111-QRST"
    reads = respx.get(f"{BASE}/key")
    reads.side_effect = [httpx.Response(200, json={"data": {"usage": 0, "is_free_tier": False}})]
    await accounts.bring_own_key(brought, own)
    await ledger.credit(provisioned, c("21"))  # 30 credits: 0.03 USD
    patched = respx.patch(f"{BASE}/keys/{HASH}").respond(200, json={"data": key_data(0.03)})

    def by_key(request: httpx.Request) -> httpx.Response:
        if request.headers["authorization"] == f"Bearer {own}":
            return httpx.Response(401, json={"error": {"message": "User not found", "code": 401}})
        return httpx.Response(503)

    reads.side_effect = by_key
    results = await accounts.sync_all(only=[provisioned, brought])
    assert results == {provisioned: "openrouter_unavailable", brought: "openrouter_error"}
    # the cap went through before the read failed, and is what the status shows
    assert json.loads(patched.calls.last.request.content) == {"limit": 0.03}
    status = await accounts.status(provisioned)
    assert (status["credit_limit_usd"], status["last_synced_at"]) == ("0.030000", None)


@respx.mock
async def test_the_proxy_process_keeps_provisioned_keys_capped(
    settings: Any, account: AccountFactory
) -> None:
    """The runtime's periodic job re-caps keys at the balance (interval shortened for the test)."""
    from litellm_credits.runtime import Runtime
    from litellm_credits.settings import CreditsConfig

    cfg = CreditsConfig.model_validate(
        {**settings.credits.model_dump(), "openrouter_sync_interval_seconds": 0.05}
    )
    rt = Runtime(settings.model_copy(update={
        "credits": cfg, "sweeper": True, "openrouter_base_url": BASE,
        "openrouter_provisioning_key": SecretStr("sk-or-v1-prov"),
        "encryption_keys": SecretStr(Fernet.generate_key().decode()),
    }))  # fmt: skip
    try:
        subject = await account("7")
        respx.post(f"{BASE}/keys").respond(201, json={"data": key_data(0.007), "key": NEW_KEY})
        await (await rt.openrouter_accounts()).provision(subject)
        respx.patch(f"{BASE}/keys/{HASH}").respond(200, json={"data": key_data(0.007)})
        respx.get(f"{BASE}/key").respond(200, json={"data": {"usage": 0, "is_free_tier": False}})
        accounts = await rt.openrouter_accounts()
        for _ in range(100):
            if (await accounts.status(subject))["last_synced_at"]:
                break
            await asyncio.sleep(0.05)
        status = await accounts.status(subject)
        assert status["last_synced_at"] and status["credit_limit_usd"] == "0.000000"  # 7 credits < 1 cent
    finally:
        await rt.close()


@respx.mock
async def test_no_key_material_in_debug_logs_of_a_whole_flow(
    accounts: OpenRouterAccounts, ledger: Ledger, account: AccountFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Provision, sync, read, reconcile, bring a key, fail, remove: with every logger at DEBUG
    (httpx, asyncpg, ours), no key appears in a log record or an error."""
    caplog.set_level(logging.DEBUG)
    own = "sk-or-v1-good-a-users-very-own-key-5555555555"
    subject, other = await account("40"), await account("1")
    respx.post(f"{BASE}/keys").respond(201, json={"data": key_data(0.04), "key": NEW_KEY})
    respx.patch(f"{BASE}/keys/{HASH}").respond(200, json={"data": key_data(0.04)})
    respx.get(f"{BASE}/keys/{HASH}").respond(200, json={"data": key_data(0.04)})
    respx.delete(f"{BASE}/keys/{HASH}").respond(200, json={"data": {"success": True}})
    respx.get(f"{BASE}/key").respond(200, json={"data": {"usage": 0, "limit": None, "is_free_tier": False}})
    errors = []
    await accounts.provision(subject)
    await accounts.sync(subject)
    await accounts.reconcile(only=[subject])
    await accounts.bring_own_key(other, own)
    try:
        await accounts.provision(subject)
    except Conflict as exc:
        errors.append(repr(exc) + str(exc.to_body()))
    respx.get(f"{BASE}/key").respond(401)
    try:
        await accounts.bring_own_key(other, own + "x")
    except InvalidRequest as exc:
        errors.append(repr(exc) + str(exc.to_body()))
    await accounts.remove(subject)
    text = caplog.text + "".join(repr(r.args) + str(r.msg) for r in caplog.records) + "".join(errors)
    assert len(errors) == 2
    for secret in (NEW_KEY, own, "sk-or-v1-prov"):
        assert secret not in text
