"""What a request may cost, and the holds that fit what is left (clamped holds).

Unit tests of the arithmetic, then the real proxy: an account that cannot pay a request's worst
case gets the request with its output limit lowered to what it can pay (``when_short: clamp``,
the default), or a 402 that says how many output tokens it could have had.
"""

from __future__ import annotations

import asyncio
import secrets
from decimal import Decimal

import httpx
import litellm
import openai
import pytest

from litellm_credits.errors import CostNotBounded, InvalidRequest
from litellm_credits.estimate import (
    Estimate,
    choices,
    count_prompt_tokens,
    estimate_tokens,
    estimate_units,
    requested_output,
)
from litellm_credits.ledger import Ledger
from litellm_credits.money import micro_ceil
from litellm_credits.pricing import ModelPrice, Pricing, Usage, usd_cost

from .conftest import Proxy
from .fake_upstream import FakeUpstream
from .test_proxy import chat, client, settled

D = Decimal
PRICE = ModelPrice(
    input_cost_per_token=D("0.000001"), output_cost_per_token=D("0.00001"), max_output_tokens=100_000
)
RATE = D(1000)  # credits per USD


def chat_estimate(prompt: int = 100, **request: object) -> Estimate:
    return estimate_tokens(
        {"messages": [], **request},
        PRICE,
        call_type="acompletion",
        service="chat",
        prompt_tokens=prompt,
        default_output_tokens=4096,
        min_output_tokens=256,
    )


def test_worst_case_is_the_prompt_and_the_output_limit_at_the_highest_rates() -> None:
    est = chat_estimate(100, max_tokens=2000)
    assert est.usd == 100 * D("0.000001") + 2000 * D("0.00001")
    assert (est.output_tokens, est.choices, est.output_params) == (2000, 1, ("max_tokens",))
    # no limit in the request: the model's own cap
    assert chat_estimate(100).output_tokens == 100_000
    # every choice is billed
    assert chat_estimate(100, max_tokens=10, n=3).usd == 100 * D("0.000001") + 30 * D("0.00001")


def test_the_output_limit_is_set_where_the_request_set_it() -> None:
    assert chat_estimate(max_completion_tokens=500).output_params == ("max_completion_tokens",)
    both = chat_estimate(max_completion_tokens=500, max_tokens=700)
    assert (both.output_tokens, both.output_params) == (500, ("max_completion_tokens", "max_tokens"))
    responses = estimate_tokens(
        {"input": "hi"},
        PRICE,
        call_type="aresponses",
        service="chat",
        prompt_tokens=1,
        default_output_tokens=4096,
        min_output_tokens=256,
    )
    assert responses.output_params == ("max_output_tokens",)


def test_clamping_needs_room_for_the_minimum() -> None:
    est = chat_estimate(100, max_tokens=2000)
    assert est.min_output_tokens == 256
    assert est.minimum(RATE) == micro_ceil((100 * D("0.000001") + 256 * D("0.00001")) * RATE)
    # a request that asks for no more than the minimum is never clamped: it fits or it is refused
    assert chat_estimate(100, max_tokens=256).minimum(RATE) is None
    assert chat_estimate(100, max_tokens=100).min_output_tokens is None


def test_a_clamped_request_keeps_room_above_its_thinking_budget() -> None:
    """Found in review: Anthropic refuses max_tokens at or below thinking.budget_tokens, so a
    clamp below the budget turned into the upstream's 400."""
    thinking = {"type": "enabled", "budget_tokens": 2000}
    assert chat_estimate(100, max_tokens=8000, thinking=thinking).min_output_tokens == 2001
    assert chat_estimate(100, max_tokens=2001, thinking=thinking).min_output_tokens is None
    assert chat_estimate(100, max_tokens=8000, thinking={"type": "disabled"}).min_output_tokens == 256


@pytest.mark.parametrize("amount", [0, 99, 100, 101, 2_599, 2_600, 12_345_678, 10**12])
def test_covered_output_tokens_are_exact(amount: int) -> None:
    """A hold of ``amount`` micro-credits covers the prompt and N tokens, and never N + 1."""
    est = chat_estimate(100, max_tokens=50_000)
    tokens = est.covered_output_tokens(amount, RATE)

    def cost(n: int) -> int:
        return Pricing.to_micro(100 * D("0.000001") + n * D("0.00001"), RATE)

    if tokens < 50_000:
        assert cost(tokens + 1) > amount
    if tokens > 0:
        assert cost(tokens) <= amount
    assert 0 <= tokens <= 50_000


