"""The callback without the proxy: its collaborators are passed in, the database is real."""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from litellm.proxy._types import ProxyException

from litellm_credits.hooks import HOLD_KEY, CreditsHandler, HoldClaim, HoldSigner
from litellm_credits.ledger import Ledger
from litellm_credits.money import parse_credits as c
from litellm_credits.runtime import Runtime
from litellm_credits.settings import CreditsConfig, Settings

# 1 USD = 1000 credits; 1 token in = 0.001 credits, 1 token out = 0.002 credits at balanced
CONFIG = {
    "credits_per_usd": 1000,
    "tiers": {"free": {}, "pro": {"markup": "0.1"}, "sponsored": {"unlimited": True}},
    "default_max_output_tokens": 100,
    "models": {"house": {"input_cost_per_token": "0.000001", "output_cost_per_token": "0.000002"}},
}
START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
END = START + dt.timedelta(milliseconds=250)


@pytest.fixture(scope="module")
async def handler(settings: Settings) -> AsyncIterator[CreditsHandler]:
    rt = Runtime(settings.model_copy(update={"credits": CreditsConfig.model_validate(CONFIG)}))
    yield CreditsHandler(rt, deployments=lambda group: [])
    await rt.close()


def auth(user_id: str | None = None, *, role: str = "internal_user", team_id: str | None = None) -> Any:
    return SimpleNamespace(user_id=user_id, team_id=team_id, end_user_id=None, token="hashed", user_role=role)


def request(model: str = "house", content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 50, **extra}


def success_kwargs(data: dict[str, Any], *, stream: bool = False, **more: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "litellm_params": {"metadata": data["metadata"], "model_info": {}},
        "standard_logging_object": {"model_group": data["model"]},
        "model": data["model"],
        "custom_llm_provider": "openai",
        "stream": stream,
        **more,
    }
    return kwargs


def response(prompt: int, completion: int) -> dict[str, Any]:
    return {"usage": {"prompt_tokens": prompt, "completion_tokens": completion}}


async def new_account(handler: CreditsHandler, balance: str, tier: str = "free") -> str:
    ledger = await handler.runtime.ledger()
    subject = "hook-" + secrets.token_hex(5)
    await ledger.create_account(subject, tier=tier)
    if c(balance):
        await ledger.credit(subject, c(balance))
    return subject


async def balance_of(handler: CreditsHandler, subject: str) -> tuple[int, int]:
    account = await (await handler.runtime.ledger()).require_account(subject)
    return account.balance, account.held


async def test_success_settles_once_even_if_delivered_twice(handler: CreditsHandler) -> None:
    subject = await new_account(handler, "10")
    data = await handler.async_pre_call_hook(auth(subject), None, request(), "acompletion")
    assert isinstance(data["metadata"][HOLD_KEY], str)
    _, held = await balance_of(handler, subject)
    assert held > 0  # the worst case: counted prompt + 50 output tokens
    kwargs = success_kwargs(data)
    await handler.async_log_success_event(kwargs, response(100, 20), START, END)
    await handler.async_log_success_event(kwargs, response(100, 20), START, END)
    # 100 × 0.001 + 20 × 0.002 = 0.14 credits
    assert await balance_of(handler, subject) == (c("10") - c("0.14"), 0)
    ledger: Ledger = await handler.runtime.ledger()
    rows = await ledger.pool.fetch(
        "SELECT latency_ms FROM credits.usage_events WHERE subject_id = $1", subject
    )
    assert [r["latency_ms"] for r in rows] == [250]


async def test_success_after_void_changes_nothing(handler: CreditsHandler) -> None:
    subject = await new_account(handler, "10")
    data = await handler.async_pre_call_hook(auth(subject), None, request(), "acompletion")
    await handler.async_post_call_failure_hook(data, RuntimeError("upstream 500"), auth(subject))
    assert await balance_of(handler, subject) == (c("10"), 0)
    await handler.async_log_success_event(success_kwargs(data), response(100, 20), START, END)
    assert await balance_of(handler, subject) == (c("10"), 0)


async def test_stream_chunks_do_not_settle(handler: CreditsHandler) -> None:
    subject = await new_account(handler, "10")
    data = await handler.async_pre_call_hook(auth(subject), None, request(stream=True), "acompletion")
    await handler.async_log_success_event(success_kwargs(data, stream=True), response(5, 1), START, END)
    assert (await balance_of(handler, subject))[1] > 0  # still held
    done = success_kwargs(data, stream=True, async_complete_streaming_response=object())
    await handler.async_log_success_event(done, response(100, 20), START, END)
    assert await balance_of(handler, subject) == (c("10") - c("0.14"), 0)


