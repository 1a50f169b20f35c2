"""Streams stop at their hold: the guard alone on a made-up stream, then through the real proxy
with an upstream that ignores max_tokens and streams ten times what was held."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import litellm
import pytest
from litellm.types.utils import Delta, ModelResponseStream, StreamingChoices

from litellm_credits.claims import HoldClaim
from litellm_credits.ledger import Ledger
from litellm_credits.money import micro_ceil
from litellm_credits.stream_guard import StreamGuard, chunk_text

from .conftest import Proxy
from .test_proxy import chat, settled

D = Decimal


def claim(held: int, *, prompt_tokens: int = 0, output_usd: str = "0.00001") -> HoldClaim:
    return HoldClaim(
        uuid.uuid4(),
        "acct",
        D(1000),
        "balanced",
        "chat",
        held=held,
        prompt_tokens=prompt_tokens,
        prompt_usd=prompt_tokens * D("0.000001"),
        output_usd=D(output_usd),
    )


def word_chunk(i: int, text: str, index: int = 0) -> ModelResponseStream:
    return ModelResponseStream(
        id="c1", created=1, model="m", choices=[StreamingChoices(index=index, delta=Delta(content=text))]
    )


async def stream_of(chunks: list[Any]) -> AsyncIterator[Any]:
    for chunk in chunks:
        yield chunk


def one_token_each(**kwargs: Any) -> int:
    return len(kwargs["text"].split())


async def run(guard: StreamGuard, chunks: list[Any]) -> list[Any]:
    return [c async for c in guard.guard(stream_of(chunks))]


async def test_a_stream_within_its_hold_passes_untouched() -> None:
    chunks = [word_chunk(i, f"w{i} ") for i in range(5)]
    guard = StreamGuard(claim(10 * 10_000), model="m", include_usage=False, counter=one_token_each)
    assert await run(guard, chunks) == chunks
    assert (guard.delivered.completion_tokens, guard.delivered.cut) == (5, False)


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_stream_past_its_hold_ends_cleanly_at_it(include_usage: bool) -> None:
    """Held: 2 prompt tokens and 3 output tokens (0.01 credits each); the stream has 30."""
    held = micro_ceil((2 * D("0.000001") + 3 * D("0.00001")) * 1000)
    chunks = [word_chunk(i, f"w{i} ") for i in range(30)]
    guard = StreamGuard(
        claim(held, prompt_tokens=2), model="m", include_usage=include_usage, counter=one_token_each
    )
    out = await run(guard, chunks)
    assert out[:3] == chunks[:3]
    finish = out[3]
    assert [(c.index, c.finish_reason) for c in finish.choices] == [(0, "length")]
    assert guard.delivered.cut and guard.delivered.completion_tokens == 3
    if include_usage:
        usage = out[4].usage
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (2, 3, 5)
        assert out[4].choices == []
        assert len(out) == 5
    else:
        assert len(out) == 4


async def test_every_choice_ends_and_all_choices_count() -> None:
    chunks = [word_chunk(i, "a b ", index=i % 2) for i in range(10)]
    guard = StreamGuard(claim(5 * 10_000), model="m", include_usage=False, counter=one_token_each)
    out = await run(guard, chunks)
    # two tokens a chunk: two chunks fit in five tokens' worth
    assert out[:2] == chunks[:2]
    assert sorted((c.index, c.finish_reason) for c in out[2].choices) == [(0, "length"), (1, "length")]


async def test_the_providers_count_replaces_ours() -> None:
    usage_chunk = ModelResponseStream(
        id="c1",
        created=1,
        model="m",
        choices=[StreamingChoices(index=0, delta=Delta(content="x"))],
        usage=litellm.Usage(prompt_tokens=7, completion_tokens=50, total_tokens=57),
    )
    guard = StreamGuard(claim(10 * 10_000), model="m", include_usage=True, counter=one_token_each)
    out = await run(guard, [word_chunk(0, "a "), usage_chunk])
    assert guard.delivered.cut and guard.delivered.completion_tokens == 1
    assert out[-1].usage.completion_tokens == 1


def test_reasoning_and_tool_call_arguments_are_output() -> None:
    chunk = {
        "choices": [
            {
                "index": 0,
                "delta": {
                    "content": "a",
                    "reasoning_content": "b",
                    "tool_calls": [{"function": {"arguments": "c"}}],
                    "function_call": {"arguments": "d"},
                },
            },
            {"index": 1, "text": "e"},
        ]
    }
    assert chunk_text(chunk) == "abcde"


# --- through the proxy ---------------------------------------------------------------------------

BIG_IN, BIG_OUT = D("1e-6"), D("1e-5")


def sse_events(text: str) -> list[Any]:
    events = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[6:]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@pytest.mark.parametrize("include_usage", [False, True])
async def test_an_upstream_that_ignores_max_tokens_is_cut_at_the_hold(
    proxy: Proxy, ledger: Ledger, include_usage: bool
) -> None:
    """The upstream streams 200 words (about 400 tokens) for a request held for 40: the client
    gets a clean end, and the charge is what it received, never more than the hold."""
    user, key = proxy.create_account("10")
    body: dict[str, Any] = {
        "model": "fake-big",
        "messages": chat("words=200 usage=10,400"),
        "max_tokens": 40,
        "stream": True,
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    with httpx.Client(base_url=proxy.url, timeout=60) as h:
        r = h.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    finishes = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
    assert finishes[-1] == "length"
    delivered = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices"))
    tokens = litellm.token_counter(model="fake-big", text=delivered)
    assert 0 < tokens <= 40
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 40
    await settled(ledger, user, 1)
    [hold] = await ledger.pool.fetch(
        "SELECT amount, settled_amount FROM credits.holds WHERE subject_id = $1", user
    )
    [event] = await ledger.pool.fetch(
        "SELECT completion_tokens, charged, metadata FROM credits.usage_events WHERE subject_id = $1", user
    )
    assert event["metadata"]["stream_cut"] is True
    assert event["charged"] <= hold["amount"]
    # the charge is what was delivered: the prompt as counted, and the delivered tokens
    assert abs(event["completion_tokens"] - tokens) <= 4
    account = await ledger.require_account(user)
    assert (account.balance, account.held) == (10_000_000 - event["charged"], 0)


async def test_a_clamped_stream_is_cut_at_what_the_balance_covers(proxy: Proxy, ledger: Ledger) -> None:
    """No max_tokens, a model that may write 100,000 and credits for about 30 output tokens: the
    stream ends at what the credits pay for, and the balance ends at zero or just above."""
    content = "words=300 usage=10,600"
    prompt = litellm.token_counter(model="fake-big", messages=chat(content))
    balance = micro_ceil((prompt * BIG_IN + 300 * BIG_OUT) * 1000)  # 300 tokens' worth
    user, key = proxy.create_account(str(D(balance) / 1_000_000))
    with httpx.Client(base_url=proxy.url, timeout=60) as h:
        r = h.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "fake-big", "messages": chat(content), "stream": True},
        )
    assert r.status_code == 200
    assert r.headers["x-credits-max-tokens"] == "300"
    assert sse_events(r.text)[-1] == "[DONE]"
    await settled(ledger, user, 1)
    account = await ledger.require_account(user)
    assert 0 <= account.balance < balance
    assert account.held == 0
    assert not await ledger.discrepancies()


async def test_a_stream_that_ends_by_itself_is_settled_from_the_providers_usage(
    proxy: Proxy, ledger: Ledger
) -> None:
    user, key = proxy.create_account("10")
    with httpx.Client(base_url=proxy.url, timeout=60) as h:
        r = h.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={
                "model": "fake-big",
                "messages": chat("words=5 usage=10,20"),
                "stream": True,
                "max_tokens": 500,
            },
        )
    assert r.status_code == 200
    await settled(ledger, user, 1)
    [event] = await ledger.pool.fetch(
        "SELECT completion_tokens, charged, metadata FROM credits.usage_events WHERE subject_id = $1", user
    )
    assert event["completion_tokens"] == 20
    assert "stream_cut" not in event["metadata"]
    assert event["charged"] == micro_ceil((10 * BIG_IN + 20 * BIG_OUT) * 1000)
