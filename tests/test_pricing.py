"""Prices, power levels, tier markup and exact charges (no database).

The last part checks parity with LiteLLM's own cost calculator over its price map.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from litellm_credits.deployments import deployment_prices
from litellm_credits.errors import InvalidRequest, ModelNotPriced
from litellm_credits.money import MICRO
from litellm_credits.pricing import (
    FREE,
    PRICE_KEYS,
    ModelPrice,
    Pricing,
    Usage,
    max_price,
    usd_cost,
    worst_case,
)
from litellm_credits.settings import POWER_LEVELS, CreditsConfig

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

CREDITS_TEST_CONFIG = Path(__file__).resolve().parent / "credits_test.yaml"

# a small price map of our own, so most tests do not depend on LiteLLM's
MAP: dict[str, dict[str, Any]] = {
    "mapped": {
        "litellm_provider": "openai",
        "mode": "chat",
        "input_cost_per_token": 1e-06,
        "output_cost_per_token": 2e-06,
        "cache_read_input_token_cost": 5e-07,
        "max_output_tokens": 8192,
    },
    "other-mapped": {"input_cost_per_token": 4e-06, "output_cost_per_token": 8e-06},
    "zero-priced": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0},
    "no-prices": {"mode": "chat", "max_tokens": 1000},
    "fireworks_ai/accounts/fireworks/models/some-model": {
        "litellm_provider": "fireworks_ai",
        "input_cost_per_token": 9e-07,
        "output_cost_per_token": 9e-07,
    },
    "fireworks_ai/accounts/fireworks/models/cache-priced": {
        "litellm_provider": "fireworks_ai",
        "input_cost_per_token": 9e-07,
        "output_cost_per_token": 9e-07,
        "cache_read_input_token_cost": 1e-07,
    },
}


def config(**overrides: Any) -> CreditsConfig:
    data = yaml.safe_load(CREDITS_TEST_CONFIG.read_text())["credits"]
    data.update(overrides)
    return CreditsConfig.model_validate(data)


def pricing(**overrides: Any) -> Pricing:
    return Pricing(config(**overrides), model_cost=MAP)


def D(value: str) -> Decimal:
    return Decimal(value)


# --- power levels -------------------------------------------------------------------------------


def test_power_levels_charge_in_rising_order() -> None:
    p = pricing()
    usd = usd_cost(p.price("mapped"), Usage(prompt_tokens=1234, completion_tokens=567))
    assert usd == D("0.002368")  # 1234 × 1e-6 + 567 × 2e-6
    charges = [p.to_micro(usd, p.rate("free", level)) for level in POWER_LEVELS]
    assert charges == [1_184_000, 2_368_000, 4_736_000]  # × 0.5, × 1, × 2 at 1000 credits/USD
    assert charges[0] < charges[1] < charges[2]


@given(st.integers(0, 10**7), st.integers(0, 10**6))
def test_power_levels_rise_for_any_usage(prompt: int, completion: int) -> None:
    p = pricing()
    usd = usd_cost(p.price("mapped"), Usage(prompt_tokens=prompt, completion_tokens=completion))
    eco, balanced, precision = (p.to_micro(usd, p.rate("free", level)) for level in POWER_LEVELS)
    if usd:
        assert eco < balanced < precision
    else:
        assert eco == balanced == precision == 0


def test_rates_follow_the_config() -> None:
    p = pricing(credits_per_usd="2500", power_levels={"eco": "0.25", "balanced": "1", "precision": "3.5"})
    assert p.rate("free", "eco") == D("625")
    assert p.rate("free", "balanced") == D("2500")
    assert p.rate("free", "precision") == D("8750")


@pytest.mark.parametrize(
    "levels",
    [
        {"eco": 1, "balanced": 1, "precision": 2},
        {"eco": 0.5, "balanced": 2, "precision": 2},
        {"eco": 2, "balanced": 1, "precision": 3},
        {"eco": 0.5, "balanced": 3, "precision": 2},
        {"eco": 0, "balanced": 1, "precision": 2},
        {"eco": -1, "balanced": 1, "precision": 2},
        {"eco": 0.5, "balanced": 1},
        {"eco": 0.5, "balanced": 1, "precision": 2, "turbo": 4},
        {"eco": "cheap", "balanced": 1, "precision": 2},
    ],
)
def test_config_rejects_power_levels_that_do_not_rise(levels: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        config(power_levels=levels)


def test_power_level_choice() -> None:
    p = pricing()
    assert p.power_level(None) == "balanced"
    assert p.power_level("") == "balanced"
    assert p.power_level("eco") == "eco"
    with pytest.raises(InvalidRequest) as err:
        p.power_level("turbo")
    assert err.value.param == "power_level"
    assert err.value.status == 400


# --- tiers --------------------------------------------------------------------------------------


def test_pro_tier_pays_exactly_ten_percent_more() -> None:
    p = pricing()
    assert p.rate("pro", "balanced") == p.rate("free", "balanced") * D("1.1")
    usd = usd_cost(p.price("mapped"), Usage(prompt_tokens=1000, completion_tokens=1000))  # 0.003 USD
    assert p.to_micro(usd, p.rate("free", "balanced")) == 3_000_000
    assert p.to_micro(usd, p.rate("pro", "balanced")) == 3_300_000


@given(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.sampled_from(POWER_LEVELS),
)
@example(1, 0, "balanced")  # 0.001 credits × 1.1 = 1100 micro exactly
@example(1, 0, "eco")  # 550 micro
@example(3, 7, "precision")
def test_markup_is_applied_before_rounding_up(prompt: int, completion: int, level: str) -> None:
    p = pricing()
    usd = usd_cost(p.price("mapped"), Usage(prompt_tokens=prompt, completion_tokens=completion))
    exact_free = Fraction(usd) * Fraction(p.rate("free", level))  # type: ignore[arg-type]
    exact_pro = exact_free * Fraction(11, 10)
    assert p.to_micro(usd, p.rate("pro", level)) == math.ceil(exact_pro * MICRO)  # type: ignore[arg-type]
    assert p.to_micro(usd, p.rate("free", level)) == math.ceil(exact_free * MICRO)  # type: ignore[arg-type]


def test_unknown_tier_is_charged_as_the_default_tier() -> None:
    p = pricing()
    assert p.rate("no-such-tier", "balanced") == p.rate("free", "balanced")
    assert p.is_unlimited("sponsored")
    assert not p.is_unlimited("pro")
    assert not p.is_unlimited("no-such-tier")


@pytest.mark.parametrize(
    "overrides",
    [
        {"tiers": {"free": {"markup": -0.1}}},
        {"default_tier": "gold"},
        {"credits_per_usd": 0},
        {"credits_per_usd": -5},
        {"credits_per_usd": "NaN"},
        {"credits_per_usd": True},
    ],
)
def test_config_rejects_bad_money_settings(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        config(**overrides)


# --- free models --------------------------------------------------------------------------------


BIG_USAGE = Usage(
    prompt_tokens=10**6,
    completion_tokens=10**5,
    cached_tokens=10,
    reasoning_tokens=10,
    images=3,
    input_seconds=D("12.5"),
    characters=99,
)


@pytest.mark.parametrize(
    ("group", "model"),
    [
        ("openrouter/some-model:free", None),
        ("my-group", "openrouter/meta/llama:free"),
        ("mapped:free", None),  # a free suffix wins even over a priced map entry
    ],
)
def test_free_suffix_costs_nothing(group: str, model: str | None) -> None:
    p = pricing()
    price = p.price(group, model)
    assert price is FREE
    assert usd_cost(price, BIG_USAGE) == 0
    assert worst_case(price, 10**6, 10**6, images=5) == 0


def test_free_suffixes_are_configurable() -> None:
    p = pricing(free_model_suffixes=["-gratis"])
    assert p.price("llama-gratis") is FREE
    with pytest.raises(ModelNotPriced):
        p.price("llama:free")


def test_free_override_in_config() -> None:
    p = pricing(models={"mapped": {"free": True}})
    price = p.price("mapped")
    assert price.free
    assert usd_cost(price, BIG_USAGE) == 0
    assert p.to_micro(usd_cost(price, BIG_USAGE), p.rate("pro", "precision")) == 0
    # an override on the underlying model makes the whole group free too
    p = pricing(models={"mapped": {"free": True}})
    assert p.price("any-group", "openai/mapped").free
    # and a free override beats deployment prices
    assert p.price("mapped", deployment_params={"input_cost_per_token": 1e-3}).free


def test_map_model_with_zero_prices_is_priced_and_free_of_charge() -> None:
    p = pricing()
    price = p.price("zero-priced")
    assert price.priced
    assert not price.free
    assert usd_cost(price, BIG_USAGE) == 0
    assert worst_case(price, 10**6, 10**6) == 0


def test_litellm_map_models_with_zero_prices_cost_nothing() -> None:
    import litellm

    zero = sorted(
        name
        for name, entry in litellm.model_cost.items()
        if entry.get("mode") == "chat"
        and entry.get("input_cost_per_token") == 0
        and entry.get("output_cost_per_token") == 0
    )
    assert zero, "LiteLLM's map has no zero-priced chat model any more"
    p = Pricing(config())
    for name in zero[:5]:
        price = p.price(name)
        assert price.source == "litellm"
        assert usd_cost(price, Usage(prompt_tokens=1000, completion_tokens=1000)) == 0


# --- unpriced models ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "model"), [("no-such-model", None), ("no-prices", None), ("g", "x/no-prices")]
)
def test_unpriced_model_is_refused(group: str, model: str | None) -> None:
    p = pricing()
    with pytest.raises(ModelNotPriced) as err:
        p.price(group, model)
    assert err.value.type == "model_not_priced"
    assert err.value.status == 400
    assert err.value.param == "model"
    assert err.value.details == {"model": group}
    body = err.value.to_body()["error"]
    assert body["type"] == "model_not_priced"
    assert body["code"] == "400"
    assert group in body["message"]


def test_an_override_without_any_price_does_not_price_a_model() -> None:
    p = pricing(models={"no-such-model": {"max_output_tokens": 100}})
    with pytest.raises(ModelNotPriced):
        p.price("no-such-model")


def test_unknown_model_price_prices_everything_else() -> None:
    p = pricing(unknown_model_price={"input_cost_per_token": "0.00001", "output_cost_per_token": "0.00003"})
    price = p.price("no-such-model")
    assert price.source == "unknown_model_price"
    assert price.input_cost_per_token == D("0.00001")
    assert price.output_cost_per_token == D("0.00003")
    assert usd_cost(price, Usage(prompt_tokens=100, completion_tokens=10)) == D("0.0013")
    # it is only the last resort: known models keep their own price
    assert p.price("mapped").input_cost_per_token == D("0.000001")
    assert p.price("no-prices").input_cost_per_token == D("0.00001")


def test_unknown_model_price_under_a_per_model_override() -> None:
    p = pricing(
        unknown_model_price={"input_cost_per_token": "0.00001", "output_cost_per_token": "0.00003"},
        models={"no-such-model": {"output_cost_per_token": "0.00005"}},
    )
    price = p.price("no-such-model")
    assert (price.input_cost_per_token, price.output_cost_per_token) == (D("0.00001"), D("0.00005"))


# --- where a price comes from -------------------------------------------------------------------


def test_map_lookup_with_and_without_provider_prefix() -> None:
    p = pricing()
    for model in ("mapped", "openai/mapped", "azure/mapped"):
        price = p.price("group", model)
        assert price.source == "litellm"
        assert price.input_cost_per_token == D("0.000001")
        assert price.cache_read_input_token_cost == D("0.0000005")


def test_the_underlying_model_is_looked_up_before_the_group_name() -> None:
    # a group named like one model but routed to another is priced as the model it calls
    p = pricing()
    assert p.price("mapped", "openai/other-mapped").input_cost_per_token == D("0.000004")
    assert p.price("mapped", "no-such-model").input_cost_per_token == D("0.000001")


def test_deployment_prices_win_over_the_map() -> None:
    p = pricing()
    price = p.price(
        "mapped", "openai/mapped", {"input_cost_per_token": 3e-06, "output_cost_per_token": "4e-6"}
    )
    assert price.source == "deployment"
    assert price.input_cost_per_token == D("0.000003")
    assert price.output_cost_per_token == D("0.000004")
    # taken as a whole, like LiteLLM's custom pricing: the map's cache price does not leak in,
    # so cached tokens bill at the deployment's input rate
    assert price.cache_read_input_token_cost is None
    assert usd_cost(price, Usage(prompt_tokens=100, cached_tokens=100)) == D("0.0003")


def test_prices_in_model_info_hold_at_settlement_too() -> None:
    # the litellm_params of a success event name every price key, None where unset (LiteLLM's
    # get_litellm_params); the deployment's model_info prices must still apply
    p = pricing()
    info = {"input_cost_per_token": 3e-06, "output_cost_per_token": 4e-06}
    routed = deployment_prices({"model_info": info, "litellm_params": {"model": "openai/mapped"}})
    logged = deployment_prices(
        {"model_info": info, "litellm_params": {"model": "openai/mapped", "input_cost_per_token": None,
                                                 "output_cost_per_token": None}}
    )  # fmt: skip
    for params in (routed, logged):
        price = p.price("mapped", "openai/mapped", params)
        assert (price.source, price.input_cost_per_token) == ("deployment", D("0.000003"))
    # a price set in litellm_params wins over model_info's
    own = deployment_prices({"model_info": info, "litellm_params": {"input_cost_per_token": 5e-06}})
    assert p.price("mapped", "openai/mapped", own).input_cost_per_token == D("0.000005")


def test_deployment_without_prices_falls_back_to_the_map() -> None:
    p = pricing()
    price = p.price("mapped", "openai/mapped", {"api_base": "http://x", "input_cost_per_token": None})
    assert price.source == "litellm"


def test_prices_worked_out_once_follow_every_deployment_and_provider_price() -> None:
    # Pricing remembers what it answered; a deployment's own prices, output cap or off-peak
    # windows make it a different price, whatever else its parameters hold
    p = pricing(openrouter_markup=0)
    plain = {"api_base": "http://a", "api_key": "k1"}
    assert p.price("mapped", "openai/mapped", plain).source == "litellm"
    assert p.price("mapped", "openai/mapped", {**plain, "api_key": "k2"}) is p.price(
        "mapped", "openai/mapped", plain
    )
    dear = p.price("mapped", "openai/mapped", {**plain, "input_cost_per_token": 3e-06})
    assert dear.input_cost_per_token == D("0.000003")
    dearer = p.price("mapped", "openai/mapped", {**plain, "input_cost_per_token": 5e-06})
    assert dearer.input_cost_per_token == D("0.000005")
    capped = p.price(
        "mapped", "openai/mapped", {**plain, "input_cost_per_token": 3e-06, "max_output_tokens": 10}
    )
    assert capped.max_output_tokens == 10 and dear.max_output_tokens is None
    # a provider's published price replaces the one it published before
    p.set_provider_prices({"openrouter/x/y": ModelPrice(input_cost_per_token=D("1"), source="openrouter")})
    assert p.price("openrouter/x/y", "openrouter/x/y").input_cost_per_token == D("1")
    p.set_provider_prices({"openrouter/x/y": ModelPrice(input_cost_per_token=D("2"), source="openrouter")})
    assert p.price("openrouter/x/y", "openrouter/x/y").input_cost_per_token == D("2")


def test_config_override_wins_field_by_field() -> None:
    p = pricing(models={"mapped": {"output_cost_per_token": "0.000006", "max_output_tokens": 100}})
    # over a deployment
    price = p.price(
        "mapped", "openai/mapped", {"input_cost_per_token": 3e-06, "output_cost_per_token": 4e-06}
    )
    assert price.source == "config"
    assert price.input_cost_per_token == D("0.000003")  # deployment
    assert price.output_cost_per_token == D("0.000006")  # config
    assert price.max_output_tokens == 100
    # over the map
    price = p.price("mapped")
    assert price.input_cost_per_token == D("0.000001")  # map
    assert price.cache_read_input_token_cost == D("0.0000005")  # map
    assert price.output_cost_per_token == D("0.000006")  # config


def test_config_override_by_group_model_or_bare_model_name() -> None:
    p = pricing(
        models={
            "my-group": {"input_cost_per_token": "0.1"},
            "openai/mapped": {"input_cost_per_token": "0.2"},
            "other-mapped": {"input_cost_per_token": "0.3"},
        }
    )
    assert p.price("my-group", "openai/mapped").input_cost_per_token == D("0.1")  # the group first
    assert p.price("g", "openai/mapped").input_cost_per_token == D("0.2")
    assert p.price("g", "openai/other-mapped").input_cost_per_token == D("0.3")
    assert p.price("g", "openai/other-mapped").output_cost_per_token == D("0.000008")


def test_float_unfriendly_deployment_prices_charge_exactly() -> None:
    p = pricing()  # 1000 credits per USD
    price = p.price(
        "custom", "openai/custom", {"input_cost_per_token": 1.1e-6, "output_cost_per_token": 3.3e-6}
    )
    assert price.input_cost_per_token == D("0.0000011")
    assert price.output_cost_per_token == D("0.0000033")
    usd = usd_cost(price, Usage(prompt_tokens=1000, completion_tokens=1000))
    assert usd == D("0.0044")
    assert p.to_micro(usd, p.rate("free", "balanced")) == 4_400_000  # exactly 4.4 credits
    assert p.to_micro(usd, p.rate("pro", "balanced")) == 4_840_000


@given(st.integers(0, 10**7), st.integers(0, 10**7))
@example(1000, 1000)
@example(3, 0)  # 3 × 1.1e-6 is 3.3000000000000003e-06 in floats
def test_float_unfriendly_prices_are_exact_for_any_token_count(prompt: int, completion: int) -> None:
    p = pricing()
    price = p.price("custom", None, {"input_cost_per_token": 1.1e-6, "output_cost_per_token": 3.3e-6})
    micro = p.to_micro(usd_cost(price, Usage(prompt_tokens=prompt, completion_tokens=completion)), D(1000))
    # 1.1 and 3.3 micro-dollars at 1000 credits per dollar: 1100 and 3300 micro-credits a token;
    # in floats 3 × 1.1e-6 × 1000 is 0.0033000000000000004 credits, rounded up to 3301
    assert micro == 1100 * prompt + 3300 * completion


def test_yaml_prices_are_read_exactly() -> None:
    data = yaml.safe_load(
        """
        models:
          a: {input_cost_per_token: 1.1e-6, output_cost_per_token: 3.3e-6}
          b: {input_cost_per_token: "1.1e-6", output_cost_per_token: 0.0000033}
          c: {input_cost_per_token: 1e-6, output_cost_per_token: 3e-6}
        """
    )
    p = Pricing(CreditsConfig.model_validate(data), model_cost={})
    for name in ("a", "b"):
        price = p.price(name)
        assert (price.input_cost_per_token, price.output_cost_per_token) == (D("0.0000011"), D("0.0000033"))
    # YAML 1.1 reads 1e-6 (no dot) as a string; it is still the same exact price
    price = p.price("c")
    assert (price.input_cost_per_token, price.output_cost_per_token) == (D("0.000001"), D("0.000003"))


def test_charges_stay_exact_beyond_28_significant_digits() -> None:
    # a price written with more digits than the default decimal context keeps: rounding the
    # product to 28 digits would drop the tail and charge 3000 micro-credits instead of 3001
    p = pricing(models={"long": {"input_cost_per_token": "0.0000010000000000000000000000000001"}})
    usd = usd_cost(p.price("long"), Usage(prompt_tokens=3))
    assert usd == D("0.0000030000000000000000000000000003")
    assert p.to_micro(usd, p.rate("free", "balanced")) == 3001
    rate = D("1000.0000000000000000000000000001")
    assert Pricing.to_micro(D("0.000001"), rate) == 1001  # 1000.000…0001 micro-credits, rounded up


def test_fireworks_cached_tokens_default_to_half_the_input_rate() -> None:
    # LiteLLM bills Fireworks cached prompt tokens at 50 % of the input rate when its map has no
    # cache price (litellm.llms.fireworks_ai.cache_pricing)
    p = pricing()
    price = p.price("fw", "fireworks_ai/accounts/fireworks/models/some-model")
    assert price.cache_read_input_token_cost == D("0.00000045")
    assert p.price(
        "fw", "fireworks_ai/accounts/fireworks/models/cache-priced"
    ).cache_read_input_token_cost == D("0.0000001")
    # only for Fireworks
    assert p.price("other-mapped").cache_read_input_token_cost is None


# --- token kinds and units ----------------------------------------------------------------------


def price_of(**fields: str) -> ModelPrice:
    return ModelPrice(**{k: D(v) for k, v in fields.items()})  # type: ignore[arg-type]


def test_cached_tokens_at_the_cache_read_rate() -> None:
    price = price_of(input_cost_per_token="0.000001", cache_read_input_token_cost="0.0000001")
    assert usd_cost(price, Usage(prompt_tokens=1000, cached_tokens=400)) == D("0.00064")  # 600 + 40 µ$
    # cached tokens are part of the prompt: more cached than prompt tokens cannot bill twice
    assert usd_cost(price, Usage(prompt_tokens=100, cached_tokens=400)) == D("0.00001")


def test_cached_tokens_at_the_input_rate_without_a_cache_price() -> None:
    price = price_of(input_cost_per_token="0.000001")
    assert usd_cost(price, Usage(prompt_tokens=1000, cached_tokens=400)) == D("0.001")


def test_cache_creation_tokens() -> None:
    price = price_of(
        input_cost_per_token="0.000001",
        cache_read_input_token_cost="0.0000001",
        cache_creation_input_token_cost="0.00000125",
    )
    usage = Usage(prompt_tokens=1000, cached_tokens=300, cache_creation_tokens=200)
    assert usd_cost(price, usage) == D("0.00078")  # 500 × 1 + 300 × 0.1 + 200 × 1.25 µ$
    assert usd_cost(price_of(input_cost_per_token="0.000001"), usage) == D("0.001")


def test_reasoning_tokens_at_the_reasoning_rate() -> None:
    price = price_of(output_cost_per_token="0.000002", output_cost_per_reasoning_token="0.000005")
    # 70 × 2 + 30 × 5 micro-dollars
    assert usd_cost(price, Usage(completion_tokens=100, reasoning_tokens=30)) == D("0.00029")
    assert usd_cost(price, Usage(completion_tokens=10, reasoning_tokens=30)) == D("0.00005")  # clamped


def test_reasoning_tokens_at_the_output_rate_without_a_reasoning_price() -> None:
    price = price_of(output_cost_per_token="0.000002")
    assert usd_cost(price, Usage(completion_tokens=100, reasoning_tokens=30)) == D("0.0002")


@pytest.mark.parametrize(
    ("field", "usage", "expected"),
    [
        ("input_cost_per_image", Usage(images=3), D("0.03")),
        ("output_cost_per_image", Usage(images=3), D("0.03")),
        ("input_cost_per_second", Usage(input_seconds=D("2.5")), D("0.025")),
        ("output_cost_per_second", Usage(output_seconds=D("0.125")), D("0.00125")),
        ("input_cost_per_character", Usage(characters=1234), D("12.34")),
    ],
)
def test_per_unit_prices(field: str, usage: Usage, expected: Decimal) -> None:
    assert usd_cost(price_of(**{field: "0.01"}), usage) == expected
    # a unit the model has no price for costs nothing
    assert usd_cost(price_of(input_cost_per_token="0.01"), usage) == 0


def test_units_add_up() -> None:
    price = price_of(
        input_cost_per_token="0.000001",
        output_cost_per_token="0.000002",
        input_cost_per_image="0.001",
        output_cost_per_image="0.04",
        input_cost_per_second="0.0001",
        output_cost_per_second="0.0002",
        input_cost_per_character="0.00001",
    )
    usage = Usage(
        prompt_tokens=100,
        completion_tokens=10,
        images=2,
        input_seconds=D("10"),
        output_seconds=D("5"),
        characters=1000,
    )
    # 0.0001 + 0.00002 + 2 × 0.041 + 0.001 + 0.001 + 0.01
    assert usd_cost(price, usage) == D("0.09412")


@pytest.mark.parametrize(
    "field",
    ["prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "images", "characters"],
)
def test_negative_usage_is_refused(field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        Usage(**{field: -1})
    assert err.value.param == field


def test_from_mapping_reads_litellm_style_values() -> None:
    price = ModelPrice.from_mapping(
        {"input_cost_per_token": "3e-7", "output_cost_per_token": 1.1e-6, "cache_read_input_token_cost": 0},
        "x",
    )
    assert price is not None
    assert price.input_cost_per_token == D("0.0000003")
    assert price.output_cost_per_token == D("0.0000011")
    assert price.cache_read_input_token_cost == 0
    assert price.source == "x"
    assert ModelPrice.from_mapping({"mode": "chat"}, "x") is None


def test_overlay_replaces_only_what_the_override_sets() -> None:
    from litellm_credits.settings import ModelPriceConfig

    base = ModelPrice(
        input_cost_per_token=D("0.000001"),
        output_cost_per_token=D("0.000002"),
        max_output_tokens=10,
        source="litellm",
    )
    over = base.overlay(ModelPriceConfig(output_cost_per_token="0.000005"))
    assert (over.input_cost_per_token, over.output_cost_per_token) == (D("0.000001"), D("0.000005"))
    assert over.max_output_tokens == 10
    assert not over.free
    assert over.source == "config"
    free = base.overlay(ModelPriceConfig(free=True))
    assert free.free
    assert usd_cost(free, BIG_USAGE) == 0


def test_output_cap() -> None:
    p = pricing(models={"other-mapped": {"max_output_tokens": 300}})
    assert p.output_cap(p.price("mapped"), 50) == 50  # the request's max_tokens
    assert p.output_cap(p.price("other-mapped"), 5000) == 5000
    assert p.output_cap(p.price("other-mapped"), None) == 300  # the config's cap for the model
    # the map's own cap: the most the model may write when the request sets no limit (a clamped
    # hold then lowers it to what the account can pay)
    assert p.output_cap(p.price("mapped"), None) == 8192
    # neither the config nor the map knows: default_max_output_tokens
    assert p.output_cap(p.price("zero-priced"), None) == 1000


# --- worst case ---------------------------------------------------------------------------------

rates = st.one_of(
    st.none(),
    st.decimals(min_value=0, max_value=D("0.001"), allow_nan=False, allow_infinity=False, places=12),
)


@st.composite
def prices(draw: st.DrawFn) -> ModelPrice:
    return ModelPrice(
        input_cost_per_token=draw(rates),
        output_cost_per_token=draw(rates),
        cache_read_input_token_cost=draw(rates),
        cache_creation_input_token_cost=draw(rates),
        output_cost_per_reasoning_token=draw(rates),
        input_cost_per_image=draw(rates),
        output_cost_per_image=draw(rates),
    )


@st.composite
def usage_within(draw: st.DrawFn, max_prompt: int, max_output: int, max_images: int) -> Usage:
    prompt = draw(st.integers(0, max_prompt))
    completion = draw(st.integers(0, max_output))
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        # providers may report odd counts; usd_cost clamps them, and so must the bound
        cached_tokens=draw(st.integers(0, 2 * max_prompt + 1)),
        cache_creation_tokens=draw(st.integers(0, 2 * max_prompt + 1)),
        reasoning_tokens=draw(st.integers(0, 2 * max_output + 1)),
        images=draw(st.integers(0, max_images)),
    )


@given(prices(), st.integers(0, 10**6), st.integers(0, 10**5), st.integers(0, 10), st.data())
def test_worst_case_bounds_any_usage_within_the_limits(
    price: ModelPrice, max_prompt: int, max_output: int, max_images: int, data: st.DataObject
) -> None:
    usage = data.draw(usage_within(max_prompt, max_output, max_images))
    assert usd_cost(price, usage) <= worst_case(price, max_prompt, max_output, max_images)


def test_worst_case_examples() -> None:
    price = price_of(
        input_cost_per_token="0.000001",
        output_cost_per_token="0.000002",
        cache_creation_input_token_cost="0.00000125",
        output_cost_per_reasoning_token="0.000003",
        input_cost_per_image="0.01",
    )
    # every prompt token could be a cache write, every output token reasoning
    assert worst_case(price, 1000, 100, images=2) == D("0.00125") + D("0.0003") + D("0.02")
    assert worst_case(FREE, 10**9, 10**9) == 0


# --- max_price ----------------------------------------------------------------------------------


def test_max_price_is_field_by_field() -> None:
    a = ModelPrice(
        input_cost_per_token=D("0.000001"),
        output_cost_per_token=D("0.000009"),
        cache_read_input_token_cost=D("0.0000001"),
        max_output_tokens=1000,
        source="deployment",
    )
    b = ModelPrice(
        input_cost_per_token=D("0.000003"),
        output_cost_per_token=D("0.000002"),
        output_cost_per_reasoning_token=D("0.00001"),
        max_output_tokens=4000,
        source="litellm",
    )
    c = ModelPrice(input_cost_per_token=D("0.000002"), source="litellm")
    m = max_price([a, b, c])
    assert m.input_cost_per_token == D("0.000003")
    assert m.output_cost_per_token == D("0.000009")
    assert m.cache_read_input_token_cost == D("0.0000001")
    assert m.output_cost_per_reasoning_token == D("0.00001")
    assert m.cache_creation_input_token_cost is None
    assert m.max_output_tokens == 4000
    assert not m.free
    assert m.source == "deployment+litellm"
    assert max_price([a]) is a


def test_max_price_is_free_only_when_every_deployment_is() -> None:
    paid = ModelPrice(input_cost_per_token=D("0.000001"), source="litellm")
    assert max_price([FREE, FREE]).free
    mixed = max_price([FREE, paid])
    assert not mixed.free
    assert mixed.input_cost_per_token == D("0.000001")


@given(st.lists(prices(), min_size=1, max_size=5), st.data())
def test_worst_case_of_the_group_maximum_bounds_every_deployment(
    group: list[ModelPrice], data: st.DataObject
) -> None:
    # the hold for a model group is taken before the router picks a deployment
    top = max_price(group)
    for key in PRICE_KEYS:
        present = [getattr(p, key) for p in group if getattr(p, key) is not None]
        assert getattr(top, key) == (max(present) if present else None)
    usage = data.draw(usage_within(10**5, 10**4, 5))
    bound = worst_case(top, 10**5, 10**4, 5)
    for price in group:
        assert usd_cost(price, usage) <= bound


# --- parity with LiteLLM ------------------------------------------------------------------------

# Price keys LiteLLM applies on top of the flat per-token rates: token thresholds (`*_above_*`),
# tiered and off-peak (time of day!) tables, DeepSeek-style cache-hit keys, per-request fees,
# Databricks DBUs, geo and regional uplifts, per-character billing. Models that carry any of
# these are left out: the plugin prices only the flat rates.
SPECIAL_KEYS = frozenset(
    {
        "tiered_pricing",
        "off_peak_pricing",
        "input_cost_per_token_cache_hit",
        "input_cost_per_request",
        "input_dbu_cost_per_token",
        "output_dbu_cost_per_token",
        "provider_specific_entry",
        "input_cost_per_character",
        "output_cost_per_character",
    }
)


def _special(entry: Mapping[str, Any]) -> bool:
    return any("_above_" in k or k.startswith("regional_") or k in SPECIAL_KEYS for k in entry)


def parity_models() -> list[str]:
    import litellm

    return sorted(
        name
        for name, entry in litellm.model_cost.items()
        if entry.get("mode") == "chat"
        and entry.get("input_cost_per_token") is not None
        and entry.get("output_cost_per_token") is not None
        and isinstance(entry.get("litellm_provider"), str)
        and not _special(entry)
    )


# (prompt, completion, cached, cache creation, reasoning); prompt includes cached and cache
# creation tokens and completion includes reasoning tokens, as in OpenAI's usage
PARITY_USAGES = [
    pytest.param((1234, 567, 0, 0, 0), id="plain"),
    pytest.param((1234, 567, 300, 0, 0), id="cached"),
    pytest.param((1234, 567, 300, 200, 0), id="cached+cache-write"),
    pytest.param((1234, 567, 0, 0, 200), id="reasoning"),
    pytest.param((1, 0, 0, 0, 0), id="one-prompt-token"),
    pytest.param((0, 1, 0, 0, 0), id="one-completion-token"),
]
UNITS_PER_USD = 10**12  # credits_per_usd 1,000,000 × 1,000,000 micro-credits: a millionth of a micro-dollar


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """LiteLLM must price from its local map; any connection attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access during a pricing test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.mark.parametrize("counts", PARITY_USAGES)
def test_parity_with_litellm_cost_per_token(counts: tuple[int, int, int, int, int], no_network: None) -> None:
    import litellm
    from litellm.types.utils import CompletionTokensDetailsWrapper, PromptTokensDetailsWrapper
    from litellm.types.utils import Usage as LiteLLMUsage

    prompt, completion, cached, creation, reasoning = counts
    names = parity_models()
    assert len(names) >= 50, names
    p = Pricing(CreditsConfig(credits_per_usd=1_000_000))  # LiteLLM's own map
    rate = p.rate("free", "balanced")
    assert rate == 1_000_000
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        cache_creation_tokens=creation,
        reasoning_tokens=reasoning,
    )
    mismatches = []
    for name in names:
        provider = litellm.model_cost[name]["litellm_provider"]
        # the model string of a proxy deployment, e.g. "openai/gpt-4o"
        model = name if name.startswith(provider + "/") else f"{provider}/{name}"
        ours = p.to_micro(usd_cost(p.price(name, model), usage), rate)
        # OpenAI-style usage: cached and cache-write tokens are inside prompt_tokens, reasoning
        # tokens inside completion_tokens (not the Anthropic-style cache_read_input_tokens
        # argument, which cost_per_token adds on top of prompt_tokens)
        litellm_usage = LiteLLMUsage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=(
                PromptTokensDetailsWrapper(cached_tokens=cached, cache_creation_tokens=creation)
                if cached or creation
                else None
            ),
            completion_tokens_details=(
                CompletionTokensDetailsWrapper(reasoning_tokens=reasoning) if reasoning else None
            ),
        )
        theirs = litellm_units(model, provider, litellm_usage)
        if not agrees(ours, theirs):
            mismatches.append((name, ours, float(theirs)))
    assert not mismatches, f"{len(mismatches)} of {len(names)} models differ: {mismatches[:20]}"


