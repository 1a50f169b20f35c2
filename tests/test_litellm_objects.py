"""``field`` reads LiteLLM's objects as ``getattr`` (or a mapping's ``get``) would."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import litellm
import pytest
from litellm.types.utils import Usage
from pydantic import BaseModel, ConfigDict, PrivateAttr

from litellm_credits.litellm_objects import field

MISSING = object()


def response(**usage: Any) -> litellm.ModelResponse:
    r = litellm.ModelResponse(
        model="gpt-4o-mini",
        choices=[{"message": {"role": "assistant", "content": "hi"}}],
        usage={"prompt_tokens": 15, "completion_tokens": 4, "total_tokens": 19, **usage},
    )
    r._hidden_params = {"provider_specific_fields": {"traffic_type": "FLEX"}}
    return r


class Extra(BaseModel):
    model_config = ConfigDict(extra="allow")
    a: int = 1

    @property
    def doubled(self) -> int:
        return 2 * self.a


class Private(BaseModel):
    a: int = 1
    _secret: int = PrivateAttr(default=5)


class OwnLookup(BaseModel):
    a: int = 1

    def __getattr__(self, name: str) -> Any:
        return f"made up {name}"


NAMES = [
    "usage", "model", "choices", "service_tier", "_hidden_params", "prompt_tokens", "completion_tokens",
    "prompt_tokens_details", "completion_tokens_details", "cache_creation_input_tokens", "duration", "data",
    "a", "b", "doubled", "_secret", "model_fields", "__class__", "nothing_here",
]  # fmt: skip


def objects() -> list[Any]:
    r = response(cache_creation_input_tokens=7)
    flagged = response()
    flagged.usage.service_tier = "flex"  # type: ignore[attr-defined]
    return [
        r, r.usage, flagged, flagged.usage, Usage(prompt_tokens=1), r.choices[0],
        Extra(a=3, b=4), Extra(), Private(), OwnLookup(), {"usage": 1, "a": None}, SimpleNamespace(a=5),
        7, "text",
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(len(objects())))
def test_field_answers_as_getattr_or_get_would(index: int) -> None:
    obj = objects()[index]
    for _ in range(2):  # the first read classifies the type, the second uses that
        for name in NAMES:
            expected = obj.get(name, MISSING) if isinstance(obj, dict) else getattr(obj, name, MISSING)
            assert field(obj, name, MISSING) is expected or field(obj, name, MISSING) == expected, name


def test_none_and_defaults() -> None:
    assert field(None, "a") is None
    assert field(None, "a", 3) == 3
    assert field(Extra(), "b", "absent") == "absent"