async def test_forged_hold_tokens_are_ignored(handler: CreditsHandler) -> None:
    victim = await new_account(handler, "10")
    victim_data = await handler.async_pre_call_hook(auth(victim), None, request(), "acompletion")
    claim = handler.signer.verify(victim_data["metadata"][HOLD_KEY])
    assert claim is not None
    forged = HoldSigner().sign(HoldClaim(claim.hold_id, victim, claim.rate, "balanced", "chat"))
    # a client that sends a token (its own or a copy) gets it stripped before the hold
    attacker = await new_account(handler, "10")
    sent = request(metadata={HOLD_KEY: victim_data["metadata"][HOLD_KEY]})
    data = await handler.async_pre_call_hook(auth(attacker), None, sent, "acompletion")
    assert data["metadata"][HOLD_KEY] != victim_data["metadata"][HOLD_KEY]
    # a token signed by anyone else is never acted on
    await handler.async_post_call_failure_hook(
        {"metadata": {HOLD_KEY: forged}}, RuntimeError(), auth(attacker)
    )
    await handler.async_log_success_event(
        success_kwargs({"model": "house", "metadata": {HOLD_KEY: forged}}), response(1, 1), START, END
    )
    assert (await balance_of(handler, victim))[1] > 0  # the victim's hold is untouched


async def test_unlimited_tier_records_full_cost_without_debit(handler: CreditsHandler) -> None:
    subject = await new_account(handler, "0", tier="sponsored")
    data = await handler.async_pre_call_hook(auth(subject), None, request(), "acompletion")
    await handler.async_log_success_event(success_kwargs(data), response(100, 20), START, END)
    assert await balance_of(handler, subject) == (0, 0)
    ledger: Ledger = await handler.runtime.ledger()
    cost = await ledger.pool.fetchval("SELECT cost FROM credits.usage_events WHERE subject_id = $1", subject)
    assert cost == c("0.14")


async def test_power_level_and_markup_change_the_charge(handler: CreditsHandler) -> None:
    charges = {}
    for tier, level, how in [
        ("free", "eco", "metadata"),
        ("free", "balanced", None),
        ("free", "precision", "header"),
        ("pro", "balanced", "metadata"),
    ]:
        subject = await new_account(handler, "10", tier)
        extra: dict[str, Any] = {}
        if how == "metadata":
            extra["metadata"] = {"power_level": level}
        elif how == "header":
            extra["proxy_server_request"] = {"headers": {"x-power-level": level}}
        data = await handler.async_pre_call_hook(auth(subject), None, request(**extra), "acompletion")
        await handler.async_log_success_event(success_kwargs(data), response(100, 20), START, END)
        charges[(tier, level)] = c("10") - (await balance_of(handler, subject))[0]
    assert charges[("free", "eco")] == c("0.07")
    assert charges[("free", "balanced")] == c("0.14")
    assert charges[("free", "precision")] == c("0.28")
    assert charges[("pro", "balanced")] == c("0.154")


async def test_bad_power_level_is_a_400(handler: CreditsHandler) -> None:
    subject = await new_account(handler, "10")
    with pytest.raises(ProxyException) as err:
        await handler.async_pre_call_hook(
            auth(subject), None, request(metadata={"power_level": "turbo"}), "acompletion"
        )
    assert (err.value.code, err.value.type) == ("400", "invalid_request")


async def test_unpriced_model_is_refused_before_the_call(handler: CreditsHandler) -> None:
    subject = await new_account(handler, "10")
    with pytest.raises(ProxyException) as err:
        await handler.async_pre_call_hook(
            auth(subject), None, request(model="nobody-knows-me"), "acompletion"
        )
    assert (err.value.code, err.value.type) == ("400", "model_not_priced")
    assert await balance_of(handler, subject) == (c("10"), 0)