def litellm_units(model: str, provider: str, usage: Any) -> Fraction:
    """LiteLLM's cost of ``usage`` in our smallest unit (float USD, taken exactly)."""
    import litellm

    prompt_usd, completion_usd = litellm.cost_per_token(
        model=model, custom_llm_provider=provider, usage_object=usage
    )
    return (Fraction(prompt_usd) + Fraction(completion_usd)) * UNITS_PER_USD


def agrees(ours: int, theirs: Fraction) -> bool:
    """Ours is the exact cost rounded up; theirs is the same cost in binary floating point, off
    by a few ulps (a tiny fraction of a unit at these magnitudes)."""
    slack = max(Fraction(1, 10**3), theirs / 10**13)
    return theirs - slack <= ours < theirs + 1 + slack


def long_prompt_models() -> list[str]:
    """Chat models whose only special pricing is a long-prompt tier of the flat token rates."""
    import litellm

    supported = (
        "input_cost_per_token_above_",
        "output_cost_per_token_above_",
        "cache_read_input_token_cost_above_",
        "cache_creation_input_token_cost_above_",
    )
    names = []
    for name, entry in litellm.model_cost.items():
        above = [k for k in entry if "_above_" in k]
        if (
            entry.get("mode") == "chat"
            and entry.get("input_cost_per_token") is not None
            and entry.get("output_cost_per_token") is not None
            and isinstance(entry.get("litellm_provider"), str)
            and any(k.startswith("input_cost_per_token_above_") for k in above)
            and all(k.startswith(supported) and k.endswith("k_tokens") for k in above)
            and not any(k.startswith("regional_") or k in SPECIAL_KEYS for k in entry)
            and entry["litellm_provider"] not in ("xai",)  # xAI bills the tier from the threshold itself
        ):
            names.append(name)
    return sorted(names)


