"""Admin routes: open accounts, allocate credits."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from .. import auth as keys
from ..errors import InvalidRequest
from ..money import format_credits, micro_ceil
from ..runtime import Runtime
from . import schemas
from .routes import AdminDep


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
        return {**account.to_json(), "api_key": issued.key}

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


__all__ = ["add_admin_routes"]