async def test_unknown_model_is_a_404_not_an_unpriced_one(handler: CreditsHandler) -> None:
    """Regression: a model name the proxy does not route (a misspelt one) was refused
    `400 model_not_priced`, telling the caller to set a price, instead of `404 model_not_found`."""
    groups = {
        "house": [{"model_name": "house", "litellm_params": {"model": "openai/house"}}],
        "unpriced": [{"model_name": "unpriced", "litellm_params": {"model": "openai/nobody-priced-this"}}],
    }
    routed = CreditsHandler(
        handler.runtime, deployments=lambda group: groups.get(group, []), routes=lambda group: False
    )
    subject = await new_account(handler, "10")
    with pytest.raises(ProxyException) as err:
        await routed.async_pre_call_hook(auth(subject), None, request(model="huose"), "acompletion")
    assert (err.value.code, err.value.type, err.value.param) == ("404", "model_not_found", "model")
    assert "'huose' does not exist" in err.value.message
    with pytest.raises(ProxyException) as err:
        await routed.async_pre_call_hook(auth(subject), None, request(model="unpriced"), "acompletion")
    assert (err.value.code, err.value.type) == ("400", "model_not_priced")
    assert "set one" in err.value.message
    assert await balance_of(handler, subject) == (c("10"), 0)
    # a name the router takes without listing a deployment for it (a default deployment, every
    # model passed through) is priced by its name
    default_route = CreditsHandler(handler.runtime, deployments=lambda group: [], routes=lambda group: True)
    await default_route.async_pre_call_hook(auth(subject), None, request(model="house"), "acompletion")
    assert (await balance_of(handler, subject))[1] > 0


async def test_refusals_on_anthropic_messages_keep_anthropic_error_shape(handler: CreditsHandler) -> None:
    """Regression: on /v1/messages every refusal was `api_error`; an Anthropic client expects
    `billing_error` for a 402."""
    subject = await new_account(handler, "0.01")
    with pytest.raises(ProxyException) as err:
        await handler.async_pre_call_hook(auth(subject), None, request(), "anthropic_messages")
    assert err.value.code == "402"
    body = json.loads(err.value.message)  # LiteLLM's messages route passes such a body through
    assert body["type"] == "error"
    assert (body["error"]["type"], body["error"]["credits_type"]) == ("billing_error", "insufficient_credits")
    assert body["error"]["message"].startswith("insufficient credits")
    assert body["error"]["details"]["balance"] == "0.010000"


async def test_a_refusal_is_logged_once_in_one_line(
    handler: CreditsHandler, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: a 402 from the pre-call hook was logged only by LiteLLM, at ERROR; the plugin
    logs it in one WARNING line and marks it so that LiteLLM's line is dropped."""
    subject = await new_account(handler, "0.01")
    caplog.set_level(logging.INFO, logger="litellm_credits")
    with pytest.raises(ProxyException) as err:
        await handler.async_pre_call_hook(
            auth(subject), None, {**request(), "litellm_call_id": "call-1"}, "acompletion"
        )
    [record] = [r for r in caplog.records if r.name.startswith("litellm_credits")]
    assert record.levelno == logging.WARNING and record.exc_info is None
    line = record.getMessage()
    assert "\n" not in line
    assert "402 insufficient_credits" in line and "'house'" in line and "call-1" in line
    assert err.value.credits_logged is True  # type: ignore[attr-defined]


async def test_insufficient_credits_is_a_402_with_details(handler: CreditsHandler) -> None:
    subject = await new_account(handler, "0.01")
    with pytest.raises(ProxyException) as err:
        await handler.async_pre_call_hook(auth(subject), None, request(), "acompletion")
    assert (err.value.code, err.value.type) == ("402", "insufficient_credits")
    body = err.value.to_dict()
    assert body["details"]["balance"] == "0.010000"
    assert c(body["details"]["required"]) > c("0.01")


async def test_new_subject_gets_an_empty_account(handler: CreditsHandler) -> None:
    subject = "new-" + secrets.token_hex(5)
    with pytest.raises(ProxyException) as err:
        await handler.async_pre_call_hook(auth(subject), None, request(), "acompletion")
    assert err.value.type == "insufficient_credits"
    account = await (await handler.runtime.ledger()).require_account(subject)
    assert (account.balance, account.tier) == (0, "free")


async def test_master_key_is_unmetered_unless_acting_for_a_user(handler: CreditsHandler) -> None:
    admin = auth(None, role="proxy_admin")
    data = await handler.async_pre_call_hook(admin, None, request(), "acompletion")
    assert HOLD_KEY not in data["metadata"]
    subject = await new_account(handler, "10")
    data = await handler.async_pre_call_hook(admin, None, request(user=subject), "acompletion")
    assert handler.signer.verify(data["metadata"][HOLD_KEY]).subject_id == subject  # type: ignore[union-attr]


async def test_team_subject(handler: CreditsHandler) -> None:
    team_handler = CreditsHandler(
        Runtime(
            handler.runtime.settings.model_copy(
                update={"credits": CreditsConfig.model_validate({**CONFIG, "subject": "team"})}
            )
        ),
        deployments=lambda group: [],
    )
    team = await new_account(handler, "10")
    data = await team_handler.async_pre_call_hook(
        auth("someone", team_id=team), None, request(), "acompletion"
    )
    assert team_handler.signer.verify(data["metadata"][HOLD_KEY]).subject_id == team  # type: ignore[union-attr]
    with pytest.raises(ProxyException) as err:
        await team_handler.async_pre_call_hook(auth("someone"), None, request(), "acompletion")
    assert (err.value.code, err.value.type) == ("403", "permission_denied")
    await team_handler.runtime.close()


async def test_every_choice_is_held(handler: CreditsHandler) -> None:
    held = {}
    for n in (1, 3):
        subject = await new_account(handler, "10")
        await handler.async_pre_call_hook(auth(subject), None, request(n=n), "acompletion")
        held[n] = (await balance_of(handler, subject))[1]
    # 50 output tokens at 0.002 credits each, per choice
    assert held[3] - held[1] == c("0.2")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": "abc"}, "n"),
        ({"n": 0}, "n"),
        ({"n": 10_000}, "n"),
        ({"max_tokens": 10**17}, "max_tokens"),
        ({"max_tokens": "lots"}, "max_tokens"),
        ({"metadata": "not-an-object"}, "metadata"),
    ],
)
async def test_malformed_requests_are_400s(handler: CreditsHandler, extra: dict, param: str) -> None:
    subject = await new_account(handler, "10")
    with pytest.raises(ProxyException) as err:
        await handler.async_pre_call_hook(auth(subject), None, {**request(), **extra}, "acompletion")
    assert (err.value.code, err.value.type, err.value.param) == ("400", "invalid_request", param)
    assert await balance_of(handler, subject) == (c("10"), 0)


