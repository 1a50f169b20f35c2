"""Request and response bodies of coupons."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, Strict, model_validator

from .schemas import PositiveAmount, Tier, _In, _moment

CouponCode = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{3,64}$", description="letters, digits, _ and -")]


class CreateCoupon(_In):
    code: CouponCode
    type: Literal["fixed", "percent"]
    value: PositiveAmount = Field(
        description="credits (fixed) or a percentage of the next allocation (percent)"
    )
    max_uses: Annotated[int, Strict(), Field(ge=1, le=10_000_000)] | None = None
    expires_at: Annotated[datetime, AfterValidator(_moment)] | None = None
    tiers: Annotated[list[Tier], Field(min_length=1, max_length=50)] | None = Field(
        None, description="only accounts in these tiers may redeem it"
    )
    credit_valid_days: Annotated[int, Strict()] | None = Field(
        None, ge=1, le=3650, description="the (promotional) credits it grants expire this many days later"
    )
    credit_priority: Annotated[int, Strict()] | None = Field(
        None, ge=0, le=1000, description="lower burns first"
    )

    @model_validator(mode="after")
    def _check(self) -> CreateCoupon:
        if self.type == "percent" and self.value > 1000 * 1_000_000:
            raise ValueError("a percent coupon is at most 1000 (percent)")
        return self


class Coupon(BaseModel):
    code: str
    type: str
    value: str
    max_uses: int | None
    uses: int
    expires_at: str | None
    tiers: list[str] | None
    active: bool
    created_at: str
    credit_valid_days: int | None = None
    credit_priority: int | None = None


class CouponPage(BaseModel):
    items: list[Coupon]
    total: int
    limit: int
    offset: int


class Redeem(_In):
    code: CouponCode


class Redeemed(BaseModel):
    user_id: str
    code: str
    type: str
    value: str
    credited: str = Field(description="credits granted now (a percent coupon pays on the next allocation)")
    balance: str | None
    transaction_id: int | None


__all__ = ["Coupon", "CouponCode", "CouponPage", "CreateCoupon", "Redeem", "Redeemed"]
