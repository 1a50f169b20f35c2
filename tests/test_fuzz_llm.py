"""Fuzzing the LLM request path: the pre-call hook, the stream guard and the settlement with
generated requests, on accounts in every state the limits know.

Hypothesis builds request bodies (output limits of every type and size, ``n``, streams, service
tiers, metadata of the wrong shape, prompts), callers (funded, nearly empty, a key that refuses,
team members with caps, an empty team) and usage reports. The hook either answers with the
request (its output limit lowered only when its hold was clamped, and then to what the hold
covers) or refuses with a 4xx in the OpenAI shape, never a 5xx or another exception; every hold
ends (settled from random usage, or voided) and the ledger stays sound. Deterministic in CI.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litellm.proxy._types import ProxyException
from litellm.types.utils import Delta, ModelResponseStream, StreamingChoices

from litellm_credits.estimate import OUTPUT_PARAMS
from litellm_credits.hooks import HOLD_KEY, CreditsHandler
from litellm_credits.ledger import Ledger
from litellm_credits.money import parse_credits as c
from litellm_credits.runtime import Runtime
from litellm_credits.settings import CreditsConfig, Settings

CONFIG = {
    "credits_per_usd": 1000,
    "tiers": {"free": {}, "strict": {"when_short": "refuse"}, "sponsored": {"unlimited": True}},
    "default_max_output_tokens": 2000,
    "min_output_tokens": 64,
    "models": {
        "house": {
            "input_cost_per_token": "0.000001",
            "output_cost_per_token": "0.00001",
            "max_output_tokens": 50000,
        },
        "cheap": {"input_cost_per_token": "0.0000001", "output_cost_per_token": "0.0000004"},
        "free-one": {"free": True},
        "by-second": {"output_cost_per_second": "0.001"},
    },
}
CALLS = ["acompletion", "atext_completion", "aresponses", "anthropic_messages", "aembedding", "other"]
CI = os.environ.get("CI") == "true"

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=20)
)
anything = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
limit = st.one_of(st.integers(0, 200_000), st.integers(-5, 5), st.just(10**12), anything)

requests = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["house", "cheap", "free-one", "by-second", "nobody-knows"]),
        "messages": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=200)}
                ),
                min_size=1,
                max_size=3,
            ),
            anything,
        ),
    },
    optional={
        "max_tokens": limit,
        "max_completion_tokens": limit,
        "max_output_tokens": limit,
        "n": st.one_of(st.integers(-2, 200), anything),
        "stream": st.booleans(),
        "stream_options": st.one_of(st.just({"include_usage": True}), anything),
        "service_tier": st.one_of(st.sampled_from(["flex", "priority", "auto", "default", "fast"]), anything),
        "metadata": st.one_of(st.just({"power_level": "eco"}), st.just({"power_level": "turbo"}), anything),
        "input": anything,
        "prompt": anything,
        "user": st.one_of(st.text(max_size=300), anything),
    },
)
CALLERS = [
    "funded",
    "nearly-empty",
    "refusing-key",
    "strict-tier",
    "member",
    "capped-member",
    "empty-team",
    "sponsored",
]


@pytest.fixture(scope="module")
async def world(settings: Settings) -> AsyncIterator[dict[str, Any]]:
    rt = Runtime(settings.model_copy(update={"credits": CreditsConfig.model_validate(CONFIG)}))
    handler = CreditsHandler(rt, deployments=lambda group: [], routes=lambda group: group != "nobody-knows")
    ledger = await rt.ledger()
    tag = secrets.token_hex(3)
    team, empty_team = f"fz-team-{tag}", f"fz-empty-{tag}"
    await ledger.create_account(team, tier="free", subject_type="team")
    await ledger.credit(team, c("1000000"))
    await ledger.create_account(empty_team, tier="free", subject_type="team")
    accounts = {
        "funded": (f"fz-funded-{tag}", "free", "100000", {}),
        "nearly-empty": (f"fz-poor-{tag}", "free", "0.05", {}),
        "refusing-key": (f"fz-refuse-{tag}", "free", "0.05", {"credits_when_short": "refuse"}),
        "strict-tier": (f"fz-strict-{tag}", "strict", "0.05", {}),
        "sponsored": (f"fz-sponsored-{tag}", "sponsored", "0", {}),
    }
    callers: dict[str, Any] = {}
    for name, (subject, tier, balance, metadata) in accounts.items():
        await ledger.create_account(subject, tier=tier)
        if c(balance):
            await ledger.credit(subject, c(balance))
        callers[name] = (subject, metadata)
    for name, parent, caps in (
        ("member", team, {}),
        ("capped-member", team, {"daily_cap": c("0.2"), "request_cap": c("0.1")}),
        ("empty-team", empty_team, {}),
    ):
        subject = f"fz-{name}-{tag}"
        await ledger.create_account(subject, tier="free", parent_id=parent, **caps)
        callers[name] = (subject, {})
    yield {"handler": handler, "ledger": ledger, "callers": callers}
    await rt.close()


def auth(subject: str, metadata: dict[str, Any]) -> Any:
    return SimpleNamespace(
        user_id=subject,
        team_id=None,
        end_user_id=None,
        token="t",
        user_role="internal_user",
        metadata=metadata,
    )


async def one_request(
    world: dict[str, Any], caller: str, call: str, body: dict[str, Any], usage: tuple[int, int], ends: str
) -> None:
    handler: CreditsHandler = world["handler"]
    subject, metadata = world["callers"][caller]
    data = dict(body)
    before = {k: data.get(k) for k in OUTPUT_PARAMS}
    try:
        out = await handler.async_pre_call_hook(auth(subject, metadata), None, data, call)
    except ProxyException as err:
        assert str(err.code).isdigit() and 400 <= int(err.code) < 500, (err.code, err.type, err.message)
        assert err.type and err.message
        return
    meta = out.get("litellm_metadata") if "litellm_metadata" in out else out.get("metadata")
    if not isinstance(meta, dict) or HOLD_KEY not in meta:
        return  # not metered (a free model's hold is still taken; nothing else skips it)
    claim = handler._claim(out)
    assert claim is not None
    for key in OUTPUT_PARAMS:
        if out.get(key) != before[key]:  # lowered only by a clamped hold, to what it covers
            assert claim.max_tokens is not None and out[key] == claim.max_tokens
            assert isinstance(before[key], int | None) and (
                before[key] is None or claim.max_tokens < before[key]
            )
    kwargs = {
        "litellm_params": {"metadata": meta, "model_info": {}},
        "standard_logging_object": {"model_group": body["model"]},
        "model": body["model"],
        "custom_llm_provider": "openai",
    }
    now = datetime.now(timezone.utc)
    if ends == "fail":
        await handler.async_post_call_failure_hook(out, RuntimeError("upstream"), auth(subject, metadata))
    elif ends == "stream":
        chunks = [
            ModelResponseStream(
                id="s",
                created=1,
                model="m",
                choices=[StreamingChoices(index=0, delta=Delta(content="word "))],
            )
            for _ in range(usage[1] % 300)
        ]

        async def stream() -> AsyncIterator[Any]:
            for chunk in chunks:
                yield chunk

        got = [x async for x in handler.async_post_call_streaming_iterator_hook(None, stream(), out)]
        assert len(got) <= len(chunks) + 2
        if claim.hold_id not in handler._cut:
            await handler.async_log_success_event(
                {**kwargs, "stream": True, "async_complete_streaming_response": object()},
                {"usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}},
                now,
                now,
            )
    else:
        await handler.async_log_success_event(
            kwargs, {"usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}}, now, now
        )
    if claim.hold_id not in handler._cut:  # (a cut stream is settled in the background)
        ledger: Ledger = world["ledger"]
        status = await ledger.pool.fetchval(
            "SELECT status FROM credits.holds WHERE subject_id = $1 AND id = $2",
            claim.subject_id,
            claim.hold_id,
        )
        assert status in ("settled", "voided"), (ends, status)


@settings(
    max_examples=300 if CI else 150,
    derandomize=CI,
    database=None if CI else settings.default.database,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    caller=st.sampled_from(CALLERS),
    call=st.sampled_from(CALLS),
    body=requests,
    usage=st.tuples(st.integers(0, 5000), st.integers(0, 5000)),
    ends=st.sampled_from(["settle", "settle", "fail", "stream"]),
)
async def test_generated_requests_get_a_4xx_or_a_hold_that_ends(
    world: dict[str, Any], caller: str, call: str, body: dict[str, Any], usage: tuple[int, int], ends: str
) -> None:
    await one_request(world, caller, call, body, usage, ends)


async def test_the_ledger_is_sound_after_the_fuzzing(world: dict[str, Any]) -> None:
    ledger: Ledger = world["ledger"]
    subjects = [s for s, _ in world["callers"].values()]
    query = (
        "SELECT count(*) FROM credits.holds WHERE status = 'open' "
        "AND (subject_id = ANY($1::text[]) OR member_id = ANY($1::text[]))"
    )
    for _ in range(50):  # the cut streams are settled in the background
        if await ledger.pool.fetchval(query, subjects) == 0:
            break
        await asyncio.sleep(0.1)
    rows = await ledger.pool.fetch(query.replace("count(*)", "*"), subjects)
    assert [(r["subject_id"], r["member_id"], r["model"], r["amount"], r["debits"]) for r in rows] == []
    assert await ledger.discrepancies() == []
