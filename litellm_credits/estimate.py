"""What a request may cost before it runs: its prompt, its output limit, what a clamped hold
leaves it, and the price of calls billed by the unit.

Arithmetic only: the hook hands over the request and the model's worst price (every service tier
and time window it may be billed at already folded in), and gets an :class:`Estimate` in USD at
list price, which each tier's rate (markup, power level) turns into credits.

A token request's worst case is its prompt at the highest input rate plus its output limit at the
highest output rate; without an output limit, the model's (or ``default_max_output_tokens``).
When that does not fit, a clamped hold takes what is left, and :meth:`Estimate.covered_output_tokens`
says how many output tokens that covers after the prompt: the limit the request then goes out
with. Prompt-only calls and calls priced by the unit are never clamped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from math import floor
from typing import Any

from .errors import CostNotBounded, InvalidRequest
from .money import MICRO
from .pricing import EXACT, ModelPrice, Pricing, audio_second_rate, worst_rates
from .records import Service

ZERO = Decimal(0)
MAX_OUTPUT_TOKENS = 10_000_000
MAX_CHOICES = 128
# the request parameters that limit output, in the order they are read
OUTPUT_PARAMS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# what a clamped request sets when it named none (LiteLLM maps max_tokens to each provider's own)
_DEFAULT_OUTPUT_PARAM = {"responses": "max_output_tokens", "aresponses": "max_output_tokens"}

TokenCounter = Callable[..., int]


@dataclass(frozen=True)
class Estimate:
    """The most a request may cost, in USD at list price, and what clamping it needs."""

    usd: Decimal
    prompt_tokens: int = 0
    prompt_usd: Decimal = ZERO  # the prompt at its highest rate
    output_usd: Decimal = ZERO  # one output token at its highest rate
    output_tokens: int = 0  # the output limit the worst case assumes, per choice
    choices: int = 1
    # where the output limit goes when the request is clamped
    output_params: tuple[str, ...] = ()
    # a clamped request keeps at least this many output tokens per choice; None: never clamped
    min_output_tokens: int | None = None
    requested: int | None = None  # the output limit the request itself set, if any
    seconds: Decimal | None = None  # a transcription's audio, as held

    def amount(self, rate: Decimal) -> int:
        """The hold at ``rate`` credits per USD, in micro-credits."""
        return Pricing.to_micro(self.usd, rate)

    def minimum(self, rate: Decimal) -> int | None:
        """The least a clamped hold may take at ``rate``; None when the request is never clamped."""
        if self.min_output_tokens is None:
            return None
        with localcontext(EXACT):
            usd = self.prompt_usd + self.min_output_tokens * self.choices * self.output_usd
        return Pricing.to_micro(usd, rate)

    def covered_output_tokens(self, amount: int, rate: Decimal) -> int:
        """Output tokens per choice that ``amount`` micro-credits cover at ``rate`` after the
        prompt (0 when not even the prompt fits), never more than the request's own limit.

        Exact: a hold of this amount pays the prompt and this many tokens in every choice at the
        highest rates, rounded up to the micro-credit as a charge is.
        """
        if self.output_usd <= 0:
            return self.output_tokens
        per_usd = Fraction(rate) * MICRO
        left = Fraction(amount) - Fraction(self.prompt_usd) * per_usd
        if left <= 0:
            return 0
        tokens = floor(left / (Fraction(self.output_usd) * per_usd))
        return min(tokens // self.choices, self.output_tokens)


def choices(data: Mapping[str, Any]) -> int:
    """How many choices the request asks for (``n``), each billed."""
    n = data.get("n")
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
        raise InvalidRequest(f"n must be an integer from 1 to {MAX_CHOICES}", param="n")
    return n


def requested_output(data: Mapping[str, Any]) -> tuple[int | None, tuple[str, ...]]:
    """The request's output limit (the least of those it sets) and the parameters that set it."""
    found: dict[str, int] = {}
    for key in OUTPUT_PARAMS:
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_OUTPUT_TOKENS:
            raise InvalidRequest(f"{key} must be an integer from 0 to {MAX_OUTPUT_TOKENS}", param=key)
        found[key] = value
    return (min(found.values()) if found else None), tuple(found)