def test_covered_tokens_are_per_choice() -> None:
    est = chat_estimate(0, max_tokens=1000, n=4)
    # 10 credits pay 1,000 output tokens at 0.01 credits: 250 in each of the four choices
    assert est.covered_output_tokens(10_000_000, RATE) == 250
    assert est.covered_output_tokens(10_030_000, RATE) == 250  # 1,003 tokens: not 251 in all four


def test_prompt_only_calls_are_never_clamped() -> None:
    embedding = estimate_tokens(
        {"input": "x"},
        PRICE,
        call_type="aembedding",
        service="embedding",
        prompt_tokens=10,
        default_output_tokens=4096,
        min_output_tokens=256,
    )
    assert embedding.usd == 10 * D("0.000001")
    assert embedding.minimum(RATE) is None


def test_unit_priced_calls_are_never_clamped() -> None:
    speech = estimate_units(
        {"input": "hello"}, ModelPrice(input_cost_per_character=D("0.000015")), service="audio_speech"
    )
    assert speech.usd == 5 * D("0.000015")
    assert speech.minimum(RATE) is None
    image = estimate_units(
        {"n": 3}, ModelPrice(output_cost_per_image=D("0.04")), service="image", image_price=D("0.04")
    )
    assert image.usd == D("0.12")


def test_calls_nothing_bounds_are_refused() -> None:
    per_second = ModelPrice(output_cost_per_second=D("0.00025"))
    with pytest.raises(CostNotBounded):
        estimate_units({"input": "hello"}, per_second, service="audio_speech")
    with pytest.raises(CostNotBounded):
        estimate_units({}, ModelPrice(output_cost_per_image=D("0.01")), service="image", image_price=None)
    with pytest.raises(CostNotBounded):
        estimate_tokens(
            {"messages": []},
            per_second,
            call_type="acompletion",
            service="chat",
            prompt_tokens=1,
            default_output_tokens=10,
            min_output_tokens=5,
        )


@pytest.mark.parametrize("value", [-1, 10_000_001, "10", 1.5, True])
def test_output_limits_must_be_sane_integers(value: object) -> None:
    with pytest.raises(InvalidRequest):
        requested_output({"max_tokens": value})


@pytest.mark.parametrize("n", [0, 129, "2", 2.0, False])
def test_choices_must_be_sane_integers(n: object) -> None:
    with pytest.raises(InvalidRequest):
        choices({"n": n})


def test_a_tokenizer_failure_still_prices_the_prompt() -> None:
    def broken(**_: object) -> int:
        raise RuntimeError("no tokenizer")

    assert count_prompt_tokens({"messages": [{"role": "user", "content": "hello"}]}, "m", "chat", broken) > 0


# --- through the proxy ---------------------------------------------------------------------------

BIG_IN, BIG_OUT = D("1e-6"), D("1e-5")  # fake-big: 0.001 credits a prompt token, 0.01 an output token


def big_cost(prompt: int, completion: int) -> int:
    return micro_ceil((prompt * BIG_IN + completion * BIG_OUT) * 1000)


def prompt_tokens(content: str) -> int:
    return int(litellm.token_counter(model="fake-big", messages=chat(content)))


async def test_clamp_lowers_max_tokens_to_what_the_balance_covers(
    proxy: Proxy, ledger: Ledger, upstream: FakeUpstream
) -> None:
    """An account with credits for about 1,000 output tokens of a model that may write 100,000:
    the call goes out with max_tokens lowered to what fits, and is charged its usage."""
    content = "usage=40,900 clamp-" + secrets.token_hex(4)
    prompt = prompt_tokens(content)
    user, key = proxy.create_account(str(D(big_cost(prompt, 1000)) / 1_000_000))
    with client(proxy, key) as oa:
        raw = oa.chat.completions.with_raw_response.create(model="fake-big", messages=chat(content))
    assert raw.http_response.status_code == 200
    sent = next(r for r in reversed(upstream.requests) if content in str(r.get("messages")))
    limit = sent.get("max_tokens") or sent.get("max_completion_tokens")
    assert limit == 1000  # exactly what the balance pays for after the prompt
    assert raw.headers["x-credits-max-tokens"] == "1000"
    await settled(ledger, user, 1)
    account = await ledger.require_account(user)
    assert account.balance == big_cost(prompt, 1000) - big_cost(40, 900)  # the usage, not the hold
    [event] = await ledger.pool.fetch("SELECT metadata FROM credits.usage_events WHERE subject_id = $1", user)
    assert event["metadata"]["clamped_max_tokens"] == 1000
    assert event["metadata"]["requested_max_tokens"] is None


