"""Reading what LiteLLM hands the hooks: dicts, or pydantic models, depending on the route and
the version."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

_OTHER, _MAPPING, _MODEL = 0, 1, 2
_KINDS: dict[type, int] = {}  # how each type met so far is read
# whether a model class answers a name itself (a property, method, private attribute): names
# come from this package's code, so this stays small
_ON_CLASS: dict[tuple[type, str], bool] = {}


def _kind(obj: Any) -> int:
    kind = type(obj)
    if isinstance(obj, Mapping):
        found = _MAPPING
    elif isinstance(obj, BaseModel) and kind.__getattr__ is BaseModel.__getattr__:  # type: ignore[attr-defined]
        found = _MODEL  # a pydantic model that keeps pydantic's own attribute lookup
    else:
        found = _OTHER
    _KINDS[kind] = found
    return found


def field(obj: Any, name: str, default: Any = None) -> Any:
    """``obj[name]`` for a mapping, ``obj.name`` for anything else; ``default`` when absent.

    A pydantic model's fields and extras are read where pydantic keeps them, as ``getattr``
    would find them, but without the exception pydantic raises for a name it does
    not have, which cost more than the rest of a settlement's reading (LiteLLM's responses
    lack most optional fields)."""
    if obj is None:
        return default
    kind = _KINDS.get(type(obj))
    if kind is None:
        kind = _kind(obj)
    if kind == _MAPPING:
        return obj.get(name, default)
    if kind == _MODEL:
        values = obj.__dict__
        if name in values:
            return values[name]
        private = obj.__pydantic_private__  # (where pydantic keeps _hidden_params, say)
        if private and name in private:
            return private[name]
        on_class = _ON_CLASS.get((type(obj), name))
        if on_class is None:
            on_class = _ON_CLASS[(type(obj), name)] = hasattr(type(obj), name)
        if not on_class:  # no property, method, class or private attribute of that name
            extra = obj.__pydantic_extra__
            return extra.get(name, default) if extra else default
    return getattr(obj, name, default)


__all__ = ["field"]
