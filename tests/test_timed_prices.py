"""Prices that change by time and service tier, against ``litellm.cost_per_token``.

Every model in LiteLLM's map with an ``off_peak_pricing`` block or service-tier keys is priced on
both sides of its windows (the clock frozen with LiteLLM's ``pinned_billing_time``) and at every
service tier, and must equal what LiteLLM computes for the same usage, time and tier.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from types import SimpleNamespace
from typing import Any

import litellm
import pytest
from litellm._internal_context import pinned_billing_time
from litellm.litellm_core_utils.llm_cost_calc.utils import generic_cost_per_token
from litellm.llms.fireworks_ai.cost_calculator import _resolve_model_info
from litellm.types.utils import CompletionTokensDetailsWrapper, PromptTokensDetailsWrapper
from litellm.types.utils import Usage as LiteLLMUsage

from litellm_credits.hooks import CreditsHandler
from litellm_credits.ledger import Ledger
from litellm_credits.money import parse_credits as c
from litellm_credits.pricing import Pricing, Usage, max_price, usd_cost
from litellm_credits.runtime import Runtime
from litellm_credits.settings import CreditsConfig, Settings
from litellm_credits.timed_prices import OffPeak, billable_service_tier, tier_suffix

from .test_pricing import UNITS_PER_USD, agrees, no_network  # noqa: F401

TIERS = (None, "flex", "priority", "balanced", "ultrafast", "fast", "auto", "default")
# (prompt, completion, cached, reasoning), OpenAI-style: cached inside prompt, reasoning in completion
USAGES = [(12_223, 1_984, 0, 0), (1_234, 567, 300, 100), (300_000, 5_000, 1_000, 200)]
# a weekday morning and evening (UTC), a Saturday, and around DeepSeek's 00:00-01:00 window
MOMENTS = [
    datetime(2026, 12, 2, 9, 0, tzinfo=timezone.utc),
    datetime(2026, 12, 2, 17, 0, tzinfo=timezone.utc),
    datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc),
    datetime(2026, 12, 2, 0, 59, 59, tzinfo=timezone.utc),
    datetime(2026, 12, 2, 1, 0, 0, tzinfo=timezone.utc),
]
_TIER_SUFFIXES = ("_flex", "_priority", "_balanced", "_ultrafast")


def timed_models() -> list[str]:
    """Models whose price depends on the time or the service tier, priced per token."""
    names = []
    for name, entry in litellm.model_cost.items():
        timed = "off_peak_pricing" in entry or any(
            ("cost" in k and k.endswith(_TIER_SUFFIXES))
            or ("cost" in k and any(f"{t}_above" in k for t in _TIER_SUFFIXES))
            for k in entry
        )
        if (
            timed
            and isinstance(entry.get("litellm_provider"), str)
            and entry.get("input_cost_per_token") is not None
        ):
            names.append(name)
    return sorted(names)


def unpriced_timed_models() -> list[str]:
    """Models priced for a service tier only: without a standard price they are refused as
    unpriced, whatever tier a request asks for (LiteLLM bills them 0 at the standard tier)."""
    return sorted(
        name
        for name, entry in litellm.model_cost.items()
        if entry.get("input_cost_per_token") is None
        and any(k.startswith("input_cost_per_token_") and k.endswith(_TIER_SUFFIXES) for k in entry)
    )


def litellm_usage(prompt: int, completion: int, cached: int, reasoning: int) -> LiteLLMUsage:
    return LiteLLMUsage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetailsWrapper(cached_tokens=cached) if cached else None,
        completion_tokens_details=CompletionTokensDetailsWrapper(reasoning_tokens=reasoning)
        if reasoning
        else None,
    )


def theirs(name: str, tier: str | None, moment: datetime, counts: tuple[int, int, int, int]) -> Fraction:
    """LiteLLM's cost in our smallest unit, for the tier the call was billed at."""
    entry = litellm.model_cost[name]
    provider = entry["litellm_provider"]
    model = name if name.startswith(provider + "/") else f"{provider}/{name}"
    usage = litellm_usage(*counts)
    if provider == "fireworks_ai":
        # LiteLLM's Fireworks entry point drops the service tier (it bills priority at the standard
        # rate, though the map prices it higher); the rule engine it calls, given the tier, is the
        # reference: the plugin charges the map's priority price
        bare = model.split("/", 1)[1]
        prompt_usd, completion_usd = generic_cost_per_token(
            model=bare,
            usage=usage,
            custom_llm_provider=provider,
            model_info=_resolve_model_info(bare),
            current_time=moment,
            service_tier=tier,
        )
    else:
        with pinned_billing_time(moment):
            prompt_usd, completion_usd = litellm.cost_per_token(
                model=model, custom_llm_provider=provider, usage_object=usage, service_tier=tier
            )
    return (Fraction(prompt_usd) + Fraction(completion_usd)) * UNITS_PER_USD