def count_prompt_tokens(data: Mapping[str, Any], model: str, service: Service, counter: TokenCounter) -> int:
    """The prompt's tokens by the model's tokenizer (LiteLLM's ``token_counter``); a tokenizer
    that fails counts a character a token, so no request goes out unpriced."""
    try:
        if data.get("messages"):
            return int(counter(model=model, messages=data["messages"]))
        text = data.get("input") if service in ("embedding", "chat") else data.get("prompt")
        if isinstance(text, list):
            text = " ".join(str(t) for t in text)
        return int(counter(model=model, text=str(text or "")))
    except Exception:
        return len(json.dumps(data.get("messages") or data.get("input") or "", default=str))


def _thinking_budget(data: Mapping[str, Any]) -> int:
    """The thinking budget a request sets (``{"thinking": {"type": "enabled", "budget_tokens": N}}``),
    or 0."""
    thinking = data.get("thinking")
    if not isinstance(thinking, Mapping) or thinking.get("type") != "enabled":
        return 0
    budget = thinking.get("budget_tokens")
    return budget if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0 else 0


def estimate_tokens(
    data: Mapping[str, Any],
    price: ModelPrice,
    *,
    call_type: str,
    service: Service,
    prompt_tokens: int,
    default_output_tokens: int,
    min_output_tokens: int,
) -> Estimate:
    """A call billed by its tokens: chat (clamped when short), embeddings and others (prompt
    only, never clamped). The request's ``n`` and output limits are checked first, whatever the
    price (a free call with a bad ``max_tokens`` is refused like any other)."""
    n = choices(data)
    requested, params = requested_output(data)
    if price.free:
        return Estimate(ZERO, prompt_tokens=prompt_tokens, requested=requested)
    if not price.priced_by_token:
        raise CostNotBounded(
            "this model is not priced by the token, so nothing bounds the call's cost before it runs; "
            "the operator may allow such calls with unbounded_hold",
            param="model",
        )
    in_rate, out_rate = worst_rates(price, prompt_tokens)
    if service != "chat":
        with localcontext(EXACT):
            usd = prompt_tokens * in_rate
        return Estimate(usd, prompt_tokens=prompt_tokens, prompt_usd=usd)
    output = requested if requested is not None else (price.max_output_tokens or default_output_tokens)
    with localcontext(EXACT):
        prompt_usd = prompt_tokens * in_rate
        usd = prompt_usd + output * n * out_rate
    # Anthropic's extended thinking needs max_tokens above its budget: a clamped request keeps it
    floor_tokens = min(max(min_output_tokens, _thinking_budget(data) + 1), output)
    return Estimate(
        usd,
        prompt_tokens=prompt_tokens,
        prompt_usd=prompt_usd,
        output_usd=out_rate,
        output_tokens=output,
        choices=n,
        output_params=params or (_DEFAULT_OUTPUT_PARAM.get(call_type, "max_tokens"),),
        min_output_tokens=floor_tokens if out_rate > 0 and floor_tokens < output else None,
        requested=requested,
    )


def estimate_units(
    data: Mapping[str, Any],
    price: ModelPrice,
    *,
    service: Service,
    image_price: Decimal | None = None,
    audio_seconds: Decimal | None = None,
) -> Estimate:
    """A call billed by the unit: images (the map's price for the size and quality, times n),
    speech (per character of input) and transcription (per second of audio)."""
    if price.free:
        return Estimate(ZERO)
    usd: Decimal | None = None
    with localcontext(EXACT):
        if service == "image" and image_price is not None:
            usd = image_price * choices(data)
        elif service == "audio_speech" and price.input_cost_per_character is not None:
            usd = len(str(data.get("input") or "")) * price.input_cost_per_character
        elif service == "audio_transcription" and audio_seconds is not None:
            if price.input_cost_per_second or price.output_cost_per_second:
                usd = audio_seconds * audio_second_rate(price)
    if usd is None:
        raise CostNotBounded(
            f"nothing in this model's price bounds a {service.replace('_', ' ')} call's cost before it "
            "runs; the operator may allow such calls with unbounded_hold",
            param="model",
        )
    return Estimate(usd, seconds=audio_seconds if service == "audio_transcription" else None)


__all__ = [
    "MAX_CHOICES",
    "MAX_OUTPUT_TOKENS",
    "OUTPUT_PARAMS",
    "Estimate",
    "choices",
    "count_prompt_tokens",
    "estimate_tokens",
    "estimate_units",
    "requested_output",
]
