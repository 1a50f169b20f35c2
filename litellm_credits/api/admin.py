"""Admin routes: open accounts, allocate credits, issue, rotate and revoke keys."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from .. import auth as keys
from ..errors import InvalidRequest, NotFound
from ..money import format_credits, micro_ceil
from ..runtime import Runtime
from . import schemas
from .routes import AdminDep

KeyId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def add_admin_routes(router: APIRouter, runtime: Runtime) -> None:
    @router.post("/admin/credits/accounts", status_code=201, response_model=schemas.AccountCreated)
    async def create_account(body: schemas.CreateAccount, _: AdminDep) -> dict[str, Any]:
        """Create a credit account and its first API key (shown once)."""
        cfg = runtime.settings.credits
        tier = body.tier or cfg.default_tier
        if tier not in cfg.tiers:
            raise InvalidRequest(f"unknown tier {tier!r}; configured: {', '.join(cfg.tiers)}", param="tier")
        ledger = await runtime.ledger()
        async with ledger.pool.acquire() as conn, conn.transaction():
            account = await ledger.create_account(
                body.user_id,
                tier=tier,
                monthly_cap=body.monthly_cap,
                display_name=body.display_name,
                conn=conn,
            )
            issued = await keys.issue_key(conn, body.user_id)
        return {**account.to_json(), "api_key": issued.key, "key_id": issued.id}

    @router.post("/admin/credits/allocate", response_model=schemas.Allocated)
    async def allocate(body: schemas.Allocate, _: AdminDep) -> dict[str, Any]:
        """Add credits to an account (idempotent with ``idempotency_key``)."""
        if body.amount > micro_ceil(runtime.settings.credits.max_amount):
            raise InvalidRequest(
                f"amount exceeds the maximum of {runtime.settings.credits.max_amount} credits", param="amount"
            )
        ledger = await runtime.ledger()
        tx = await ledger.credit(
            body.user_id,
            body.amount,
            type=body.type,
            idempotency_key=body.idempotency_key,
            description=body.reason,
        )
        return {
            "user_id": body.user_id,
            "balance": format_credits(tx.balance_after),
            "transaction_id": tx.id,
            "transaction": tx.to_json(),
        }

    @router.post("/admin/credits/keys", status_code=201, response_model=schemas.KeyCreated)
    async def create_key(body: schemas.CreateKey, _: AdminDep) -> dict[str, Any]:
        """Issue another key for an account (shown once): a user, service or admin key."""
        ledger = await runtime.ledger()
        await ledger.require_account(body.user_id)
        issued = await keys.issue_key(ledger.pool, body.user_id, role=body.role, name=body.name)
        return {"id": issued.id, "user_id": issued.subject_id, "prefix": issued.prefix, "role": issued.role,
                "api_key": issued.key}  # fmt: skip

    @router.get("/admin/credits/keys", response_model=list[schemas.KeyInfo])
    async def list_keys(_: AdminDep, user_id: Annotated[str, Query(max_length=256)]) -> list[dict[str, Any]]:
        """An account's keys, live and revoked (never the keys themselves)."""
        return await keys.list_keys((await runtime.ledger()).pool, user_id)

    @router.post("/admin/credits/keys/{key_id}/revoke", response_model=schemas.KeyInfo)
    async def revoke_key(key_id: KeyId, _: AdminDep) -> dict[str, Any]:
        """Revoke a key at once."""
        revoked = await keys.revoke_key((await runtime.ledger()).pool, key_id)
        if revoked is None:
            raise NotFound(f"no live key {key_id}", param="key_id")
        return revoked

    @router.post("/admin/credits/keys/{key_id}/rotate", status_code=201, response_model=schemas.KeyCreated)
    async def rotate_key(key_id: KeyId, _: AdminDep) -> dict[str, Any]:
        """Revoke a key and issue its successor in one transaction (the new key is shown once)."""
        async with (await runtime.ledger()).pool.acquire() as conn:
            issued = await keys.rotate_key(conn, key_id)
        if issued is None:
            raise NotFound(f"no live key {key_id}", param="key_id")
        return {"id": issued.id, "user_id": issued.subject_id, "prefix": issued.prefix, "role": issued.role,
                "api_key": issued.key}  # fmt: skip


__all__ = ["add_admin_routes"]
