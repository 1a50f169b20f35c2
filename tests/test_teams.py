"""Team pools: members spend their team's credits within their own caps and the team's.

The ledger alone (real PostgreSQL), the hook with LiteLLM-style team keys, the admin and team
routes, and twenty members spending at once through the real proxy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections import Counter
from types import SimpleNamespace
from typing import Any

import openai
import pytest
from litellm.proxy._types import ProxyException

from litellm_credits.errors import (
    AccountDisabled,
    AccountIsMember,
    DailyCapExceeded,
    IdempotencyConflict,
    InsufficientCredits,
    MemberCapExceeded,
    RequestCapExceeded,
    TeamCapExceeded,
    TeamHierarchy,
    TeamInsufficientCredits,
)
from litellm_credits.hooks import CreditsHandler
from litellm_credits.ledger import Ledger, UsageRecord
from litellm_credits.money import parse_credits as c
from litellm_credits.records import Quote
from litellm_credits.runtime import Runtime
from litellm_credits.settings import CreditsConfig, Settings

from .conftest import Proxy
from .test_proxy import chat, settled

TTL = 600


async def team_with_members(
    ledger: Ledger, balance: str, members: int = 2, **caps: Any
) -> tuple[str, list[str]]:
    team = "team-" + secrets.token_hex(5)
    await ledger.create_account(team, tier="free", subject_type="team")
    if c(balance):
        await ledger.credit(team, c(balance))
    names = []
    for i in range(members):
        name = f"{team}-m{i}"
        await ledger.create_account(name, tier="free", parent_id=team, **caps)
        names.append(name)
    return team, names


async def hold(ledger: Ledger, subject: str, amount: str, minimum: str | None = None) -> Any:
    quote = Quote(c(amount), True, c(minimum) if minimum else None)
    return await ledger.hold_quoted(subject, {"free": quote}, default_tier="free", ttl_seconds=TTL)


async def test_a_member_spends_its_teams_credits(ledger: Ledger) -> None:
    team, (alice, _) = await team_with_members(ledger, "10")
    held = await hold(ledger, alice, "3")
    assert held.subject_id == team  # the team pays
    t, a = await ledger.require_account(team), await ledger.require_account(alice)
    assert (t.held, a.held) == (c("3"), c("3"))  # the member's own row counts it against its caps
    await ledger.settle(team, held.id, c("1.25"), UsageRecord(model="m", prompt_tokens=5))
    t, a = await ledger.require_account(team), await ledger.require_account(alice)
    assert (t.balance, t.held, t.month_spend) == (c("8.75"), 0, c("1.25"))
    assert (a.balance, a.held, a.month_spend, a.day_spend) == (0, 0, c("1.25"), c("1.25"))
    row = await ledger.pool.fetchrow(
        "SELECT subject_id, member_id, amount FROM credits.credit_transactions WHERE hold_id = $1", held.id
    )
    assert (row["subject_id"], row["member_id"], row["amount"]) == (team, alice, -c("1.25"))
    event = await ledger.pool.fetchrow(
        "SELECT subject_id, payer_id, charged FROM credits.usage_events WHERE request_id = $1", str(held.id)
    )
    assert (event["subject_id"], event["payer_id"], event["charged"]) == (alice, team, c("1.25"))
    assert not await ledger.discrepancies()


async def test_the_402_names_the_limit(ledger: Ledger) -> None:
    team, (alice, bob) = await team_with_members(ledger, "10")
    await ledger.pool.execute(
        "UPDATE credits.credit_accounts SET monthly_cap = $2, daily_cap = $3, request_cap = $4 "
        "WHERE subject_id = $1",
        alice,
        c("5"),
        c("4"),
        c("3"),
    )
    with pytest.raises(MemberCapExceeded) as err:
        await hold(ledger, alice, "3.5")
    assert err.value.details["limit"] == "per_request"
    await hold(ledger, alice, "3")
    with pytest.raises(MemberCapExceeded) as err:
        await hold(ledger, alice, "1.5")  # 3 held: the daily cap of 4 leaves 1
    assert err.value.details["limit"] == "daily"
    assert err.value.room == c("1")
    # the other member is unaffected; the team's balance is what stops it
    await hold(ledger, bob, "7")
    with pytest.raises(TeamInsufficientCredits) as team_err:
        await hold(ledger, bob, "0.5")
    assert team_err.value.details["team_id"] == team
    # a cap on the team binds every member
    await ledger.pool.execute(
        "UPDATE credits.credit_accounts SET monthly_cap = $2 WHERE subject_id = $1", team, c("10")
    )
    await ledger.credit(team, c("100"))
    with pytest.raises(TeamCapExceeded) as cap_err:
        await hold(ledger, bob, "1")
    assert cap_err.value.details["limit"] == "monthly"


async def test_a_402_reports_the_figures_it_was_refused_on(ledger: Ledger, monkeypatch: Any) -> None:
    """Another request's hold may end between the refusal and any later read: the 402 reports
    the limits as the hold statement saw them, under its lock."""
    team, (alice, _) = await team_with_members(ledger, "10", daily_cap=c("4"))
    first = await hold(ledger, alice, "3")
    solo = "solo-" + secrets.token_hex(5)
    await ledger.create_account(solo, tier="free")
    await ledger.credit(solo, c("10"))
    other = await hold(ledger, solo, "9")
    read = ledger.get_account

    async def released_meanwhile(subject_id: str) -> Any:
        account = await read(subject_id)
        return dataclasses.replace(account, held=0) if account is not None else None

    monkeypatch.setattr(ledger, "get_account", released_meanwhile)
    with pytest.raises(InsufficientCredits) as err:
        await hold(ledger, solo, "2")
    assert (err.value.details["held"], err.value.details["available"]) == ("9.000000", "1.000000")
    assert "1.000000 available" in str(err.value)
    with pytest.raises(MemberCapExceeded) as cap:
        await hold(ledger, alice, "2")  # 3 held: the daily cap of 4 leaves 1
    assert err.value.room == c("1") and cap.value.room == c("1")
    assert cap.value.details["cap_held"] == "3.000000"
    pool, (carol, dave) = await team_with_members(ledger, "10")
    await hold(ledger, carol, "8")
    with pytest.raises(TeamInsufficientCredits) as team_err:
        await hold(ledger, dave, "3")
    assert (team_err.value.details["team_id"], team_err.value.details["available"]) == (pool, "2.000000")
    monkeypatch.undo()
    await ledger.void(team, first.id)
    await ledger.void(solo, other.id)
    assert (await ledger.require_account(solo)).held == 0


async def test_a_members_hold_is_clamped_to_its_tightest_limit(ledger: Ledger) -> None:
    _, (alice, _) = await team_with_members(ledger, "100", request_cap=c("2"))
    held = await hold(ledger, alice, "50", minimum="1")
    assert (held.amount, held.quoted, held.clamped) == (c("2"), c("50"), True)
    with pytest.raises(MemberCapExceeded):
        await hold(ledger, alice, "50", minimum="3")


async def test_caps_bind_accounts_outside_teams_too(ledger: Ledger, account: Any) -> None:
    solo = await account("10")
    await ledger.pool.execute(
        "UPDATE credits.credit_accounts SET daily_cap = $2, request_cap = $3 WHERE subject_id = $1",
        solo,
        c("2"),
        c("1.5"),
    )
    with pytest.raises(RequestCapExceeded):
        await hold(ledger, solo, "1.6")
    await hold(ledger, solo, "1.5")
    with pytest.raises(DailyCapExceeded):
        await hold(ledger, solo, "1")
    with pytest.raises(InsufficientCredits):
        await hold(ledger, solo, "20")


async def test_a_disabled_team_stops_its_members(ledger: Ledger) -> None:
    team, (alice, _) = await team_with_members(ledger, "10")
    await ledger.pool.execute(
        "UPDATE credits.credit_accounts SET status = 'disabled' WHERE subject_id = $1", team
    )
    with pytest.raises(AccountDisabled, match="team"):
        await hold(ledger, alice, "1")


async def test_teams_have_two_levels(ledger: Ledger) -> None:
    team, (alice, _) = await team_with_members(ledger, "0")
    with pytest.raises(TeamHierarchy):
        await ledger.create_account(alice + "-sub", tier="free", parent_id=alice)
    other, _ = await team_with_members(ledger, "0", members=0)
    with pytest.raises(Exception) as err:  # the database's own rule, whoever writes
        await ledger.pool.execute(
            "UPDATE credits.credit_accounts SET parent_id = $2 WHERE subject_id = $1", team, other
        )
    assert getattr(err.value, "sqlstate", None) == "CR002"


async def test_credits_go_to_the_team(ledger: Ledger) -> None:
    team, (alice, _) = await team_with_members(ledger, "0")
    with pytest.raises(AccountIsMember) as err:
        await ledger.credit(alice, c("5"))
    assert err.value.details["team_id"] == team
    with pytest.raises(AccountIsMember):
        await ledger.credit_many({alice: c("1"), team: c("1")})
    assert (await ledger.require_account(team)).balance == 0  # all or nothing


async def test_twenty_members_never_spend_more_than_the_team_holds(ledger: Ledger) -> None:
    """A team with credits for 50 holds, 20 members asking for 5 each at once: exactly 50."""
    team, members = await team_with_members(ledger, "50", members=20)

    async def ask(member: str) -> bool:
        try:
            await hold(ledger, member, "1")
            return True
        except TeamInsufficientCredits:
            return False

    results = await asyncio.gather(*(ask(m) for m in members for _ in range(5)))
    assert sum(results) == 50
    t = await ledger.require_account(team)
    assert (t.balance, t.held) == (c("50"), c("50"))
    assert not await ledger.discrepancies()


# --- the hook, with LiteLLM virtual keys that carry a team and a user ---------------------------

CONFIG = {
    "subject": "team_member",
    "credits_per_usd": 1000,
    "default_max_output_tokens": 100,
    "models": {"house": {"input_cost_per_token": "0.000001", "output_cost_per_token": "0.000002"}},
}


@pytest.fixture(scope="module")
async def handler(settings: Settings) -> Any:
    rt = Runtime(settings.model_copy(update={"credits": CreditsConfig.model_validate(CONFIG)}))
    yield CreditsHandler(rt, deployments=lambda group: [])
    await rt.close()


def key(user_id: str | None, team_id: str | None) -> Any:
    return SimpleNamespace(
        user_id=user_id, team_id=team_id, end_user_id=None, token="h", user_role="internal_user"
    )


def request() -> dict[str, Any]:
    return {"model": "house", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


async def test_a_virtual_keys_user_becomes_a_member_of_its_team(handler: CreditsHandler) -> None:
    ledger: Ledger = await handler.runtime.ledger()
    team, user = "vteam-" + secrets.token_hex(4), "vuser-" + secrets.token_hex(4)
    with pytest.raises(ProxyException) as err:  # both opened on first use; the team has nothing
        await handler.async_pre_call_hook(key(user, team), None, request(), "acompletion")
    assert err.value.type == "team_insufficient_credits"
    assert (await ledger.require_account(user)).parent_id == team
    await ledger.credit(team, c("1"))
    await handler.async_pre_call_hook(key(user, team), None, request(), "acompletion")
    assert (await ledger.require_account(team)).held > 0
    # a key of another team for the same user is refused, and holds nothing
    other = "vteam-" + secrets.token_hex(4)
    await ledger.create_account(other, tier="free", subject_type="team")
    await ledger.credit(other, c("1"))
    with pytest.raises(ProxyException) as err:
        await handler.async_pre_call_hook(key(user, other), None, request(), "acompletion")
    assert (err.value.code, err.value.type) == ("403", "team_mismatch")
    assert (await ledger.require_account(other)).held == 0
    # the team's own key (no user) spends as the team itself
    data = await handler.async_pre_call_hook(key(None, team), None, request(), "acompletion")
    claim = handler._claim(data)
    assert claim is not None and claim.subject_id == team and claim.account_id == team


# --- the API and the proxy -----------------------------------------------------------------------


def make_team(
    proxy: Proxy, balance: str, members: int, tier: str | None = None, **caps: str
) -> tuple[str, str, list[tuple[str, str]]]:
    """A team (id, key) with a balance and members (id, key) created under it by the admin."""
    team, team_key = proxy.create_account(balance, tier=tier)
    made = []
    with proxy.admin() as admin:
        for i in range(members):
            member = f"{team}-m{i}"
            r = admin.post(
                "/api/v1/admin/credits/accounts", json={"user_id": member, "parent_id": team, **caps}
            )
            assert r.status_code == 201, r.text
            assert r.json()["parent_id"] == team
            made.append((member, r.json()["api_key"]))
    return team, team_key, made


def test_admin_routes_for_teams(proxy: Proxy) -> None:
    team, _, [(alice, _)] = make_team(proxy, "10", 1)
    with proxy.admin() as admin:
        r = admin.post("/api/v1/admin/credits/allocate", json={"user_id": alice, "amount": "5"})
        assert r.status_code == 409 and r.json()["error"]["type"] == "account_is_member"
        # a member cannot have members
        r = admin.post("/api/v1/admin/credits/accounts", json={"user_id": alice + "-x", "parent_id": alice})
        assert r.status_code == 409 and r.json()["error"]["type"] == "team_hierarchy"
        r = admin.post(
            "/api/v1/admin/credits/accounts", json={"user_id": "x-" + alice, "parent_id": "no-such"}
        )
        assert r.status_code == 404 and r.json()["error"]["param"] == "parent_id"
        # move out, and back in with caps
        r = admin.patch(f"/api/v1/admin/credits/accounts/{alice}", json={"parent_id": None})
        assert r.status_code == 200 and r.json()["parent_id"] is None
        r = admin.patch(
            f"/api/v1/admin/credits/accounts/{alice}",
            json={"parent_id": team, "daily_cap": "2", "request_cap": "0.5"},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["parent_id"], body["daily_cap"], body["request_cap"]) == (team, "2.000000", "0.500000")
        r = admin.patch(f"/api/v1/admin/credits/accounts/{team}", json={"parent_id": alice})
        assert r.status_code == 409 and r.json()["error"]["type"] == "team_hierarchy"


async def test_the_teams_admin_sees_and_caps_its_members(proxy: Proxy, ledger: Ledger) -> None:
    team, team_key, [(alice, alice_key), (bob, bob_key)] = make_team(proxy, "10", 2)
    for key_, content in ((alice_key, "usage=100,200"), (bob_key, "usage=10,20")):
        with openai.OpenAI(base_url=proxy.url + "/v1", api_key=key_, max_retries=0) as oa:
            oa.chat.completions.create(model="fake-custom", messages=chat(content), max_tokens=300)
    await settled(ledger, team, 2)
    import httpx

    with httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {team_key}"}) as lead:
        r = lead.get("/api/v1/credits/team/members")
        assert r.status_code == 200
        assert [m["user_id"] for m in r.json()["items"]] == sorted([alice, bob])
        by_member = lead.get("/api/v1/credits/usage/by-member").json()["items"]
        assert {m["member"]: m["prompt_tokens"] for m in by_member} == {alice: 100, bob: 10}
        totals = lead.get("/api/v1/credits/usage/stats").json()
        assert totals["requests"] == 2  # the team's view holds its members' usage
        rows = lead.get("/api/v1/credits/transactions", params={"member_id": alice, "type": "usage"}).json()
        assert [t["member_id"] for t in rows["items"]] == [alice]
        r = lead.patch(f"/api/v1/credits/team/members/{alice}", json={"monthly_cap": "0.5"})
        assert r.status_code == 200 and r.json()["monthly_cap"] == "0.500000"
        r = lead.patch(f"/api/v1/credits/team/members/{team}", json={"monthly_cap": "1"})
        assert r.status_code == 404  # not its member
    with httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {alice_key}"}) as member:
        seen = member.get("/api/v1/credits/balance").json()
        assert (seen["held"], seen["month_spend"]) == ("0.000000", "0.770000")  # 100 in, 200 out
        mine = member.get("/api/v1/credits/usage/stats").json()
        assert (mine["requests"], mine["prompt_tokens"]) == (1, 100)
        balance = member.get("/api/v1/credits/balance").json()
        assert (balance["parent_id"], balance["monthly_cap"]) == (team, "0.500000")
        r = member.post("/api/v1/credits/monthly-cap", json={"monthly_cap": None})
        assert r.status_code == 403  # a member's caps are its team's
        r = member.get("/api/v1/credits/team/members")
        assert r.json()["items"] == []  # a member has no members
        r = member.patch(f"/api/v1/credits/team/members/{bob}", json={"monthly_cap": "100"})
        assert r.status_code == 404


async def test_twenty_members_at_once_through_the_proxy(proxy: Proxy, ledger: Ledger) -> None:
    """Credits for 50 requests, 20 members sending 5 each at once: at most 50 succeed; a member
    at its cap gets member_cap_exceeded while the others go on. (The team refuses what does not
    fit whole, so the count of requests is the test.)"""
    per_request = 3.3  # fake-custom, 1000 output tokens: 3.3 credits held (prompt aside)
    team, _, members = make_team(proxy, str(round(50 * per_request + 0.2, 6)), 20, tier="strict")
    capped, capped_key = members[0]
    with proxy.admin() as admin:
        r = admin.patch(f"/api/v1/admin/credits/accounts/{capped}", json={"monthly_cap": "5"})
        assert r.status_code == 200
    # the capped member spends 3.3 of its 5 first: it is at its cap for requests of 3.3
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key=capped_key, max_retries=0) as oa:
        oa.chat.completions.create(model="fake-custom", messages=chat("usage=1,1000"), max_tokens=1000)
    await settled(ledger, team, 1)
    outcomes: Counter[str] = Counter()
    by_member: Counter[str] = Counter()

    async def one(member: str, key_: str) -> None:
        async with openai.AsyncOpenAI(
            base_url=proxy.url + "/v1", api_key=key_, max_retries=0, timeout=120
        ) as oa:
            try:
                await oa.chat.completions.create(
                    model="fake-custom", messages=chat("usage=1,1000"), max_tokens=1000
                )
                outcomes["ok"] += 1
                by_member[member] += 1
            except openai.APIStatusError as err:
                assert err.status_code == 402, err.body
                outcomes[err.body["type"]] += 1  # type: ignore[index]

    await asyncio.gather(*(one(m, k) for m, k in members for _ in range(5)))
    assert outcomes["ok"] <= 49  # 50 requests' worth, one spent before
    assert outcomes["ok"] >= 45  # and the team's credits were used: the others went on
    assert outcomes["member_cap_exceeded"] == 5  # every request of the capped member
    assert by_member[capped] == 0
    assert sum(outcomes.values()) == 100
    await settled(ledger, team, outcomes["ok"] + 1)
    t = await ledger.require_account(team)
    assert t.held == 0 and t.balance >= 0
    assert not await ledger.discrepancies()


async def test_a_key_used_before_is_answered_before_the_account_is_a_member(ledger: Ledger) -> None:
    """Regression (found by the ledger's property test): a credit key replayed with another
    request on a member was answered account_is_member, not idempotency_conflict; and a key used
    while the account stood alone must still replay after it joined a team."""
    team, (alice, _) = await team_with_members(ledger, "0")
    adjustment = await ledger.credit(alice, c("1"), type="adjustment", idempotency_key="adj-1")
    with pytest.raises(IdempotencyConflict):
        await ledger.credit(alice, c("1"), type="allocation", idempotency_key="adj-1")
    assert await ledger.credit(alice, c("1"), type="adjustment", idempotency_key="adj-1") == adjustment
    solo = "solo-" + secrets.token_hex(4)
    await ledger.create_account(solo, tier="free")
    first = await ledger.credit(solo, c("2"), idempotency_key="grant-1")
    await ledger.pool.execute(
        "UPDATE credits.credit_accounts SET parent_id = $2 WHERE subject_id = $1", solo, team
    )
    assert await ledger.credit(solo, c("2"), idempotency_key="grant-1") == first
    with pytest.raises(AccountIsMember):
        await ledger.credit(solo, c("2"), idempotency_key="grant-2")


async def test_a_members_cached_account_sees_its_hold_end(runtime: Runtime) -> None:
    """Found in review: a settlement announced only the team's change, so a member's cached
    account (its balance route) kept showing the hold and the old spend."""
    ledger = await runtime.ledger()
    team, (alice, _) = await team_with_members(ledger, "10")
    before = await runtime.account(alice)  # cached now
    assert before is not None and before.held == 0
    held = await hold(ledger, alice, "2")
    await runtime.cache.drain()  # holds and settlements invalidate in the background
    during = await runtime.account(alice)
    assert during is not None and during.held == c("2")
    await ledger.settle(team, held.id, c("0.5"), UsageRecord(model="m"))
    await runtime.cache.drain()
    after = await runtime.account(alice)
    assert after is not None and (after.held, after.month_spend) == (0, c("0.5"))