async def test_master_key_naming_an_impossible_account_is_a_400(handler: CreditsHandler) -> None:
    for user in ("x" * 300, "bad\x00id"):
        with pytest.raises(ProxyException) as err:
            await handler.async_pre_call_hook(
                auth(None, role="proxy_admin"), None, request(user=user), "acompletion"
            )
        assert (err.value.code, err.value.type) == ("400", "invalid_request")


async def test_litellm_metadata_routes_carry_the_hold(handler: CreditsHandler) -> None:
    """On /v1/responses and /v1/messages `metadata` is the provider's parameter: the hold rides in
    `litellm_metadata`, which LiteLLM hands to the callbacks as litellm_params.metadata."""
    subject = await new_account(handler, "10")
    sent = request(metadata={"customer_field": "kept"}, litellm_metadata={})
    data = await handler.async_pre_call_hook(auth(subject), None, sent, "aresponses")
    assert data["metadata"] == {"customer_field": "kept"}  # nothing of ours goes upstream
    assert HOLD_KEY in data["litellm_metadata"]
    kwargs = success_kwargs({"model": "house", "metadata": data["litellm_metadata"]})
    await handler.async_log_success_event(kwargs, response(100, 20), START, END)
    assert await balance_of(handler, subject) == (c("10") - c("0.14"), 0)


async def test_only_the_caller_can_release_its_hold(handler: CreditsHandler) -> None:
    victim = await new_account(handler, "10")
    data = await handler.async_pre_call_hook(auth(victim), None, request(), "acompletion")
    other = await new_account(handler, "10")
    await handler.async_post_call_failure_hook(data, RuntimeError(), auth(other))
    assert (await balance_of(handler, victim))[1] > 0
    await handler.async_post_call_failure_hook(data, RuntimeError(), auth(victim))
    assert (await balance_of(handler, victim))[1] == 0


async def test_end_user_billing_needs_a_trusted_key(settings: Settings) -> None:
    rt = Runtime(
        settings.model_copy(
            update={"credits": CreditsConfig.model_validate({**CONFIG, "subject": "end_user"})}
        )
    )
    end_user_handler = CreditsHandler(rt, deployments=lambda group: [])
    try:
        customer = await new_account(end_user_handler, "10")
        plain = SimpleNamespace(
            user_id="app",
            team_id=None,
            end_user_id=customer,
            token="t",
            user_role="internal_user",
            metadata={},
        )
        with pytest.raises(ProxyException) as err:
            await end_user_handler.async_pre_call_hook(plain, None, request(user=customer), "acompletion")
        assert (err.value.code, err.value.type) == ("403", "permission_denied")
        service = SimpleNamespace(**{**vars(plain), "metadata": {"credits_role": "service"}})
        data = await end_user_handler.async_pre_call_hook(
            service, None, request(user=customer), "acompletion"
        )
        assert end_user_handler.signer.verify(data["metadata"][HOLD_KEY]).subject_id == customer  # type: ignore[union-attr]
    finally:
        await rt.close()


