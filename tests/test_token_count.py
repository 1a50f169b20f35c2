"""token_count.token_counter: LiteLLM's token counts, with the per-model set-up done once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import litellm
import pytest

from litellm_credits import token_count

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MODELS = ["gpt-4o", "gpt-3.5-turbo", "claude-3-5-sonnet-20240620", "bench-model", "openai/gpt-4o-mini", ""]
MESSAGES: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello there"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Summarise the plot of Hamlet in three sentences."},
    ],
    [
        {"role": "user", "name": "alice", "content": "Bonjour, ça va ? 日本語もね"},
        {
            "role": "assistant",
            "content": "Oui.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ],
    [
        {
            "role": "user",
            "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}],
        }
    ],
    [{"role": "user", "content": ""}],
]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("messages", MESSAGES)
def test_counts_what_litellm_counts(model: str, messages: list[dict[str, Any]]) -> None:
    expected = litellm.token_counter(model=model, messages=messages)
    assert token_count.token_counter(model=model, messages=messages) == expected
    assert token_count.token_counter(model=model, messages=messages) == expected  # cached set-up


@pytest.mark.parametrize("model", MODELS)
def test_counts_text_as_litellm_does(model: str) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 7
    assert token_count.token_counter(model=model, text=text) == litellm.token_counter(model=model, text=text)


def test_a_disabled_counter_is_litellms_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(litellm, "disable_token_counter", True)
    assert token_count.token_counter(model="gpt-4o", messages=MESSAGES[1]) == 0


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch) -> Iterator[token_count.CountMemory]:
    """A fresh memory for the per-model count functions, and the account "acct" in scope."""
    token_count._params.cache_clear()
    fresh = token_count.CountMemory()
    monkeypatch.setattr(token_count, "MEMORY", fresh)
    scope = token_count.SCOPE.set("acct")
    try:
        yield fresh
    finally:
        token_count.SCOPE.reset(scope)
        token_count._params.cache_clear()


def spy_on(model: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The texts the model's tokenizer is asked to count from now on."""
    calls: list[str] = []
    params = token_count._params(model)
    counted = params.count_function.count

    def spy(text: str) -> int:
        calls.append(text)
        return int(counted(text))

    monkeypatch.setattr(params.count_function, "count", spy)
    return calls


def test_a_text_seen_lately_is_not_tokenized_again(
    memory: token_count.CountMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy_on("gpt-4o", monkeypatch)
    system = {"role": "system", "content": "You are a helpful assistant. " * 20}  # kept by digest
    turns = [system, {"role": "user", "content": "Hello there"}]
    first = token_count.token_counter(model="gpt-4o", messages=turns)
    assert sorted(calls) == sorted(["system", system["content"], "user", "Hello there"])
    calls.clear()
    turns += [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Bye"}]
    second = token_count.token_counter(model="gpt-4o", messages=turns)
    assert calls == ["assistant", "Hi!", "Bye"]  # the conversation so far was counted already
    assert first == litellm.token_counter(model="gpt-4o", messages=turns[:2])
    assert second == litellm.token_counter(model="gpt-4o", messages=turns)


def test_counts_are_kept_per_account_and_only_in_an_accounts_scope(
    memory: token_count.CountMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy_on("gpt-4o", monkeypatch)
    text = "a document someone else may have sent " * 20
    token_count.token_counter(model="gpt-4o", text=text)
    token_count.token_counter(model="gpt-4o", text=text)
    assert calls == [text]
    other = token_count.SCOPE.set("another account")
    try:
        token_count.token_counter(model="gpt-4o", text=text)  # not served from acct's counts
    finally:
        token_count.SCOPE.reset(other)
    assert calls == [text, text]
    nobody = token_count.SCOPE.set(None)  # (a stream's delivered text: counted, never kept)
    try:
        before = len(memory)
        token_count.token_counter(model="gpt-4o", text="delivered so far")
        token_count.token_counter(model="gpt-4o", text="delivered so far")
    finally:
        token_count.SCOPE.reset(nobody)
    assert calls[2:] == ["delivered so far", "delivered so far"] and len(memory) == before


def test_models_keep_their_own_counts_in_one_bounded_memory() -> None:
    memory = token_count.CountMemory(size=3)
    by_len = token_count.Remembered("a", len, memory)
    doubled = token_count.Remembered("b", lambda text: 2 * len(text), memory)
    scope = token_count.SCOPE.set("acct")
    try:
        assert (by_len("xy"), doubled("xy")) == (2, 4)  # the same text, two tokenizers
        for text in ["1", "22", "333", "4444"]:
            by_len(text)
    finally:
        token_count.SCOPE.reset(scope)
    assert len(memory) == 3


def test_the_memory_keeps_what_is_used() -> None:
    seen: list[str] = []

    def count(text: str) -> int:
        seen.append(text)
        return len(text)

    counter = token_count.Remembered("m", count, token_count.CountMemory(size=3))
    scope = token_count.SCOPE.set("acct")
    try:
        for text in ["a", "bb", "ccc"]:
            counter(text)
        assert counter("a") == 1  # used again: now the most recent
        counter("dddd")  # evicts "bb", the least recently used
        seen.clear()
        assert [counter("a"), counter("ccc"), counter("dddd")] == [1, 3, 4]
        assert seen == []
        assert counter("bb") == 2 and seen == ["bb"]
    finally:
        token_count.SCOPE.reset(scope)


def test_long_texts_are_kept_by_digest_not_by_themselves() -> None:
    memory = token_count.CountMemory(size=8)
    counter = token_count.Remembered("m", len, memory)
    long = "x" * (token_count.SHORT_TEXT + 1)
    scope = token_count.SCOPE.set("acct")
    try:
        assert counter(long) == len(long)
        assert counter(long[:-1] + "y") == len(long)  # same length, other text: counted on its own
        odd = "\ud800 lone surrogate " * 30
        assert counter(odd) == len(odd)
    finally:
        token_count.SCOPE.reset(scope)
    assert len(memory) == 3
    assert all(not isinstance(text, str) for _, _, text in memory.seen)
