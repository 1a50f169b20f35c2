"""Reading what LiteLLM hands the hooks: dicts, or pydantic models, depending on the route and
the version."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def field(obj: Any, name: str, default: Any = None) -> Any:
    """``obj[name]`` for a mapping, ``obj.name`` for anything else; ``default`` when absent."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


__all__ = ["field"]
