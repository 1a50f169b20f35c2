"""After the call: price what it used and settle its hold, exactly once.

The success event carries the usage LiteLLM assembled (a stream's too); a stream the guard ended
at its hold is settled from what the guard delivered instead (``stream_guard.py``). Prices are the
deployment's, at the service tier the provider served and at the moment the request started (an
off-peak window), so a charge equals ``litellm.cost_per_token`` for the same usage. A settlement
the database could not take is retried while the hold lives; settling is idempotent, so a retry
never charges twice.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from . import metrics
from .claims import HoldClaim
from .deployments import deployment_prices
from .errors import CreditsError, ServiceUnavailable
from .ledger import UNAVAILABLE_ERRORS
from .litellm_objects import field
from .pricing import ModelPrice, Usage, transcription_usage, usd_cost
from .ratelimit import Rate
from .records import Service, UsageRecord
from .runtime import Runtime
from .stream_guard import Delivered
from .timed_prices import billable_service_tier

log = logging.getLogger("litellm_credits.settlement")

RETRYABLE: tuple[type[BaseException], ...] = (ServiceUnavailable, *UNAVAILABLE_ERRORS)
GroupPrice = Callable[[str], ModelPrice]


def usage_from_response(response: Any, kwargs: Mapping[str, Any], service: Service) -> Usage:
    """Token and unit counts of a finished call, as the provider (or LiteLLM) reported them."""
    usage = field(response, "usage")
    prompt_details = field(usage, "prompt_tokens_details")
    completion_details = field(usage, "completion_tokens_details")
    images = 0
    characters = 0
    seconds = Decimal(0)
    if service == "image":
        images = len(field(response, "data") or [])
    elif service == "audio_speech":
        characters = len(str(kwargs.get("input") or ""))
    elif service == "audio_transcription":
        hidden = field(response, "_hidden_params") or {}
        duration = field(hidden, "audio_transcription_duration") or field(response, "duration")
        seconds = Decimal(str(duration)) if duration else Decimal(0)
    return Usage(
        prompt_tokens=int(field(usage, "prompt_tokens") or 0),
        completion_tokens=int(field(usage, "completion_tokens") or 0),
        cached_tokens=int(field(prompt_details, "cached_tokens") or 0),
        cache_creation_tokens=int(field(usage, "cache_creation_input_tokens") or 0),
        reasoning_tokens=int(field(completion_details, "reasoning_tokens") or 0),
        images=images,
        input_seconds=seconds,
        characters=characters,
    )


def served_tier(response: Any) -> Any:
    """The service tier the provider says it served: on the response, its usage, or (Gemini) as
    a traffic type."""
    for source in (response, field(response, "usage")):
        tier = field(source, "service_tier")
        if isinstance(tier, str):
            return tier
    hidden = field(response, "_hidden_params") or {}
    traffic = str(field(field(hidden, "provider_specific_fields") or {}, "traffic_type") or "").upper()
    if not traffic:
        return None
    if traffic == "ON_DEMAND_PRIORITY":
        return "priority"
    return "flex" if traffic in ("FLEX", "BATCH", "ON_DEMAND_FLEX") else "default"


class Settler:
    """Settles holds from success events (and cut streams), retrying while the ledger is down."""

    def __init__(self, runtime: Runtime, group_price: GroupPrice) -> None:
        self.runtime = runtime
        self.group_price = group_price
        self._pending: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background, kept referenced until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def settle_or_retry(
        self,
        claim: HoldClaim,
        kwargs: Mapping[str, Any],
        response: Any,
        *,
        start: datetime | None,
        end: datetime | None,
        model_group: str | None = None,
        delivered: Delivered | None = None,
    ) -> None:
        """:meth:`settle` now; while the ledger is unavailable, go on trying in the background
        (:meth:`later`), every try under one settlement id (see ``Ledger.settle``)."""
        settle = functools.partial(
            self.settle,
            claim,
            kwargs,
            response,
            start=start,
            end=end,
            model_group=model_group,
            delivered=delivered,
            settlement_id=uuid.uuid4().hex,
        )
        try:
            await settle()
        except RETRYABLE:
            self.later(claim, settle)

    def later(self, claim: HoldClaim, settle: Callable[[], Awaitable[None]]) -> None:
        """Keep trying ``settle`` while the hold lives, outside LiteLLM's 20 s callback timeout."""
        log.warning("litellm-credits: ledger unavailable, will retry settling hold %s", claim.hold_id)
        self.spawn(self._retry(claim, settle))

    async def _retry(self, claim: HoldClaim, settle: Callable[[], Awaitable[None]]) -> None:
        deadline = time.monotonic() + self.runtime.settings.credits.holds.ttl_seconds
        delay = 0.5
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15.0)
            try:
                await settle()  # (a try that failed may have committed: see Ledger.settle)
            except RETRYABLE:
                continue
            except Exception:
                log.exception("litellm-credits: settling hold %s failed", claim.hold_id)
                return
            log.info("litellm-credits: hold %s settled after the ledger came back", claim.hold_id)
            return
        log.error("litellm-credits: gave up settling hold %s; the sweeper resolves it", claim.hold_id)

    def price(self, model_group: str, model: str | None, params: Mapping[str, Any]) -> ModelPrice:
        """The deployment's price (its group's worst when the deployment has none of its own)."""
        try:
            return self.runtime.pricing.price(
                model_group,
                model,
                deployment_prices({"model_info": params.get("model_info"), "litellm_params": params}),
            )
        except CreditsError:
            return self.group_price(model_group)

    async def settle(
        self,
        claim: HoldClaim,
        kwargs: Mapping[str, Any],
        response: Any,
        *,
        start: datetime | None,
        end: datetime | None,
        model_group: str | None = None,
        delivered: Delivered | None = None,
        settlement_id: str | None = None,
    ) -> None:
        """Charge what the call used, at the prices that applied, and end its hold.
        ``settlement_id``: this settlement's own id, the same on each try (see ``Ledger.settle``)."""
        params = kwargs.get("litellm_params") or {}
        slo = kwargs.get("standard_logging_object") or {}
        model_group = model_group or slo.get("model_group") or kwargs.get("model") or ""
        provider = kwargs.get("custom_llm_provider") or slo.get("custom_llm_provider")
        deployment = kwargs.get("model")
        model = f"{provider}/{deployment}" if provider and deployment else deployment
        requested_tier = (kwargs.get("optional_params") or {}).get("service_tier") or claim.service_tier
        tier = billable_service_tier(requested_tier, served_tier(response))
        price = self.price(model_group, model, params).at(tier, claim.started_at)
        if delivered is not None:
            usage = Usage(
                prompt_tokens=delivered.prompt_tokens or claim.prompt_tokens,
                completion_tokens=delivered.completion_tokens,
            )
        else:
            usage = usage_from_response(response, kwargs, claim.service)
        if claim.service == "audio_transcription":
            # LiteLLM's measured duration; when it has none (a format its soundfile cannot read),
            # the audio header's, as held, rather than nothing; at the rate LiteLLM charges it
            seconds = usage.input_seconds or claim.audio_seconds or Decimal(0)
            heard = transcription_usage(price, seconds)
            usage = replace(usage, input_seconds=heard.input_seconds, output_seconds=heard.output_seconds)
        usd = usd_cost(price, usage)
        if claim.service == "image":
            usd = self._image_cost(price, usage, kwargs, response, model or model_group, provider, params)
        pricing = self.runtime.pricing
        cost = pricing.to_micro(usd, claim.rate)
        charge = cost
        if claim.byok_fee is not None:  # the user's own key paid the provider: only the fee
            charge = pricing.to_micro(usd, claim.rate * claim.byok_fee)
        if delivered is not None and delivered.cut:
            charge = min(charge, claim.held)  # a cut stream never costs more than it held
        latency = int((end - start).total_seconds() * 1000) if start and end else None
        metadata: dict[str, Any] = {
            "deployment": model,
            "call_id": kwargs.get("litellm_call_id"),
            # the exact price in USD (markups included), for reconciling with providers
            "usd": format(usd.normalize(), "f"),
        }
        if delivered is None:
            # LiteLLM's own float estimate, kept for audit; never used to charge
            metadata["litellm_response_cost"] = str(slo.get("response_cost"))
        else:
            metadata["stream_cut"] = delivered.cut
        if tier:
            metadata["service_tier"] = tier
        if claim.max_tokens is not None:
            metadata["clamped_max_tokens"] = claim.max_tokens
            metadata["requested_max_tokens"] = claim.requested_max_tokens
        if claim.byok_fee is not None:
            metadata["byok"] = True
        if settlement_id is not None:
            metadata["settlement_id"] = settlement_id
        ledger = await self.runtime.ledger()
        result = await ledger.settle(
            claim.subject_id,
            claim.hold_id,
            charge,
            UsageRecord(
                service=claim.service,
                model=model_group or model,
                provider=provider,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                reasoning_tokens=usage.reasoning_tokens,
                cost=cost,
                latency_ms=max(latency, 0) if latency is not None else None,
                metadata=metadata,
            ),
        )
        # (nothing after the settlement may raise a retryable error: a retry would count it again)
        if result is None:
            log.warning(
                "litellm-credits: hold %s was already resolved; usage not charged again", claim.hold_id
            )
            return
        metrics.count_charge(
            self.runtime.labels,
            result.charged,
            tier=claim.tier,
            model_group=model_group,
            service=claim.service,
        )
        await self._count_tokens(claim, usage)

    def _image_cost(
        self,
        price: ModelPrice,
        usage: Usage,
        kwargs: Mapping[str, Any],
        response: Any,
        model: str,
        provider: str | None,
        params: Mapping[str, Any],
    ) -> Decimal:
        """Images at the map's price for their size and quality (as held), else by the price's
        own per-image rates or the tokens the provider reported."""
        if price.free:
            return Decimal(0)
        options = kwargs.get("optional_params") or {}
        unit = self.runtime.pricing.image_prices.price(
            model,
            provider,
            size=field(response, "size") or options.get("size"),
            quality=field(response, "quality") or options.get("quality"),
            deployment=deployment_prices({"model_info": params.get("model_info"), "litellm_params": params}),
        )
        return usd_cost(price, usage) if unit is None else unit * usage.images

    async def _count_tokens(self, claim: HoldClaim, usage: Usage) -> None:
        """The call's tokens count against its tier's tokens per minute, even past the limit
        (the call happened: the next one waits)."""
        tier = self.runtime.settings.credits.tiers.get(claim.tier)
        tokens = usage.prompt_tokens + usage.completion_tokens
        if tier is not None and tier.tpm is not None and tokens:
            await self.runtime.limiter.hit(
                claim.requester, f"llm_tpm:{claim.tier}", Rate(tier.tpm, 60), tokens, force=True
            )


__all__ = ["RETRYABLE", "Settler", "served_tier", "usage_from_response"]
