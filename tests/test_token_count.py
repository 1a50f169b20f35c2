"""token_count.token_counter: LiteLLM's token counts, with the per-model set-up done once."""

from __future__ import annotations

import os
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


def test_a_text_seen_lately_is_not_tokenized_again(monkeypatch: pytest.MonkeyPatch) -> None:
    token_count._params.cache_clear()
    monkeypatch.setattr(token_count, "MEMORY", token_count.CountMemory())
    calls: list[str] = []
    params = token_count._params("gpt-4o")
    counted = params.count_function.count

    def spy(text: str) -> int:
        calls.append(text)
        return int(counted(text))

    monkeypatch.setattr(params.count_function, "count", spy)
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
    token_count._params.cache_clear()


def test_models_keep_their_own_counts_in_one_bounded_memory() -> None:
    memory = token_count.CountMemory(size=3)
    by_len = token_count.Remembered("a", len, memory)
    doubled = token_count.Remembered("b", lambda text: 2 * len(text), memory)
    assert (by_len("xy"), doubled("xy")) == (2, 4)  # the same text, two tokenizers
    for text in ["1", "22", "333", "4444"]:
        by_len(text)
    assert len(memory) == 3


def test_the_memory_keeps_what_is_used() -> None:
    seen: list[str] = []

    def count(text: str) -> int:
        seen.append(text)
        return len(text)

    counter = token_count.Remembered("m", count, token_count.CountMemory(size=3))
    for text in ["a", "bb", "ccc"]:
        counter(text)
    assert counter("a") == 1  # used again: now the most recent
    counter("dddd")  # evicts "bb", the least recently used
    seen.clear()
    assert [counter("a"), counter("ccc"), counter("dddd")] == [1, 3, 4]
    assert seen == []
    assert counter("bb") == 2 and seen == ["bb"]


def test_long_texts_are_kept_by_digest_not_by_themselves() -> None:
    memory = token_count.CountMemory(size=8)
    counter = token_count.Remembered("m", len, memory)
    long = "x" * (token_count.SHORT_TEXT + 1)
    assert counter(long) == len(long)
    assert counter(long[:-1] + "y") == len(long)  # same length, other text: counted on its own
    assert len(memory) == 2
    assert all(not isinstance(text, str) for _, text in memory.seen)
    odd = "\ud800 lone surrogate " * 30
    assert counter(odd) == len(odd)
