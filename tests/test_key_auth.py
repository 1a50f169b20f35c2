"""custom_auth's UserAPIKeyAuth for a plugin key: built once per key and owner, copied per request."""

from __future__ import annotations

import os

import pytest

from litellm_credits import auth
from litellm_credits.auth import KeyOwner, _key_auth

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def test_each_request_gets_its_own_copy_of_what_a_fresh_build_gives() -> None:
    from litellm.proxy._types import LitellmUserRoles, UserAPIKeyAuth

    owner = KeyOwner("alice", "user", "clamp")
    first = _key_auth("d1", owner)
    fresh = UserAPIKeyAuth(
        api_key="d1",
        token="d1",
        user_id="alice",
        user_role=LitellmUserRoles.INTERNAL_USER,
        metadata={"credits_role": "user", "credits_when_short": "clamp"},
    )
    assert first.model_dump() == fresh.model_dump()
    # what LiteLLM and the hooks do to a request's copy stays in that request
    first.authenticated_by_custom_auth = True
    first.end_user_id = "someone"
    first.metadata["credits_role"] = "admin"
    first.models.append("gpt-4o")
    first.aliases["x"] = "y"
    second = _key_auth("d1", owner)
    assert second is not first and second.metadata is not first.metadata
    assert second.models == [] and second.aliases == {}
    assert second.model_dump() == fresh.model_dump()


def test_a_changed_owner_or_role_is_built_anew() -> None:
    from litellm.proxy._types import LitellmUserRoles

    assert _key_auth("d2", KeyOwner("bob", "user")).metadata == {"credits_role": "user"}
    admin = _key_auth("d2", KeyOwner("bob", "admin"))
    assert admin.user_role == LitellmUserRoles.PROXY_ADMIN
    assert admin.metadata == {"credits_role": "admin"}
    assert _key_auth("d2", KeyOwner("bob", "user", "refuse")).metadata == {
        "credits_role": "user",
        "credits_when_short": "refuse",
    }


def test_the_kept_builds_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_AUTHS", {})
    monkeypatch.setattr(auth, "_AUTHS_KEPT", 3)
    for n in range(5):
        _key_auth(f"k{n}", KeyOwner(f"s{n}", "user"))
    assert [digest for digest, _ in auth._AUTHS] == ["k2", "k3", "k4"]


def test_a_copy_costs_a_tenth_of_a_build() -> None:
    """(Not a timing test: the copy must not validate, which is where a build's time goes.)"""
    from litellm.proxy._types import UserAPIKeyAuth

    _key_auth("d3", KeyOwner("carol", "user"))
    validated: list[object] = []
    original = UserAPIKeyAuth.__init__

    def counting(self: object, **data: object) -> None:
        validated.append(data)
        original(self, **data)  # type: ignore[arg-type]

    UserAPIKeyAuth.__init__ = counting  # type: ignore[method-assign]
    try:
        _key_auth("d3", KeyOwner("carol", "user"))
    finally:
        UserAPIKeyAuth.__init__ = original  # type: ignore[method-assign]
    assert validated == []