@pytest.mark.parametrize("beyond", [False, True], ids=["below-threshold", "above-threshold"])
def test_long_prompt_tiers_match_litellm(beyond: bool, no_network: None) -> None:
    """Long prompts are billed at the model's ``*_above_Nk_tokens`` rates, as LiteLLM bills them."""
    import litellm
    from litellm.types.utils import Usage as LiteLLMUsage

    names = long_prompt_models()
    assert len(names) >= 10, names
    p = Pricing(CreditsConfig(credits_per_usd=1_000_000))
    rate = p.rate("free", "balanced")
    mismatches = []
    for name in names:
        entry = litellm.model_cost[name]
        provider = entry["litellm_provider"]
        model = name if name.startswith(provider + "/") else f"{provider}/{name}"
        threshold = min(int(k.split("_above_")[1].split("k_")[0]) * 1000 for k in entry if "_above_" in k)
        prompt = threshold + (50_000 if beyond else -1_000)
        usage = Usage(prompt_tokens=prompt, completion_tokens=1000)
        ours = p.to_micro(usd_cost(p.price(name, model), usage), rate)
        assert p.to_micro(worst_case(p.price(name, model), prompt, 1000), rate) >= ours
        lu = LiteLLMUsage(prompt_tokens=prompt, completion_tokens=1000, total_tokens=prompt + 1000)
        theirs = litellm_units(model, provider, lu)
        if not agrees(ours, theirs):
            mismatches.append((name, ours, float(theirs)))
    assert not mismatches, f"{len(mismatches)} of {len(names)} models differ: {mismatches[:10]}"


def test_openrouter_markup_on_paid_models_only() -> None:
    deployment = {"input_cost_per_token": "0.000001", "output_cost_per_token": "0.000002"}
    usage = Usage(prompt_tokens=1000, completion_tokens=1000)
    default = Pricing(CreditsConfig())
    paid = usd_cost(default.price("or-paid", "openrouter/vendor/model", deployment), usage)
    assert paid == Decimal("0.0033")  # (0.001 + 0.002) USD + 10 %
    assert usd_cost(default.price("or-free", "openrouter/vendor/model:free", deployment), usage) == 0
    direct = usd_cost(default.price("direct", "openai/model", deployment), usage)
    assert direct == Decimal("0.003")
    none = Pricing(CreditsConfig(openrouter_markup=0))
    assert usd_cost(none.price("or-paid", "openrouter/vendor/model", deployment), usage) == Decimal("0.003")
