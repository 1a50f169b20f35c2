"""Response bodies of credit grants (requests take their terms through ``schemas.GrantTermsIn``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Grant(BaseModel):
    id: int
    user_id: str
    category: Literal["paid", "promotional"]
    priority: int = Field(description="lower burns first")
    source: str = Field(description="allocation, bonus, coupon, refund, adjustment, topup or migration")
    amount: str
    remaining: str
    expired: str = Field(description="what expired of it")
    used: str = Field(description="what usage took of it (net of refunds)")
    effective_at: str
    expires_at: str | None
    status: Literal["live", "used", "expired"]
    transaction_id: int | None = Field(description="the ledger row that credited it")
    created_at: str


class GrantPage(BaseModel):
    items: list[Grant]
    total: int
    limit: int
    offset: int


class NextExpiry(BaseModel):
    at: str
    amount: str = Field(description="credit left that expires then")


class GrantSummary(BaseModel):
    paid: str = Field(description="paid credit left (unexpired)")
    promotional: str = Field(description="promotional credit left (unexpired)")
    overrun: str = Field(description="usage no grant covered, paid off first by the next credit")
    next_expiry: NextExpiry | None