def ours(p: Pricing, name: str, tier: str | None, moment: datetime, counts: tuple[int, int, int, int]) -> int:
    entry = litellm.model_cost[name]
    provider = entry["litellm_provider"]
    model = name if name.startswith(provider + "/") else f"{provider}/{name}"
    prompt, completion, cached, reasoning = counts
    usage = Usage(
        prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached, reasoning_tokens=reasoning
    )
    billed = billable_service_tier(tier, None)
    return p.to_micro(usd_cost(p.price(name, model).at(billed, moment), usage), p.rate("free", "balanced"))


@pytest.mark.parametrize("moment", MOMENTS, ids=lambda m: m.strftime("%a-%H:%M:%S"))
def test_every_timed_model_matches_litellm(moment: datetime, no_network: None) -> None:  # noqa: F811
    names = timed_models()
    assert len(names) >= 300, len(names)
    assert any("off_peak_pricing" in litellm.model_cost[n] for n in names)
    p = Pricing(CreditsConfig(credits_per_usd=1_000_000))  # LiteLLM's own map
    mismatches = []
    for name in names:
        for tier in TIERS:
            for counts in USAGES:
                mine, reference = ours(p, name, tier, moment, counts), theirs(name, tier, moment, counts)
                if not agrees(mine, reference):
                    mismatches.append((name, tier, counts[0], mine, float(reference)))
    assert not mismatches, f"{len(mismatches)} differ: {mismatches[:10]}"


def test_models_priced_only_for_a_tier_are_refused() -> None:
    p = Pricing(CreditsConfig())
    for name in unpriced_timed_models():
        with pytest.raises(Exception, match="no price"):
            p.price(name)


def test_deepseek_off_peak_is_half_price() -> None:
    """The issue's own example: deepseek-flash, 12,223 in and 1,984 out, in the window: 3.023850
    credits (LiteLLM's figure), not the 6.047700 charged at the standard rate before."""
    p = Pricing(CreditsConfig(credits_per_usd=1000))
    price = p.price("deepseek-flash", "deepseek/deepseek-flash")
    usage = Usage(prompt_tokens=12_223, completion_tokens=1_984)
    rate = p.rate("free", "balanced")
    weekday_peak = datetime(2026, 12, 2, 2, 30, tzinfo=timezone.utc)  # Wednesday, outside the windows
    saturday = datetime(2026, 12, 5, 2, 30, tzinfo=timezone.utc)
    assert p.to_micro(usd_cost(price.at(None, weekday_peak), usage), rate) == c("6.0477")
    assert p.to_micro(usd_cost(price.at(None, saturday), usage), rate) == c("3.02385")


def test_window_edges() -> None:
    block = {"input_cost_per_token": 1, "hours_utc": ["16:30-00:30", "04:00-06:00"]}
    peak = OffPeak.from_mapping(block)
    assert peak is not None
    at = lambda h, m, s=0: datetime(2026, 12, 2, h, m, s, tzinfo=timezone.utc)  # noqa: E731
    assert peak.covers(at(16, 30)) and peak.covers(at(0, 29, 59)) and not peak.covers(at(0, 30))
    assert peak.covers(at(4, 0)) and not peak.covers(at(6, 0)) and not peak.covers(at(12, 0))
    # weekdays are read on the block's calendar, hours in UTC
    shanghai = OffPeak.from_mapping(
        {"weekday_timezone": "Asia/Shanghai", "windows": [{"hours_utc": "17:00-18:00", "weekdays": ["sat"]}]}
    )
    assert shanghai is not None
    assert shanghai.covers(datetime(2026, 12, 4, 17, 30, tzinfo=timezone.utc))  # Friday UTC, Saturday there
    assert not shanghai.covers(datetime(2026, 12, 5, 17, 30, tzinfo=timezone.utc))
    # malformed windows and rates are ignored, as LiteLLM ignores them
    broken = OffPeak.from_mapping({"input_cost_per_token": "x", "hours_utc": ["25:00-", 7]})
    assert broken is not None and broken.rates == () and not broken.covers(at(1, 0))


def test_billable_service_tier() -> None:
    assert billable_service_tier("priority", None) == "priority"
    assert billable_service_tier("priority", "default") is None  # the provider served standard
    assert billable_service_tier(None, "flex") == "flex"
    assert billable_service_tier("auto", None) is None
    assert tier_suffix("fast") == "priority" and tier_suffix("auto") is None


def test_the_hold_takes_the_rate_of_its_start_and_any_tier_it_may_be_served() -> None:
    """The hold and the settlement price at the same moment (the request's start), so the hold
    takes that moment's rate; a request that asks for a service tier may be served at it or at
    the standard one, and is held at the higher."""
    p = Pricing(CreditsConfig())
    price = p.price("deepseek-flash", "deepseek/deepseek-flash")
    inside = datetime(2026, 12, 2, 0, 30, tzinfo=timezone.utc)  # in the 00:00-01:00 window
    outside = datetime(2026, 12, 2, 2, 30, tzinfo=timezone.utc)
    assert (
        max_price(price.variants(None, inside)).input_cost_per_token
        == price.at(None, inside).input_cost_per_token
    )
    assert max_price(price.variants(None, outside)).input_cost_per_token == price.input_cost_per_token
    gpt = p.price("gpt-5", "openai/gpt-5")
    flex, priority = max_price(gpt.variants("flex", inside)), max_price(gpt.variants("priority", inside))
    assert flex.input_cost_per_token == gpt.input_cost_per_token  # flex is cheaper: standard bounds it
    assert priority.input_cost_per_token == gpt.at("priority").input_cost_per_token


