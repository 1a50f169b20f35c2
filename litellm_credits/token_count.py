"""Token counts as LiteLLM's ``token_counter`` makes them, with its per-model set-up done once.

``litellm.token_counter(model=..., messages=...)`` looks up the model's tokenizer by name and its
per-message overheads on every call: about a third of the pre-call hook's CPU in the benchmark
(py-spy; ``bench/RESULTS.md``). :func:`token_counter` keeps that set-up per model and counts with
LiteLLM's own functions, so every count is LiteLLM's (a test compares them on several models and
message shapes). On a LiteLLM without those internals, or with its counter disabled, it calls
``litellm.token_counter`` as before.
"""

from __future__ import annotations

from collections.abc import Sequence
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


@lru_cache(maxsize=512)
def _params(model: str) -> Any:
    return _MessageCountParams(model, None)


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


__all__ = ["token_counter"]