def test_refuse_gives_402_for_the_same_call(proxy: Proxy) -> None:
    content = "usage=40,900"
    _, key = proxy.create_account(str(D(big_cost(prompt_tokens(content), 1000)) / 1_000_000), tier="strict")
    with client(proxy, key) as oa, pytest.raises(openai.APIStatusError) as err:
        oa.chat.completions.create(model="fake-big", messages=chat(content))
    assert err.value.status_code == 402
    body = err.value.body
    assert body["type"] == "insufficient_credits"  # type: ignore[index]
    assert body["details"]["covered_output_tokens"] == 1000  # type: ignore[index]


def test_below_the_minimum_is_402_with_the_covered_tokens(proxy: Proxy) -> None:
    content = "usage=40,100"
    _, key = proxy.create_account(str(D(big_cost(prompt_tokens(content), 200)) / 1_000_000))
    with client(proxy, key) as oa, pytest.raises(openai.APIStatusError) as err:
        oa.chat.completions.create(model="fake-big", messages=chat(content), max_tokens=5000)
    assert err.value.status_code == 402
    body = err.value.body
    assert body["type"] == "insufficient_credits"  # type: ignore[index]
    assert body["details"]["covered_output_tokens"] == 200  # type: ignore[index]
    assert body["details"]["min_output_tokens"] == 256  # type: ignore[index]
    assert "covers 200 output tokens" in body["message"]  # type: ignore[index]


def test_a_key_may_refuse_what_its_tier_would_clamp(proxy: Proxy) -> None:
    user_id, _ = proxy.create_account("1")
    with proxy.admin() as admin:
        r = admin.post("/api/v1/admin/credits/keys", json={"user_id": user_id, "when_short": "refuse"})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
    with client(proxy, key) as oa, pytest.raises(openai.APIStatusError) as err:
        oa.chat.completions.create(model="fake-big", messages=chat("usage=1,1"))
    assert err.value.status_code == 402


async def test_a_hundred_concurrent_clamped_requests_never_overspend(proxy: Proxy, ledger: Ledger) -> None:
    """Credits for ten and a half full requests, a hundred at once: no overspend, and a request is
    refused only when what was left at its hold could not pay the minimum. The upstream answers
    after 3 s, so every hold is decided before any settlement gives credit back: ten whole holds,
    then one clamped to the half left (whatever order and batches the holds went in)."""
    content = "usage=40,500 sleep=3"
    prompt = prompt_tokens(content)
    full = big_cost(prompt, 2000)
    budget = 10 * full + full // 2
    user, key = proxy.create_account(str(D(budget) / 1_000_000))
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=120) as oa:

        async def one() -> int:
            try:
                raw = await oa.chat.completions.with_raw_response.create(
                    model="fake-big", messages=chat(content), max_tokens=2000
                )
                return int(raw.headers.get("x-credits-max-tokens") or 2000)
            except openai.APIStatusError as err:
                assert err.status_code == 402, err.body
                assert err.body["type"] == "insufficient_credits"  # type: ignore[index]
                # refused only with less left than the minimum (256 output tokens)
                assert err.body["details"]["covered_output_tokens"] < 256  # type: ignore[index]
                return 0

        limits = await asyncio.gather(*(one() for _ in range(100)))
    served = [n for n in limits if n]
    await settled(ledger, user, len(served))
    account = await ledger.require_account(user)
    assert account.held == 0
    assert account.balance == budget - len(served) * big_cost(40, 500)  # the usage reported
    assert account.balance >= 0  # every call used less than it held: no overrun at all
    assert len(served) >= 11
    assert any(n < 2000 for n in served)  # one at least was clamped, not refused
    assert not await ledger.discrepancies()


def test_a_free_or_empty_request_is_never_clamped(proxy: Proxy) -> None:
    _, key = proxy.create_account("0")
    with client(proxy, key) as oa:
        reply = oa.chat.completions.create(model="fake-free", messages=chat("usage=5,5"))
    assert reply.choices


def test_price_of_usage_matches_the_settlement(proxy: Proxy) -> None:
    """Sanity for the helpers above: the deployment's price, exactly."""
    price = Pricing.to_micro(
        usd_cost(ModelPrice(input_cost_per_token=BIG_IN, output_cost_per_token=BIG_OUT), Usage(40, 900)),
        D(1000),
    )
    assert price == big_cost(40, 900)


def test_x_credits_max_tokens_is_absent_when_not_clamped(proxy: Proxy) -> None:
    _, key = proxy.create_account("100")
    with httpx.Client(base_url=proxy.url, timeout=60) as h:
        r = h.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "fake-big", "messages": chat("usage=5,5"), "max_tokens": 10},
        )
    assert r.status_code == 200
    assert "x-credits-max-tokens" not in r.headers
