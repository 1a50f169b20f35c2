"""Model prices, power levels and tier markup, as exact decimals.

Where a price comes from, strongest first:

1. ``models:`` in ``credits.yaml`` (per model group or underlying model; field by field);
2. the deployment in ``litellm_config.yaml`` (``input_cost_per_token`` … in ``litellm_params``
   or ``model_info``);
3. LiteLLM's price map (``litellm.model_cost``);
4. ``unknown_model_price`` in ``credits.yaml``; otherwise the model is refused
   (:class:`~litellm_credits.errors.ModelNotPriced`).

A model whose name ends in a free suffix (``:free``) or that is marked ``free: true`` costs 0.
Every float that LiteLLM or YAML hands over is read by its shortest repr (``1.1e-06`` is exactly
``0.0000011``), so prices never drift.

A charge in credits is ``usd × credits_per_usd × power multiplier × (1 + tier markup)``, rounded
up to the micro-credit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal, localcontext
from typing import Any

from .errors import InvalidRequest, ModelNotPriced
from .money import micro_ceil, to_decimal
from .settings import CreditsConfig, ModelPriceConfig, PowerLevel
from .timed_prices import SERVICE_TIER_SUFFIXES, OffPeak, tier_suffix
from .unit_prices import ImagePrices

ZERO = Decimal(0)
_TOKEN_RATE_KEYS = frozenset(
    {
        "input_cost_per_token",
        "output_cost_per_token",
        "cache_read_input_token_cost",
        "cache_creation_input_token_cost",
    }
)
_ABOVE_KEY = re.compile(
    r"^(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost|cache_creation_input_token_cost)"
    r"_above_(\d+)(k?)_tokens$"
)
# the keys a service tier reprices (LiteLLM's ``_get_token_base_cost`` and reasoning rate)
_TIER_RATE_KEYS = _TOKEN_RATE_KEYS | {"output_cost_per_reasoning_token"}
_TIER_KEY_SUFFIXES = frozenset(SERVICE_TIER_SUFFIXES.values())
# Sums and products of prices, token counts and rates are exact: no rounding to the default
# 28-digit context, which could drop the tail of a long price before the charge is rounded up.
EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)
# litellm.constants.FIREWORKS_AI_DEFAULT_CACHE_READ_RATE_RATIO
FIREWORKS_CACHE_READ_RATIO = Decimal("0.5")
# price keys understood here, as LiteLLM names them
PRICE_KEYS = (
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "output_cost_per_reasoning_token",
    "input_cost_per_image",
    "output_cost_per_image",
    "input_cost_per_second",
    "output_cost_per_second",
    "input_cost_per_character",
)


_SAME = object()  # ModelPrice.at's answer was the price itself


@dataclass(frozen=True)
class ModelPrice:
    """USD prices of one model; ``None`` means the model has no such price."""

    input_cost_per_token: Decimal | None = None
    output_cost_per_token: Decimal | None = None
    cache_read_input_token_cost: Decimal | None = None
    cache_creation_input_token_cost: Decimal | None = None
    output_cost_per_reasoning_token: Decimal | None = None
    input_cost_per_image: Decimal | None = None
    output_cost_per_image: Decimal | None = None
    input_cost_per_second: Decimal | None = None
    output_cost_per_second: Decimal | None = None
    input_cost_per_character: Decimal | None = None
    max_output_tokens: int | None = None
    free: bool = False
    source: str = "unknown"
    # long-prompt pricing: (threshold, rates) that apply to every token of a request whose
    # prompt has more than ``threshold`` tokens, as ``input_cost_per_token_above_200k_tokens``
    above: tuple[tuple[int, tuple[tuple[str, Decimal], ...]], ...] = ()
    # rates per service tier suffix ("priority", "flex" ...): token rates and long-prompt rates
    # by their standard key (``input_cost_per_token``, ``input_cost_per_token_above_272k_tokens``)
    service_tiers: tuple[tuple[str, tuple[tuple[str, Decimal], ...]], ...] = ()
    off_peak: OffPeak | None = None
    # what ``at`` answered, by (service tier suffix, inside an off-peak window): the price is
    # frozen, so its flat rates are worked out once, not on every request
    _flat: dict[tuple[str, bool], ModelPrice | object] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str) -> ModelPrice | None:
        """Prices from a LiteLLM-style dict, or None when it carries no price at all."""
        values: dict[str, Any] = {}
        for key in PRICE_KEYS:
            raw = data.get(key)
            if raw is not None:
                values[key] = to_decimal(raw)
        if not values:
            return None
        tiers: dict[int, dict[str, Decimal]] = {}
        for key, raw in data.items():
            m = _ABOVE_KEY.match(key)
            if m and raw is not None:
                threshold = int(m.group(2)) * (1000 if m.group(3) else 1)
                tiers.setdefault(threshold, {})[m.group(1)] = to_decimal(raw)
        above = tuple((t, tuple(sorted(rates.items()))) for t, rates in sorted(tiers.items()))
        cap = data.get("max_output_tokens")
        return cls(
            **values,
            # the most a call may write: its worst case when the request sets no limit
            max_output_tokens=cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else None,
            above=above,
            service_tiers=_service_tier_rates(data),
            off_peak=OffPeak.from_mapping(data.get("off_peak_pricing")),
            source=source,
        )

    def at(self, service_tier: str | None = None, moment: datetime | None = None) -> ModelPrice:
        """The flat rates that apply to a call served at ``service_tier`` (None: the standard one)
        that started at ``moment`` (None: peak rates), as ``litellm.cost_per_token`` resolves
        them: the tier's rate for each key it prices (else the standard one), long-prompt rates
        likewise, then the off-peak rates, which replace whatever they name for the whole call."""
        suffix = tier_suffix(service_tier) or ""
        night = self.off_peak is not None and moment is not None and self.off_peak.covers(moment)
        kept = self._flat.get((suffix, night))
        if kept is None:
            flat = self._at(suffix, night)
            # itself, when nothing changes: kept as a marker (a price holding itself is a cycle)
            self._flat[(suffix, night)] = _SAME if flat is self else flat
            return flat
        return self if kept is _SAME else kept  # type: ignore[return-value]

    def _at(self, suffix: str, off_peak: bool) -> ModelPrice:
        price = self
        rates = dict(self.service_tiers).get(suffix)
        if rates:
            changes: dict[str, Any] = {k: v for k, v in rates if k in _TOKEN_RATE_KEYS}
            if "output_cost_per_reasoning_token" in dict(rates):
                changes["output_cost_per_reasoning_token"] = dict(rates)["output_cost_per_reasoning_token"]
            elif "output_cost_per_token" in changes:
                changes["output_cost_per_reasoning_token"] = None  # the tier's output rate then
            tiered: dict[int, dict[str, Decimal]] = {t: dict(r) for t, r in self.above}
            for key, rate in rates:
                m = _ABOVE_KEY.match(key)
                if m:
                    threshold = int(m.group(2)) * (1000 if m.group(3) else 1)
                    tiered.setdefault(threshold, {})[m.group(1)] = rate
            changes["above"] = tuple((t, tuple(sorted(r.items()))) for t, r in sorted(tiered.items()))
            price = replace(price, **changes)
        if self.off_peak is not None and off_peak:
            night: dict[str, Any] = dict(self.off_peak.rates)
            above = tuple(
                (t, tuple((k, r) for k, r in rates_ if k not in night)) for t, rates_ in price.above
            )
            price = replace(price, **night, above=tuple((t, r) for t, r in above if r))
        if price.service_tiers or price.off_peak is not None:
            price = replace(price, service_tiers=(), off_peak=None)
        return price

    def variants(self, service_tier: str | None, moment: datetime) -> list[ModelPrice]:
        """Every flat price a call that starts at ``moment`` may be billed at: its requested
        service tier, or the standard one (a provider may serve either). The moment is the one
        the settlement prices at too, so it falls on one side of any off-peak window."""
        tiers = {None, service_tier} if tier_suffix(service_tier) else {None}
        return [self.at(t, moment) for t in tiers]

    def for_prompt(self, prompt_tokens: int) -> ModelPrice:
        """The rates that apply to a request with this many prompt tokens (long-prompt tiers)."""
        rates: dict[str, Any] = {}
        for threshold, tier in self.above:
            if prompt_tokens > threshold:
                rates.update(tier)
        return replace(self, **rates) if rates else self

    def overlay(self, override: ModelPriceConfig) -> ModelPrice:
        """This price with every field the override sets replaced."""
        changes: dict[str, Any] = {
            k: v for k, v in override.model_dump(exclude_none=True).items() if k in PRICE_KEYS
        }
        if changes.keys() & _TOKEN_RATE_KEYS:
            # the operator's token rates replace long-prompt, service-tier and off-peak ones
            changes.update(above=(), service_tiers=(), off_peak=None)
        if override.max_output_tokens is not None:
            changes["max_output_tokens"] = override.max_output_tokens
        if override.free:
            changes["free"] = True
        return replace(self, **changes, source="config")

    def scaled(self, factor: Decimal) -> ModelPrice:
        """Every price (long-prompt tiers too) times ``factor``, exactly."""
        with localcontext(EXACT):
            values = {k: getattr(self, k) * factor for k in PRICE_KEYS if getattr(self, k) is not None}
            above = tuple((t, tuple((k, r * factor) for k, r in rates)) for t, rates in self.above)
            tiers = tuple((t, tuple((k, r * factor) for k, r in rates)) for t, rates in self.service_tiers)
            night = self.off_peak
            if night is not None:
                night = replace(night, rates=tuple((k, r * factor) for k, r in night.rates))
        return replace(self, **values, above=above, service_tiers=tiers, off_peak=night)

    @property
    def priced_by_token(self) -> bool:
        """Whether tokens are what it charges for (a token call's cost is then bounded)."""
        return any(getattr(self, k) is not None for k in _TOKEN_RATE_KEYS)

    @property
    def priced(self) -> bool:
        return self.free or any(getattr(self, k) is not None for k in PRICE_KEYS)


FREE = ModelPrice(free=True, source="free")


@dataclass(frozen=True)
class Usage:
    """What one request consumed. Token counts follow OpenAI: ``prompt_tokens`` includes cached
    and cache-creation tokens, ``completion_tokens`` includes reasoning tokens."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    images: int = 0
    input_seconds: Decimal = ZERO
    output_seconds: Decimal = ZERO
    characters: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise InvalidRequest(f"{f.name} cannot be negative", param=f.name)


def usd_cost(price: ModelPrice, usage: Usage) -> Decimal:
    """The exact USD cost of ``usage`` at ``price``."""
    if price.free:
        return ZERO
    with localcontext(EXACT):
        return _usd_cost(price.for_prompt(usage.prompt_tokens), usage)


def _usd_cost(price: ModelPrice, usage: Usage) -> Decimal:
    inp = price.input_cost_per_token or ZERO
    out = price.output_cost_per_token or ZERO
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    creation = min(usage.cache_creation_tokens, usage.prompt_tokens - cached)
    text_in = usage.prompt_tokens - cached - creation
    cost = text_in * inp
    cost += cached * (
        price.cache_read_input_token_cost if price.cache_read_input_token_cost is not None else inp
    )
    cost += creation * (
        price.cache_creation_input_token_cost if price.cache_creation_input_token_cost is not None else inp
    )
    reasoning = min(usage.reasoning_tokens, usage.completion_tokens)
    cost += (usage.completion_tokens - reasoning) * out
    cost += reasoning * (
        price.output_cost_per_reasoning_token if price.output_cost_per_reasoning_token is not None else out
    )
    cost += usage.images * ((price.input_cost_per_image or ZERO) + (price.output_cost_per_image or ZERO))
    cost += usage.input_seconds * (price.input_cost_per_second or ZERO)
    cost += usage.output_seconds * (price.output_cost_per_second or ZERO)
    cost += usage.characters * (price.input_cost_per_character or ZERO)
    return cost


def audio_second_rate(price: ModelPrice) -> Decimal:
    """What a second of transcribed audio costs: ``output_cost_per_second`` where the price has
    one, else ``input_cost_per_second`` (LiteLLM's ``openai.cost_per_second``)."""
    if price.output_cost_per_second:
        return price.output_cost_per_second
    return price.input_cost_per_second or ZERO


def transcription_usage(price: ModelPrice, seconds: Decimal) -> Usage:
    """A transcription of ``seconds`` of audio, counted where ``price`` charges it: as output
    seconds when it has a rate for those, else as input seconds (never both, as LiteLLM)."""
    if price.output_cost_per_second:
        return Usage(output_seconds=seconds)
    return Usage(input_seconds=seconds)


def worst_rates(price: ModelPrice, prompt_tokens: int) -> tuple[Decimal, Decimal]:
    """The highest USD rate a prompt token and an output token of a request with this many
    prompt tokens may be billed at (cached, cache-write, reasoning and long-prompt rates all
    considered)."""
    if price.free:
        return ZERO, ZERO
    price = price.for_prompt(prompt_tokens)
    in_rates = [
        r
        for r in (
            price.input_cost_per_token,
            price.cache_read_input_token_cost,
            price.cache_creation_input_token_cost,
        )
        if r is not None
    ]
    out_rates = [
        r for r in (price.output_cost_per_token, price.output_cost_per_reasoning_token) if r is not None
    ]
    return max(in_rates, default=ZERO), max(out_rates, default=ZERO)


def worst_case(
    price: ModelPrice, prompt_tokens: int, max_output_tokens: int, images: int = 0, characters: int = 0
) -> Decimal:
    """The most ``prompt_tokens`` in and ``max_output_tokens`` out can cost at ``price``."""
    if price.free:
        return ZERO
    in_rate, out_rate = worst_rates(price, prompt_tokens)
    with localcontext(EXACT):
        cost = prompt_tokens * in_rate + max_output_tokens * out_rate
        cost += images * ((price.input_cost_per_image or ZERO) + (price.output_cost_per_image or ZERO))
        cost += characters * (price.input_cost_per_character or ZERO)
    return cost


def max_price(prices: Iterable[ModelPrice]) -> ModelPrice:
    """Field by field the highest of several prices (a model group's deployments)."""
    prices = list(prices)
    if len(prices) == 1:
        return prices[0]
    values: dict[str, Any] = {}
    for key in PRICE_KEYS:
        present = [getattr(p, key) for p in prices if getattr(p, key) is not None]
        if present:
            values[key] = max(present)
    caps = [p.max_output_tokens for p in prices if p.max_output_tokens is not None]
    tiers = _highest_rates(p.above for p in prices)
    service = _highest_rates(p.service_tiers for p in prices)
    return ModelPrice(
        **values,
        above=tuple((t, tuple(sorted(r.items()))) for t, r in sorted(tiers.items())),
        # every deployment's tier rates at their highest, and its standard rates (a group's price
        # at a moment is the highest of its deployments' prices then: Quoter.request_price)
        service_tiers=tuple((k, tuple(sorted(r.items()))) for k, r in sorted(service.items())),
        max_output_tokens=max(caps) if caps else None,
        free=all(p.free for p in prices),
        source="+".join(sorted({p.source for p in prices})),
    )


def _highest_rates(
    groups: Iterable[tuple[tuple[Any, tuple[tuple[str, Decimal], ...]], ...]],
) -> dict[Any, dict[str, Decimal]]:
    """Per key (a tier's threshold, a service tier's suffix), each rate at its highest over
    ``groups``."""
    merged: dict[Any, dict[str, Decimal]] = {}
    for group in groups:
        for key, rates in group:
            into = merged.setdefault(key, {})
            for name, rate in rates:
                into[name] = max(rate, into.get(name, rate))
    return merged


def _service_tier_rates(data: Mapping[str, Any]) -> tuple[tuple[str, tuple[tuple[str, Decimal], ...]], ...]:
    """``input_cost_per_token_priority`` and the like, by tier suffix and standard key."""
    found: dict[str, dict[str, Decimal]] = {}
    for key, raw in data.items():
        if raw is None or isinstance(raw, bool) or not isinstance(key, str):
            continue
        base, _, suffix = key.rpartition("_")
        if suffix not in _TIER_KEY_SUFFIXES:
            continue
        if base in _TIER_RATE_KEYS or _ABOVE_KEY.match(base):
            found.setdefault(suffix, {})[base] = to_decimal(raw)
    return tuple((t, tuple(sorted(r.items()))) for t, r in sorted(found.items()))


# prices remembered by ``Pricing.price`` (model groups x deployments x price overrides sent with
# requests): forgotten all at once past this
MAX_REMEMBERED_PRICES = 4096


def _price_keys(params: Mapping[str, Any] | None) -> str:
    """What of a deployment's parameters can change its price: every key that names a cost (the
    rates, long-prompt, service-tier and off-peak ones), its output cap and off-peak windows."""
    if not params:
        return ""
    return repr(
        [
            (k, v)
            for k, v in params.items()
            if isinstance(k, str) and ("cost" in k or k in ("max_output_tokens", "off_peak_pricing"))
        ]
    )


def _strip_provider(model: str) -> str:
    return model.split("/", 1)[1] if "/" in model else model


@dataclass
class Pricing:
    """Prices requests and converts USD to credits for a tier and power level."""

    config: CreditsConfig
    model_cost: Mapping[str, Mapping[str, Any]] | None = None
    _map_cache: dict[str, ModelPrice | None] = field(default_factory=dict, repr=False)
    # live prices a provider publishes (OpenRouter's model list), by LiteLLM model name
    provider_prices: dict[str, ModelPrice] = field(default_factory=dict, repr=False)
    _images: ImagePrices | None = field(default=None, repr=False)
    # what ``price`` answered, by its arguments (a deployment's by the keys that can price it)
    _prices: dict[tuple[str, str | None, str], ModelPrice] = field(default_factory=dict, repr=False)

    def _litellm_map(self) -> Mapping[str, Mapping[str, Any]]:
        if self.model_cost is None:
            import litellm

            self.model_cost = litellm.model_cost
        return self.model_cost

    @property
    def image_prices(self) -> ImagePrices:
        """Per-image prices by size and quality, from the same map."""
        if self._images is None:
            self._images = ImagePrices(self._litellm_map())
        return self._images

    def from_map(self, model: str) -> ModelPrice | None:
        """LiteLLM's price for ``model`` (with or without a provider prefix)."""
        if model not in self._map_cache:
            table = self._litellm_map()
            entry = table.get(model) or table.get(_strip_provider(model))
            price = ModelPrice.from_mapping(entry, "litellm") if entry else None
            if (
                price is not None
                and entry is not None
                and entry.get("litellm_provider") == "fireworks_ai"
                and price.cache_read_input_token_cost is None
                and price.input_cost_per_token is not None
            ):
                # LiteLLM bills Fireworks cached prompt tokens at half the input rate when the map
                # gives no cache price (``with_default_cache_read_rate``); so do we.
                price = replace(
                    price, cache_read_input_token_cost=price.input_cost_per_token * FIREWORKS_CACHE_READ_RATIO
                )
            self._map_cache[model] = price
        return self._map_cache[model]

    def is_free_name(self, *names: str | None) -> bool:
        return any(n and n.endswith(tuple(self.config.free_model_suffixes)) for n in names)

    def price(
        self,
        model_group: str,
        model: str | None = None,
        deployment_params: Mapping[str, Any] | None = None,
    ) -> ModelPrice:
        """The price of one deployment of ``model_group`` (``model`` is its LiteLLM model)."""
        key = (model_group, model, _price_keys(deployment_params))
        price = self._prices.get(key)
        if price is None:
            price = self._price(model_group, model, deployment_params)
            if len(self._prices) >= MAX_REMEMBERED_PRICES:
                self._prices.clear()
            self._prices[key] = price
        return price

    def set_provider_prices(self, prices: Mapping[str, ModelPrice]) -> None:
        """Add or replace the prices a provider publishes (the prices worked out before are
        forgotten)."""
        self.provider_prices.update(prices)
        self._prices.clear()

    def _price(
        self, model_group: str, model: str | None, deployment_params: Mapping[str, Any] | None
    ) -> ModelPrice:
        names = [n for n in (model_group, model, model and _strip_provider(model)) if n]
        override = next((self.config.models[n] for n in names if n in self.config.models), None)
        if self.is_free_name(*names) or (override is not None and override.free):
            return FREE
        base: ModelPrice | None = None
        if deployment_params:
            base = ModelPrice.from_mapping(deployment_params, "deployment")
        if base is None:
            base = next((p for p in (self.from_map(n) for n in names[1:] + names[:1]) if p), None)
        if base is None and model in self.provider_prices:
            base = self.provider_prices[model]
            if base.free:
                return FREE
        if base is None and self.config.unknown_model_price is not None:
            base = replace(
                ModelPrice().overlay(self.config.unknown_model_price), source="unknown_model_price"
            )
        if override is not None:
            base = (base or ModelPrice()).overlay(override)
        if base is None or not base.priced:
            raise ModelNotPriced(
                f"model {model_group!r} has no price; set one in credits.yaml or on the deployment",
                param="model",
                model=model_group,
            )
        if any(n.startswith("openrouter/") for n in names) and self.config.openrouter_markup:
            # resold OpenRouter models carry the operator's margin (free ones returned above)
            base = base.scaled(1 + self.config.openrouter_markup)
        return base

    def output_cap(self, price: ModelPrice, requested: int | None) -> int:
        """Output tokens the estimate assumes: the request's max_tokens, else the model's cap."""
        if requested is not None:
            return requested
        return price.max_output_tokens or self.config.default_max_output_tokens

    def power_level(self, requested: str | None) -> PowerLevel:
        if requested is None or requested == "":
            return self.config.default_power_level
        if requested not in self.config.power_levels:
            raise InvalidRequest(
                f"power_level must be one of {', '.join(self.config.power_levels)}", param="power_level"
            )
        return requested  # type: ignore[return-value]

    def rate(self, tier: str, power_level: PowerLevel) -> Decimal:
        """Credits charged per USD of upstream cost for this tier and power level."""
        tier_cfg = self.config.tiers.get(tier) or self.config.tiers[self.config.default_tier]
        with localcontext(EXACT):
            return self.config.credits_per_usd * self.config.power_levels[power_level] * (1 + tier_cfg.markup)

    def is_unlimited(self, tier: str) -> bool:
        tier_cfg = self.config.tiers.get(tier) or self.config.tiers[self.config.default_tier]
        return tier_cfg.unlimited

    @staticmethod
    def to_micro(usd: Decimal, rate: Decimal) -> int:
        """Micro-credits for ``usd`` at ``rate`` credits per USD, rounded up."""
        with localcontext(EXACT):
            return micro_ceil(usd * rate)


__all__ = [
    "EXACT",
    "FREE",
    "PRICE_KEYS",
    "ModelPrice",
    "Pricing",
    "Usage",
    "audio_second_rate",
    "max_price",
    "transcription_usage",
    "usd_cost",
    "worst_case",
    "worst_rates",
]
