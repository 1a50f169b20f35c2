"""Top-up routes: a user buys credits through Stripe Checkout; Stripe's webhook credits them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from ..runtime import Runtime
from .routes import CallerDep, Limit, Offset, UserIdQuery, target
from .schemas import PositiveAmount, _In


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
