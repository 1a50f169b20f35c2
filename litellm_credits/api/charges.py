"""Charging services used outside the proxy (search, text-to-speech, speech-to-text, ...).

Only service keys and admin keys may charge, always for a named account and with an
idempotency key; the charge goes through the same hold machinery as proxy traffic.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from fastapi import APIRouter

from .. import charges
from ..money import format_credits
from ..pricing import Usage, transcription_usage, usd_cost
from ..records import Quote, UsageRecord
from ..runtime import Runtime
from . import schemas
from .routes import CHARGE_ROUTE, Caller, ServiceDep, limit_account
from .user import PriceLookup


def add_charge_routes(router: APIRouter, runtime: Runtime, price_of: PriceLookup) -> None:
    async def charge(
        caller: Caller,
        user_id: str,
        key: str,
        quotes: dict[str, Quote],
        usage: UsageRecord,
        request: schemas.Deduct | schemas.CalculateAndDeduct,
        power_level: str | None = None,
    ) -> dict[str, Any]:
        await limit_account(runtime, "api_charge", caller, user_id)  # per account charged
        ledger = await runtime.ledger()
        result = await charges.charge(
            ledger,
            user_id,
            quotes,
            default_tier=runtime.settings.credits.default_tier,
            idempotency_key=key,
            usage=usage,
            power_level=power_level,
            # a retry is the same request when the client sent the same body
            request={"route": type(request).__name__, **request.model_dump(exclude={"idempotency_key"})},
        )
        return {
            "user_id": user_id,
            "service": usage.service,
            "charged": format_credits(0 if result.replayed else result.charged),
            "cost": format_credits(result.cost),
            "balance": format_credits(result.balance),
            "transaction_id": result.transaction.id if result.transaction else None,
            "replayed": result.replayed,
        }

    @router.post("/credits/deduct", response_model=schemas.Charged, openapi_extra=CHARGE_ROUTE)
    async def deduct(body: schemas.Deduct, caller: ServiceDep) -> dict[str, Any]:
        """Charge an exact amount for a service; 402 when it does not fit."""
        pricing = runtime.pricing
        quotes = {
            t: Quote(body.amount, debits=not pricing.is_unlimited(t)) for t in runtime.settings.credits.tiers
        }
        usage = UsageRecord(
            service=body.service,
            model=body.model,
            metadata={"description": body.description} if body.description else None,
        )
        return await charge(caller, body.user_id, body.idempotency_key, quotes, usage, body)

    @router.post("/credits/calculate-and-deduct", response_model=schemas.Charged, openapi_extra=CHARGE_ROUTE)
    async def calculate_and_deduct(body: schemas.CalculateAndDeduct, caller: ServiceDep) -> dict[str, Any]:
        """Price the usage of a service at the account's tier, then charge it; 402 when it does not fit."""
        pricing = runtime.pricing
        power_level = pricing.power_level(body.power_level)
        price = price_of(body.model)
        heard = transcription_usage(price, Decimal(body.seconds))  # at the rate LiteLLM uses
        usd = usd_cost(
            price,
            Usage(
                prompt_tokens=body.prompt_tokens,
                completion_tokens=body.completion_tokens,
                cached_tokens=body.cached_tokens,
                reasoning_tokens=body.reasoning_tokens,
                characters=body.characters,
                input_seconds=heard.input_seconds,
                output_seconds=heard.output_seconds,
                images=body.images,
            ),
        )
        quotes = {
            t: Quote(pricing.to_micro(usd, pricing.rate(t, power_level)), debits=not pricing.is_unlimited(t))
            for t in runtime.settings.credits.tiers
        }
        usage = UsageRecord(
            service=body.service,
            model=body.model,
            prompt_tokens=body.prompt_tokens,
            completion_tokens=body.completion_tokens,
            cached_tokens=body.cached_tokens,
            reasoning_tokens=body.reasoning_tokens,
        )
        return await charge(caller, body.user_id, body.idempotency_key, quotes, usage, body, power_level)


__all__ = ["add_charge_routes"]
