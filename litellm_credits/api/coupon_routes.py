"""Coupon routes: admins create, list and deactivate codes; users redeem them."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from ..coupons import Coupons
from ..errors import InvalidRequest
from ..money import format_credits, micro_ceil
from ..runtime import Runtime
from . import coupon_schemas
from .routes import CHARGE_ROUTE, AdminDep, CallerDep, Limit, Offset, UserIdQuery, target

CodePath = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{3,64}$")]


def add_coupon_routes(router: APIRouter, runtime: Runtime) -> None:
    async def coupons() -> Coupons:
        ledger = await runtime.ledger()
        return Coupons(ledger.pool, ledger.changed)

    @router.post("/admin/credits/coupons", status_code=201, response_model=coupon_schemas.Coupon)
    async def create_coupon(body: coupon_schemas.CreateCoupon, _: AdminDep) -> dict[str, Any]:
        """Create a coupon; codes are case-insensitive (stored in capitals)."""
        cfg = runtime.settings.credits
        if body.type == "fixed" and body.value > micro_ceil(cfg.max_amount):
            raise InvalidRequest(f"value exceeds the maximum of {cfg.max_amount} credits", param="value")
        unknown = [t for t in body.tiers or () if t not in cfg.tiers]
        if unknown:
            raise InvalidRequest(
                f"unknown tiers {unknown}; configured: {', '.join(cfg.tiers)}", param="tiers"
            )
        return await (await coupons()).create(
            body.code,
            body.type,
            Decimal(body.value).scaleb(-6),
            max_uses=body.max_uses,
            expires_at=body.expires_at,
            tiers=body.tiers,
            credit_valid_days=body.credit_valid_days,
            credit_priority=body.credit_priority,
        )

    @router.get("/admin/credits/coupons", response_model=coupon_schemas.CouponPage)
    async def list_coupons(
        _: AdminDep, active: Annotated[bool | None, Query()] = None, limit: Limit = 50, offset: Offset = 0
    ) -> dict[str, Any]:
        """Coupons, newest first, with their uses; ``active`` filters on whether they can be redeemed."""
        items, total = await (await coupons()).list(active=active, limit=limit, offset=offset)
        return {"items": items, "total": total, "limit": limit, "offset": offset}

    @router.post("/admin/credits/coupons/{code}/deactivate", response_model=coupon_schemas.Coupon)
    async def deactivate_coupon(code: CodePath, _: AdminDep) -> dict[str, Any]:
        """No one can redeem it from now on; pending percent bonuses still pay."""
        return await (await coupons()).deactivate(code)

    @router.post(
        "/credits/coupons/redeem", response_model=coupon_schemas.Redeemed, openapi_extra=CHARGE_ROUTE
    )
    async def redeem(
        body: coupon_schemas.Redeem, caller: CallerDep, user_id: UserIdQuery = None
    ) -> dict[str, Any]:
        """Redeem a coupon for the caller's account (once per account)."""
        subject = target(caller, user_id)
        r = await (await coupons()).redeem(subject, body.code)
        return {
            "user_id": subject,
            "code": r.code,
            "type": r.type,
            "value": format(r.value.normalize(), "f"),
            "credited": format_credits(r.credited),
            "balance": format_credits(r.balance) if r.balance is not None else None,
            "transaction_id": r.transaction_id,
        }


__all__ = ["add_coupon_routes"]
