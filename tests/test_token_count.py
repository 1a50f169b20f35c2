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
