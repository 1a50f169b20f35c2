"""Who a request is for, and what its key chose.

The account comes from LiteLLM's key (``user_api_key_dict``) by the configured ``subject``:

    user         the key's user                     team          the key's team
    team_member  the key's user, a member of the key's team (its team pays), or a team's own key
    end_user     the end user a trusted backend names (a key with credits_role service or admin)
    key          the key itself

The master key is not metered unless it names a customer in the body's ``user`` (a trusted
backend acting for them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import InvalidRequest, PermissionDenied
from .litellm_objects import field

POWER_LEVEL_HEADER = "x-power-level"
# a key's own when_short, in its metadata (LiteLLM virtual keys) or as issued (plugin keys)
WHEN_SHORT_KEY = "credits_when_short"


def request_metadata(data: dict) -> dict:
    """The request's own metadata dict: ``litellm_metadata`` on routes where ``metadata`` is the
    provider's parameter (Responses, Anthropic messages, batches), else ``metadata``."""
    key = "litellm_metadata" if "litellm_metadata" in data else "metadata"
    meta = data.get(key)
    if meta is None:
        meta = data[key] = {}
    if not isinstance(meta, dict):
        raise InvalidRequest(f"{key} must be an object", param=key)
    return meta


def account_id(value: Any, param: str) -> str:
    """An account id as a request names it: 1 to 256 printable characters."""
    subject = str(value)
    if not 1 <= len(subject) <= 256 or any(ord(ch) < 32 or ord(ch) == 127 for ch in subject):
        raise InvalidRequest("the account id must be 1 to 256 printable characters", param=param)
    return subject


def subject_of(auth: Any, data: Mapping[str, Any], mode: str) -> str | None:
    """The account a request is for; None for unmetered admin traffic."""
    role = str(field(auth, "user_role") or "")
    is_admin = role.endswith("proxy_admin") and field(auth, "user_id") in (None, "default_user_id")
    if is_admin:
        # the master key acting for a customer (a trusted backend) names them in `user`
        user = data.get("user")
        return account_id(user, "user") if user else None
    if mode == "end_user" and (field(auth, "metadata") or {}).get("credits_role") not in (
        "service",
        "admin",
    ):
        # the end user is whatever the caller says it is: only a trusted backend may say it
        raise PermissionDenied("billing by end user needs a service key (key metadata credits_role: service)")
    subject = {
        "user": field(auth, "user_id"),
        "team": field(auth, "team_id"),
        # a key's user, spending from the key's team; a team's own key, the team
        "team_member": field(auth, "user_id") or field(auth, "team_id"),
        "end_user": field(auth, "end_user_id") or data.get("user"),
        "key": field(auth, "token") or field(auth, "api_key"),
    }[mode]
    if not subject:
        raise PermissionDenied(f"this key has no {mode.replace('_', ' ')} to charge credits to")
    return account_id(subject, "user")


def team_of(auth: Any, mode: str) -> str | None:
    """The team a key's user spends from (``subject: team_member``, a key with both)."""
    if mode != "team_member":
        return None
    team, user = field(auth, "team_id"), field(auth, "user_id")
    return account_id(team, "team_id") if team and user else None


def when_short_of(auth: Any) -> str | None:
    """A key's own choice of what a request that does not fit does, if it made one."""
    value = (field(auth, "metadata") or {}).get(WHEN_SHORT_KEY)
    return value if value in ("refuse", "clamp") else None


def requested_power_level(data: dict) -> str | None:
    """The power level a request asks for: ``metadata.power_level`` or the x-power-level header."""
    metadata = request_metadata(data)
    if metadata.get("power_level"):
        return str(metadata["power_level"])
    headers = (data.get("proxy_server_request") or {}).get("headers") or {}
    value = headers.get(POWER_LEVEL_HEADER)
    return str(value) if value else None


__all__ = [
    "POWER_LEVEL_HEADER",
    "WHEN_SHORT_KEY",
    "account_id",
    "request_metadata",
    "requested_power_level",
    "subject_of",
    "team_of",
    "when_short_of",
]
