"""Top-up routes: a user buys credits through Stripe Checkout; Stripe's webhook credits them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field, Strict

from ..runtime import Runtime
from .routes import AdminDep, CallerDep, Limit, Offset, UserIdQuery, target
from .schemas import NonNegativeAmount, PositiveAmount, _In


class CreateTopup(_In):
    amount: PositiveAmount = Field(description="credits to buy, a decimal string")


class Price(BaseModel):
    currency: str
    unit_amount: int = Field(description="in the currency's minor units (cents)")


class TopupCreated(BaseModel):
    id: int
    user_id: str
    amount: str
    price: Price
    checkout_url: str = Field(description="send the user here to pay")
    checkout_session_id: str


class Topup(BaseModel):
    id: int
    amount: str
    price: Price
    status: str = Field(description="open, paid, failed or expired")
    reversed: str = Field(description="credits taken back by refunds and disputes")
    disputed: bool
    transaction_id: int | None
    created_at: str


class SetRecharge(_In):
    threshold: NonNegativeAmount = Field(description="recharge when the balance falls below this")
    amount: PositiveAmount = Field(description="credits bought each time")
    customer_id: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^cus_[A-Za-z0-9]+$")]
    payment_method_id: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^pm_[A-Za-z0-9_]+$")]
    max_per_month: Annotated[int, Strict(), Field(ge=1, le=1000)] = 5
    max_amount_per_month: PositiveAmount | None = None


class Recharge(BaseModel):
    user_id: str
    threshold: str
    amount: str
    customer_id: str
    payment_method_id: str
    max_per_month: int
    max_amount_per_month: str | None
    enabled: bool


class WebhookReceived(BaseModel):
    received: bool
    duplicate: bool = Field(description="an event id seen before: nothing changed")
    outcome: str


def add_topup_routes(router: APIRouter, runtime: Runtime) -> None:
    @router.post("/credits/topups", status_code=201, response_model=TopupCreated)
    async def create_topup(
        body: CreateTopup, caller: CallerDep, user_id: UserIdQuery = None
    ) -> dict[str, Any]:
        """Buy credits: a Stripe Checkout Session for their price (`topups` in credits.yaml). They
        are credited, once, as a paid grant when Stripe reports the payment."""
        return await (await runtime.topups()).checkout(target(caller, user_id), body.amount)

    @router.get("/credits/topups", response_model=list[Topup])
    async def topups(
        caller: CallerDep, limit: Limit = 50, offset: Offset = 0, user_id: UserIdQuery = None
    ) -> list[dict[str, Any]]:
        """The caller's top-ups, newest first."""
        return await (await runtime.topups()).list(target(caller, user_id), limit=limit, offset=offset)

    @router.put("/admin/credits/accounts/{user_id}/auto-recharge", response_model=Recharge)
    async def set_recharge(
        user_id: Annotated[str, Path(min_length=1, max_length=256)], body: SetRecharge, _: AdminDep
    ) -> dict[str, Any]:
        """Recharge the account off-session with its saved Stripe payment method (the operator's
        to set: a customer and a payment method of its Stripe account) whenever its balance falls
        below ``threshold``: one recharge in flight at a time, at most ``max_per_month`` (and
        ``max_amount_per_month`` credits) a month, credited when Stripe reports it paid."""
        return await (await runtime.topups()).set_recharge(
            user_id,
            threshold=body.threshold,
            amount=body.amount,
            customer_id=body.customer_id,
            payment_method_id=body.payment_method_id,
            max_per_month=body.max_per_month,
            max_amount_per_month=body.max_amount_per_month,
        )

    @router.get("/credits/auto-recharge", response_model=Recharge)
    async def recharge(caller: CallerDep, user_id: UserIdQuery = None) -> dict[str, Any]:
        """The account's auto-recharge, if any (404 otherwise)."""
        return await (await runtime.topups()).recharge_settings(target(caller, user_id))

    @router.delete("/credits/auto-recharge", response_model=Recharge)
    async def stop_recharge(caller: CallerDep, user_id: UserIdQuery = None) -> dict[str, Any]:
        """Turn the account's auto-recharge off (an admin turns it on again)."""
        return await (await runtime.topups()).recharge_settings(target(caller, user_id), disable=True)

    @router.post(
        "/credits/stripe/webhook",
        response_model=WebhookReceived,
        # read raw (the signature is over the bytes as sent); documented as Stripe's event object
        openapi_extra={
            "security": [],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"type": "object", "description": "a Stripe event"}}
                },
            },
        },
    )
    async def stripe_webhook(request: Request) -> dict[str, Any]:
        """Stripe's events (no API key: the `Stripe-Signature` is the authentication; a bad or old
        one is `400 invalid_signature`). Each event id is handled once."""
        body = await request.body()
        handled = await (await runtime.topups()).handle(body, request.headers.get("stripe-signature"))
        if handled.subject_id is not None and not handled.duplicate:
            await (await runtime.ledger()).changed(handled.subject_id)
        return {"received": True, "duplicate": handled.duplicate, "outcome": handled.outcome}


__all__ = ["add_topup_routes"]
