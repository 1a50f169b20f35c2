"""Token counts as LiteLLM's ``token_counter`` makes them, with its per-model set-up done once.

``litellm.token_counter(model=..., messages=...)`` looks up the model's tokenizer by name and its
per-message overheads on every call: about a third of the pre-call hook's CPU in the benchmark
(py-spy; ``bench/RESULTS.md``). :func:`token_counter` keeps that set-up per model and counts with
LiteLLM's own functions, so every count is LiteLLM's (a test compares them on several models and
message shapes). On a LiteLLM without those internals, or with its counter disabled, it calls
``litellm.token_counter`` as before.

The counts of the last :data:`REMEMBERED` texts counted for a prompt are kept, by account, model
and text (only while :data:`SCOPE` names the account: the pre-call hook's estimate; a stream's
delivered text, counted chunk by chunk, is never kept):
a chat client sends the same system prompt with every request, and each turn of a conversation
sends all the turns before it again, so most of a prompt's texts (and every role name, which
LiteLLM counts too) were counted moments ago. A short text is its own key; a longer one is keyed
by its length and a 128-bit BLAKE2b digest (hashing is about a hundred times faster than
tokenizing, and the memory holds no prompt longer than :data:`SHORT_TEXT` characters). Keyed by
account, so how long a count took tells no one whether another account sent a text lately.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

import litellm

try:  # LiteLLM's internals: token_counter's own steps
    from litellm.litellm_core_utils.token_counter import (
        _count_extra,
        _count_messages,
        _MessageCountParams,
    )
    from litellm.utils import convert_list_message_to_dict

    INTERNALS = True
except ImportError:  # pragma: no cover - a LiteLLM that reorganised them
    INTERNALS = False


REMEMBERED = 8192  # texts whose counts are kept, all models together
SHORT_TEXT = 256  # characters; a longer text is kept by its digest, not itself

# the account whose prompt is being counted: its counts are kept under its name (None: not kept)
SCOPE: ContextVar[str | None] = ContextVar("litellm_credits_token_scope", default=None)

Key = tuple[str, str, str | tuple[int, bytes]]  # (account, model, the text or its length and digest)


def text_key(text: str) -> str | tuple[int, bytes]:
    if len(text) <= SHORT_TEXT:
        return text
    data = text.encode("utf-8", "surrogatepass")
    return len(text), hashlib.blake2b(data, digest_size=16).digest()


class CountMemory:
    """The last ``size`` counts made, by account, model and text (the least recently used goes
    first): bounded whatever the number of accounts and models (OpenRouter routes to hundreds)."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self.size = size
        self.seen: OrderedDict[Key, int] = OrderedDict()  # the least recently used first

    def __len__(self) -> int:
        return len(self.seen)

    def count(self, scope: str, model: str, count: Callable[[str], int], text: str) -> int:
        key = (scope, model, text_key(text))
        seen = self.seen
        found = seen.get(key)
        if found is not None:
            try:
                seen.move_to_end(key)
            except KeyError:  # (another thread evicted it meanwhile)
                pass
            return found
        found = count(text)
        seen[key] = found
        if len(seen) > self.size:
            try:
                seen.popitem(last=False)
            except KeyError:  # (another thread emptied it meanwhile)
                pass
        return found


MEMORY = CountMemory()


class Remembered:
    """A model's count function, its answers kept in a :class:`CountMemory` under the account
    :data:`SCOPE` names (not kept without one)."""

    def __init__(self, model: str, count: Callable[[str], int], memory: CountMemory) -> None:
        self.model = model
        self.count = count
        self.memory = memory

    def __call__(self, text: str) -> int:
        scope = SCOPE.get()
        if scope is None or not isinstance(text, str):  # (LiteLLM passes only text)
            return self.count(text)
        return self.memory.count(scope, self.model, self.count, text)


@lru_cache(maxsize=512)
def _params(model: str) -> Any:
    params = _MessageCountParams(model, None)
    params.count_function = Remembered(model, params.count_function, MEMORY)
    return params


def token_counter(*, model: str = "", messages: Sequence[Any] | None = None, text: str | None = None) -> int:
    """``litellm.token_counter(model=model, messages=messages)`` (or ``text=text``)."""
    if not INTERNALS or litellm.disable_token_counter or (messages is None) == (text is None):
        return int(litellm.token_counter(model=model, messages=messages, text=text))
    params = _params(model)
    if messages is None:
        return int(params.count_function(text))
    converted = convert_list_message_to_dict(messages)
    system = any(m.get("role", None) == "system" for m in converted)
    return int(
        _count_messages(params, converted, False, None)
        + _count_extra(params.count_function, None, None, system)
    )


__all__ = ["MEMORY", "REMEMBERED", "SCOPE", "SHORT_TEXT", "CountMemory", "Remembered", "token_counter"]
