"""What a request is quoted before its hold: its model group's price at the highest rate it may
be billed at, what it may cost (``estimate.py``), and what it holds on each tier.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from .deployments import DeploymentLookup, deployment_prices
from .estimate import Estimate, count_prompt_tokens, estimate_tokens, estimate_units
from .money import parse_credits
from .pricing import ModelPrice, max_price
from .records import Quote, Service
from .runtime import Runtime
from .unit_prices import audio_seconds

UNIT_PRICED: frozenset[Service] = frozenset({"image", "audio_speech", "audio_transcription"})


class Quoter:
    """Prices requests for the pre-call hook."""

    def __init__(self, runtime: Runtime, deployments: DeploymentLookup) -> None:
        self.runtime = runtime
        self.deployments = deployments

    def group_price(self, model_group: str, deployments: list[dict[str, Any]] | None = None) -> ModelPrice:
        """The worst price among the deployments a model group may route to."""
        pricing = self.runtime.pricing
        if deployments is None:
            deployments = self.deployments(model_group)
        if not deployments:
            return pricing.price(model_group)
        return max_price(
            pricing.price(model_group, (d.get("litellm_params") or {}).get("model"), deployment_prices(d))
            for d in deployments
        )

    def request_price(
        self, model_group: str, deployments: list[dict[str, Any]], service_tier: str | None, started: datetime
    ) -> ModelPrice:
        """The highest flat price a request that starts at ``started`` may be billed at: on any
        deployment it may go to, at the service tier it asks for or the standard one (each
        deployment's off-peak rates at that moment included)."""
        pricing = self.runtime.pricing
        prices = [
            pricing.price(model_group, (d.get("litellm_params") or {}).get("model"), deployment_prices(d))
            for d in deployments
        ] or [pricing.price(model_group)]
        return max_price(v for p in prices for v in p.variants(service_tier, started))

    def estimate(
        self,
        data: dict,
        call_type: str,
        service: Service,
        model_group: str,
        deployments: list[dict[str, Any]],
        started: datetime,
    ) -> Estimate:
        """What the request may cost at the highest rate it may be billed at."""
        tier = data.get("service_tier") if isinstance(data.get("service_tier"), str) else None
        price = self.request_price(model_group, deployments, tier, started)
        cfg = self.runtime.settings.credits
        if service in UNIT_PRICED:
            image = self.image_price(data, model_group, deployments) if service == "image" else None
            seconds = None
            if service == "audio_transcription":
                seconds = audio_seconds(data.get("file")) or Decimal(cfg.max_audio_seconds)
            return estimate_units(data, price, service=service, image_price=image, audio_seconds=seconds)
        from .token_count import token_counter  # (imports LiteLLM: not at module load)

        prompt = count_prompt_tokens(data, model_group, service, token_counter)
        return estimate_tokens(
            data,
            price,
            call_type=call_type,
            service=service,
            prompt_tokens=prompt,
            default_output_tokens=cfg.default_max_output_tokens,
            min_output_tokens=cfg.min_output_tokens,
        )

    def image_price(
        self, data: Mapping[str, Any], model_group: str, deployments: list[dict[str, Any]]
    ) -> Decimal | None:
        """The dearest deployment's price of one image of the requested size and quality."""
        images = self.runtime.pricing.image_prices
        found = []
        for d in deployments or [{"litellm_params": {"model": model_group}}]:
            params = d.get("litellm_params") or {}
            model = str(params.get("model") or model_group)
            provider = params.get("custom_llm_provider") or (model.split("/", 1)[0] if "/" in model else None)
            found.append(
                images.price(
                    model,
                    provider,
                    size=data.get("size"),
                    quality=data.get("quality"),
                    deployment=deployment_prices(d),
                )
            )
        prices = [p for p in found if p is not None]
        return max(prices) if prices and len(prices) == len(found) else None

    def quotes(
        self, estimate: Estimate | None, power_level: str, factor: Decimal, when_short: str | None
    ) -> dict[str, Quote]:
        """What the request holds on each tier (the account's is picked in the statement)."""
        cfg = self.runtime.settings.credits
        pricing = self.runtime.pricing
        quotes = {}
        for name, tier in cfg.tiers.items():
            debits = not tier.unlimited
            if estimate is None:  # nothing bounds it: the operator's fixed hold
                quotes[name] = Quote(parse_credits(cfg.unbounded_hold), debits)
                continue
            rate = pricing.rate(name, power_level) * factor  # type: ignore[arg-type]
            clamp = (when_short or tier.when_short) == "clamp"
            quotes[name] = Quote(estimate.amount(rate), debits, estimate.minimum(rate) if clamp else None)
        return quotes


__all__ = ["UNIT_PRICED", "Quoter"]