# --- through the hook, with the clock at a request's start ----------------------------------------

CONFIG = {"credits_per_usd": 1000, "tiers": {"free": {}}, "default_max_output_tokens": 4000}


@pytest.fixture(scope="module")
async def runtime(settings: Settings) -> Any:
    rt = Runtime(settings.model_copy(update={"credits": CreditsConfig.model_validate(CONFIG)}))
    yield rt
    await rt.close()


def auth(user: str) -> Any:
    return SimpleNamespace(user_id=user, team_id=None, end_user_id=None, token="h", user_role="internal_user")


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        (datetime(2026, 12, 2, 2, 30, tzinfo=timezone.utc), "6.0477"),  # a Wednesday, peak
        (datetime(2026, 12, 5, 2, 30, tzinfo=timezone.utc), "3.02385"),  # a Saturday, off-peak
    ],
)
async def test_a_request_is_charged_at_the_rate_of_its_start(
    runtime: Runtime, start: datetime, expected: str
) -> None:
    """The success event comes an hour later, past the window's edge: the start's rate applies."""
    handler = CreditsHandler(runtime, deployments=lambda group: [], clock=start.timestamp)
    ledger: Ledger = await runtime.ledger()
    user = "timed-" + secrets.token_hex(4)
    await ledger.create_account(user, tier="free")
    await ledger.credit(user, c("100"))
    data = await handler.async_pre_call_hook(
        auth(user),
        None,
        {"model": "deepseek-flash", "messages": [{"role": "user", "content": "hi"}]},
        "acompletion",
    )
    kwargs = {
        "litellm_params": {"metadata": data["metadata"], "model_info": {}},
        "standard_logging_object": {"model_group": "deepseek-flash"},
        "model": "deepseek-flash",
        "custom_llm_provider": "deepseek",
    }
    later = start + timedelta(hours=1)
    response = {"usage": {"prompt_tokens": 12_223, "completion_tokens": 1_984}}
    await handler.async_log_success_event(kwargs, response, later, later)
    assert (await ledger.require_account(user)).balance == c("100") - c(expected)


async def test_a_service_tier_is_held_and_charged_at_its_rate(runtime: Runtime) -> None:
    handler = CreditsHandler(runtime, deployments=lambda group: [])
    ledger: Ledger = await runtime.ledger()
    user = "tiered-" + secrets.token_hex(4)
    await ledger.create_account(user, tier="free")
    await ledger.credit(user, c("100"))
    request = {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    standard = await handler.async_pre_call_hook(auth(user), None, dict(request), "acompletion")
    standard_held = (await ledger.require_account(user)).held
    priority = await handler.async_pre_call_hook(
        auth(user), None, {**request, "service_tier": "priority"}, "acompletion"
    )
    assert (await ledger.require_account(user)).held - standard_held > standard_held  # priority costs more
    usage = {"usage": {"prompt_tokens": 1000, "completion_tokens": 100}}
    for data, served in ((standard, None), (priority, "priority")):
        kwargs = {
            "litellm_params": {"metadata": data["metadata"], "model_info": {}},
            "standard_logging_object": {"model_group": "gpt-5"},
            "model": "gpt-5",
            "custom_llm_provider": "openai",
            "optional_params": {"service_tier": data.get("service_tier")},
        }
        now = datetime.now(timezone.utc)
        await handler.async_log_success_event(kwargs, {**usage, "service_tier": served}, now, now)
    rows = await ledger.pool.fetch(
        "SELECT charged, metadata FROM credits.usage_events WHERE subject_id = $1 ORDER BY id", user
    )
    p = Pricing(runtime.settings.credits)
    expected = [
        p.to_micro(usd_cost(p.price("gpt-5", "openai/gpt-5").at(tier), Usage(1000, 100)), Decimal(1000))
        for tier in (None, "priority")
    ]
    assert [r["charged"] for r in rows] == expected
    assert rows[1]["metadata"]["service_tier"] == "priority"
    # and LiteLLM prices the priority call the same
    prompt_usd, completion_usd = litellm.cost_per_token(
        model="openai/gpt-5",
        usage_object=LiteLLMUsage(prompt_tokens=1000, completion_tokens=100, total_tokens=1100),
        service_tier="priority",
    )
    exact = usd_cost(p.price("gpt-5", "openai/gpt-5").at("priority"), Usage(1000, 100))
    assert abs(Fraction(exact) - Fraction(prompt_usd) - Fraction(completion_usd)) < Fraction(1, 10**12)