async def test_priced_call_with_no_upfront_estimate_still_needs_credits(settings: Settings) -> None:
    cfg = {
        **CONFIG,
        "models": {
            "whisper-house": {"input_cost_per_second": "0.0001"},
            "tts-house": {"input_cost_per_character": "0.000015"},
        },
    }
    rt = Runtime(settings.model_copy(update={"credits": CreditsConfig.model_validate(cfg)}))
    h = CreditsHandler(rt, deployments=lambda group: [])
    try:
        empty = await new_account(h, "0")
        with pytest.raises(ProxyException) as err:
            await h.async_pre_call_hook(auth(empty), None, {"model": "whisper-house"}, "atranscription")
        assert err.value.type == "insufficient_credits"
        # speech is held by its characters: 1000 × 0.000015 USD × 1000 credits/USD = 15 credits
        subject = await new_account(h, "20")
        await h.async_pre_call_hook(
            auth(subject), None, {"model": "tts-house", "input": "x" * 1000}, "aspeech"
        )
        assert (await balance_of(h, subject))[1] == c("15")
    finally:
        await rt.close()


async def test_a_bad_output_limit_on_a_free_model_leaves_no_hold(settings: Settings) -> None:
    """Regression (found by the LLM fuzz suite): a free model's request skipped the checks of
    ``n`` and ``max_tokens`` before its hold, then failed them after it: a 400 with the hold left
    open until its TTL."""
    cfg = {**CONFIG, "models": {**CONFIG["models"], "gift": {"free": True}}}  # type: ignore[dict-item]
    rt = Runtime(settings.model_copy(update={"credits": CreditsConfig.model_validate(cfg)}))
    h = CreditsHandler(rt, deployments=lambda group: [])
    try:
        subject = await new_account(h, "1")
        for bad in ({"max_tokens": "many"}, {"n": 0}, {"max_completion_tokens": -1}):
            with pytest.raises(ProxyException) as err:
                await h.async_pre_call_hook(auth(subject), None, request(model="gift", **bad), "acompletion")
            assert err.value.code == "400"
        ledger: Ledger = await h.runtime.ledger()
        assert (
            await ledger.pool.fetchval("SELECT count(*) FROM credits.holds WHERE subject_id = $1", subject)
            == 0
        )
    finally:
        await rt.close()


def test_a_verified_claim_is_remembered_and_a_forged_one_never_is(monkeypatch: pytest.MonkeyPatch) -> None:
    signer = HoldSigner(remember=2)
    claims = [HoldClaim(uuid.uuid4(), f"acct-{i}", Decimal(1), "balanced", "chat") for i in range(3)]
    tokens = [signer.sign(c) for c in claims]
    checked: list[str] = []
    check = signer._check
    monkeypatch.setattr(signer, "_check", lambda token: checked.append(token) or check(token))
    # the claims signed last are known by their token: no HMAC or parsing on the request's hooks
    assert signer.verify(tokens[2]) is claims[2] and checked == []
    assert signer.verify(tokens[0]) == claims[0]  # signed before the last two: checked again
    assert checked == [tokens[0]]
    assert signer.verify(tokens[0]) is signer.verify(tokens[0])  # parsed once
    body, mac = tokens[0].split(".")
    assert signer.verify(body[:-2] + "AA." + mac) is None  # a changed body
    assert HoldSigner().verify(tokens[0]) is None  # another process's key
    assert [signer.verify(t) for t in tokens] == claims
    assert list(signer._verified) == tokens[1:]  # bounded: the oldest forgotten, verified again if asked


async def test_the_prompt_is_counted_in_its_accounts_scope(
    handler: CreditsHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The estimate counts the prompt with token_count.SCOPE naming the account (so its repeated
    texts are not tokenized again, and no other account's counts serve it); after it, none."""
    from litellm_credits import token_count

    scopes: list[str | None] = []
    counter = token_count.token_counter

    def spy(**kwargs: Any) -> int:
        scopes.append(token_count.SCOPE.get())
        return counter(**kwargs)

    monkeypatch.setattr(token_count, "token_counter", spy)
    subject = await new_account(handler, "10")
    data = await handler.async_pre_call_hook(auth(subject), None, request(), "acompletion")
    assert scopes == [subject]
    assert token_count.SCOPE.get() is None
    await handler.async_post_call_failure_hook(data, RuntimeError("upstream 500"), auth(subject))
