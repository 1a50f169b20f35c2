"""The money counters count what the ledger committed, once: every credit (allocations, bulk grants,
coupons and their bonuses, paid top-ups, refunds) and every charge (settlements, the sweeper's
captures, the external charges route), never a replay, never a write that did not commit.

On a database of this module's own, so that the sweeper here resolves only this module's holds
and the exact deltas below are this module's doing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, cast

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from litellm.proxy.auth.user_api_key_auth import user_api_key_auth
from prometheus_client.parser import text_string_to_metric_families

from litellm_credits import metrics
from litellm_credits.api import build_router
from litellm_credits.bulk_credits import BulkItem
from litellm_credits.claims import HoldClaim
from litellm_credits.coupons import Coupons
from litellm_credits.errors import CouponAlreadyRedeemed, ServiceUnavailable
from litellm_credits.ledger import Ledger, UsageRecord
from litellm_credits.ledger_sql import SQL_HOLD
from litellm_credits.metrics import OTHER, LabelBounds
from litellm_credits.money import parse_credits as c
from litellm_credits.pricing import ModelPrice
from litellm_credits.runtime import Runtime
from litellm_credits.settings import Settings
from litellm_credits.settlement import Settler
from litellm_credits.topups import Pricing, Topups
from litellm_credits.topups_sql import SQL_NEW, SQL_SESSION

CREDITED = "litellm_credits_credited_microcredits_total"
CHARGED = "litellm_credits_charged_microcredits_total"
EXPIRIES = "litellm_credits_expiries_total"
HOLDS_TAKEN = "litellm_credits_holds_taken_total"
SETTLEMENTS = "litellm_credits_settlements_total"
USAGE = UsageRecord(model="fake-gpt", prompt_tokens=10, completion_tokens=5)


def sample(name: str, **labels: str) -> int:
    """A counter's value in this process (every worker's in multiprocess mode: there is one here),
    summed over the labels not given."""
    text = metrics.render()[0].decode()
    return int(
        sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )
    )


class Delta:
    """How much a counter (summed over the labels not given) moved since this was made."""

    def __init__(self, name: str, **labels: str) -> None:
        self.name, self.labels = name, labels
        self.start = sample(name, **labels)

    def __call__(self) -> int:
        return sample(self.name, **self.labels) - self.start


@pytest.fixture(scope="module")
async def rt(settings: Settings, fresh_database: Callable[[], str]) -> AsyncIterator[Runtime]:
    runtime = Runtime(settings.model_copy(update={"database_url": fresh_database()}))
    await runtime.ledger()
    yield runtime
    await runtime.close()


@pytest.fixture
async def ledger(rt: Runtime) -> Ledger:
    return await rt.ledger()


async def new_account(ledger: Ledger, balance: str = "0", *, tier: str = "free", **more: Any) -> str:
    subject = "acct-" + secrets.token_hex(6)
    await ledger.create_account(subject, tier=tier, **more)
    if c(balance):
        await ledger.credit(subject, c(balance), description="opening balance")
    return subject


# -- credits -----------------------------------------------------------------------------------


async def test_an_allocation_counts_once_and_its_replay_not(ledger: Ledger) -> None:
    subject = await new_account(ledger)
    allocated = Delta(CREDITED, type="allocation")
    first = await ledger.credit(subject, c("3"), idempotency_key="alloc-1")
    assert allocated() == c("3")
    again = await ledger.credit(subject, c("3"), idempotency_key="alloc-1")
    assert again.id == first.id
    assert allocated() == c("3")
    adjusted = Delta(CREDITED, type="adjustment")  # (other tests in this process add some)
    await ledger.credit(subject, c("-1"), type="adjustment")  # a debit adds no credits
    assert adjusted() == 0


async def test_a_bulk_grant_counts_once_and_its_replay_not(ledger: Ledger) -> None:
    a, b = await new_account(ledger), await new_account(ledger)
    allocated = Delta(CREDITED, type="allocation")
    key = "bulk-" + secrets.token_hex(4)
    first = await ledger.credit_many({a: c("1"), b: c("2.5")}, idempotency_key=key)
    assert allocated() == c("3.5")
    again = await ledger.credit_many({a: c("1"), b: c("2.5")}, idempotency_key=key)
    assert [t.id for t in again] == [t.id for t in first]
    assert allocated() == c("3.5")  # the replay returned the first run's rows: nothing new
    await ledger.credit_many({a: c("1")})  # without a key: always new
    assert allocated() == c("4.5")
    assert [(await ledger.require_account(s)).balance for s in (a, b)] == [c("2"), c("2.5")]


async def test_a_fixed_coupon_counts_its_credit_once(ledger: Ledger) -> None:
    coupons = Coupons(ledger.pool)
    code = "F" + secrets.token_hex(5).upper()
    await coupons.create(code, "fixed", Decimal("2.5"))
    subject = await new_account(ledger, "1")
    coupon = Delta(CREDITED, type="coupon")
    assert (await coupons.redeem(subject, code)).credited == c("2.5")
    assert coupon() == c("2.5")
    with pytest.raises(CouponAlreadyRedeemed):
        await coupons.redeem(subject, code)
    assert coupon() == c("2.5")


async def test_a_percent_coupon_counts_its_bonus_when_an_allocation_pays_it(ledger: Ledger) -> None:
    coupons = Coupons(ledger.pool)
    code = "P" + secrets.token_hex(5).upper()
    await coupons.create(code, "percent", Decimal(20))
    one, bulk = await new_account(ledger), await new_account(ledger)
    coupon, allocated = Delta(CREDITED, type="coupon"), Delta(CREDITED, type="allocation")
    assert (await coupons.redeem(one, code)).credited == 0
    await coupons.redeem(bulk, code)
    assert coupon() == 0  # a percent coupon pays nothing yet
    await ledger.credit(one, c("10.000003"))  # 20 % = 2.0000006, rounded down
    assert (allocated(), coupon()) == (c("10.000003"), c("2"))
    await ledger.credit(one, c("10"))  # the bonus pays once
    assert (allocated(), coupon()) == (c("20.000003"), c("2"))
    await ledger.credit_each({bulk: BulkItem(c("5"))})
    assert (allocated(), coupon()) == (c("25.000003"), c("3"))  # and beside a bulk grant
    assert (await ledger.require_account(bulk)).balance == c("6")


WEBHOOK_SECRET = "whsec_metrics_" + secrets.token_hex(8)
PRICING = Pricing(
    currency="usd", credits_per_unit=Decimal(1), minor_units=100, min_amount=c("5"), max_amount=c("10000")
)


def signed(kind: str, obj: dict[str, Any]) -> tuple[bytes, str]:
    """A Stripe event and its Stripe-Signature (t=<time>,v1=<HMAC-SHA256 of "<t>.<body>">)."""
    body = json.dumps({"id": "evt_" + uuid.uuid4().hex, "type": kind, "data": {"object": obj}}).encode()
    t = int(time.time())
    mac = hmac.new(WEBHOOK_SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return body, f"t={t},v1={mac}"


async def test_a_paid_topup_counts_once(ledger: Ledger) -> None:
    topups = Topups(
        ledger.pool,
        PRICING,
        api_key=None,  # the Checkout Session is recorded below: Stripe is never called
        webhook_secret=WEBHOOK_SECRET,
        success_url="http://127.0.0.1/done",
        cancel_url="http://127.0.0.1/cancelled",
    )
    subject = await new_account(ledger)
    topup_id = await ledger.pool.fetchval(SQL_NEW, subject, c("20"), "usd", 2000)
    session = "cs_test_" + secrets.token_hex(8)
    await ledger.pool.execute(SQL_SESSION, topup_id, session)
    topped = Delta(CREDITED, type="topup")
    paid = signed("checkout.session.completed", {"id": session, "payment_status": "paid"})
    assert (await topups.handle(*paid)).outcome == "credited"
    assert topped() == c("20")
    assert (await topups.handle(*paid)).duplicate  # the same event again
    late = signed("checkout.session.async_payment_succeeded", {"id": session})
    assert (await topups.handle(*late)).outcome == "credited before"
    assert topped() == c("20")
    assert (await ledger.require_account(subject)).balance == c("20")


async def _usage_row(ledger: Ledger, subject: str, amount: int) -> int:
    hold = await ledger.hold(subject, amount, ttl_seconds=60)
    settled = await ledger.settle(subject, hold.id, amount, USAGE)
    assert settled is not None and settled.transaction_id is not None
    return settled.transaction_id


async def test_a_refund_counts_once_committed(ledger: Ledger) -> None:
    subject = await new_account(ledger, "10")
    usage_id = await _usage_row(ledger, subject, c("4"))
    refunded = Delta(CREDITED, type="refund")
    await ledger.refund(subject, usage_id, c("1.5"), idempotency_key="refund-1")
    assert refunded() == c("1.5")
    await ledger.refund(subject, usage_id, c("1.5"), idempotency_key="refund-1")  # a replay
    assert refunded() == c("1.5")
    # a refund whose commit fails credited nothing: it must not be counted
    await ledger.pool.execute(
        """
        CREATE OR REPLACE FUNCTION public.fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.description = 'fails at commit' THEN RAISE EXCEPTION 'refused at commit'; END IF;
            RETURN NULL;
        END $$;
        DROP TRIGGER IF EXISTS fail_at_commit ON credits.credit_transactions;
        CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON credits.credit_transactions
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.fail_at_commit();
        """
    )
    try:
        with pytest.raises(asyncpg.RaiseError, match="refused at commit"):
            await ledger.refund(subject, usage_id, c("1"), description="fails at commit")
    finally:
        await ledger.pool.execute("DROP TRIGGER fail_at_commit ON credits.credit_transactions")
    assert refunded() == c("1.5")
    assert (await ledger.require_account(subject)).balance == c("7.5")


# -- holds, expiries and charges ----------------------------------------------------------------


async def test_the_sweepers_captures_count_as_charged(ledger: Ledger) -> None:
    labelled = Ledger(ledger.pool, labels=LabelBounds(["free"], lambda: ["fake-gpt"]))
    free = await new_account(ledger, "10")
    pro = await new_account(ledger, "10", tier="pro")  # a tier the bounds above do not list
    await labelled.hold(free, c("4"), ttl_seconds=1, model="fake-gpt")
    await labelled.hold(pro, c("1"), ttl_seconds=1, model="made-up")
    live = await labelled.hold(free, c("2"), ttl_seconds=600, model="fake-gpt")
    expired = Delta(EXPIRIES, policy="capture")
    charged = Delta(CHARGED)
    known = Delta(CHARGED, tier="free", model_group="fake-gpt", service=OTHER)
    unknown = Delta(CHARGED, tier=OTHER, model_group=OTHER, service=OTHER)
    await asyncio.sleep(1.1)  # (the database's clock decides)
    assert await labelled.expire(policy="capture") == 2
    assert (expired(), known(), unknown(), charged()) == (2, c("4"), c("1"), c("5"))
    assert await labelled.expire(policy="capture") == 0
    assert (expired(), charged()) == (2, c("5"))
    assert [(await ledger.require_account(s)).balance for s in (free, pro)] == [c("6"), c("9")]
    await labelled.void(free, live.id)


async def test_void_expiries_count_each_hold_resolved_even_when_a_later_one_fails(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweeper = Ledger(ledger.pool)
    subject = await new_account(ledger, "10")
    for _ in range(2):
        await sweeper.hold(subject, c("1"), ttl_seconds=1)
    expired, charged = Delta(EXPIRIES, policy="void"), Delta(CHARGED)
    await asyncio.sleep(1.1)
    resolve = sweeper._resolve
    calls = 0

    async def second_fails(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ServiceUnavailable("the credit ledger is unavailable; try again")
        return await resolve(*args)

    monkeypatch.setattr(sweeper, "_resolve", second_fails)
    with pytest.raises(ServiceUnavailable):
        await sweeper.expire(policy="void")
    assert expired() == 1  # the first hold was released, and is counted
    monkeypatch.undo()
    assert await sweeper.expire(policy="void") == 1
    assert (expired(), charged()) == (2, 0)  # a released hold charges nothing
    assert (await ledger.require_account(subject)).held == 0


class LosesFirstHoldReply:
    """A pool whose first hold commits and then loses its reply (the connection drops)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.lost = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        row = await self.pool.fetchrow(sql, *args)
        if sql == SQL_HOLD and not self.lost:
            self.lost = True
            raise ConnectionResetError("the reply was lost")
        return row


async def test_a_new_hold_whose_reply_was_lost_counts_as_taken_once(ledger: Ledger) -> None:
    subject = await new_account(ledger, "10")
    lossy = Ledger(cast(asyncpg.Pool, LosesFirstHoldReply(ledger.pool)), retry_delay=0)
    taken = Delta(HOLDS_TAKEN, kind="full")
    hold = await lossy.hold(subject, c("1"), ttl_seconds=60)
    assert taken() == 1  # the retry found the hold its first attempt took
    assert (await ledger.require_account(subject)).held == c("1")
    # a caller's own id seen again is another request's hold (a client's retry): not taken again
    keyed = await ledger.hold(subject, c("1"), ttl_seconds=60, hold_id=uuid.uuid4())
    again = await ledger.hold(subject, c("1"), ttl_seconds=60, hold_id=keyed.id)
    assert again.replayed and taken() == 2
    for h in (hold, keyed):
        await ledger.void(subject, h.id)


async def test_a_settlement_survives_a_failing_metric(
    rt: Runtime, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    subject = await new_account(ledger, "10")
    hold = await ledger.hold(subject, c("1"), ttl_seconds=60, model="made-up")
    price = ModelPrice(
        input_cost_per_token=Decimal("0.000001"), output_cost_per_token=Decimal("0.000002"), source="test"
    )
    settler = Settler(rt, lambda group: price)
    counted: list[int] = []

    async def count_tokens(claim: HoldClaim, usage: Any) -> None:
        counted.append(usage.prompt_tokens + usage.completion_tokens)

    class Broken:
        def labels(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("a metric failed")

    monkeypatch.setattr(settler, "_count_tokens", count_tokens)
    monkeypatch.setattr(metrics, "CHARGED", Broken())
    claim = HoldClaim(hold.id, subject, Decimal(1000), "balanced", "chat", tier="free", held=hold.amount)
    response = {"usage": {"prompt_tokens": 100, "completion_tokens": 50}}
    await settler.settle(claim, {"model": "made-up"}, response, start=None, end=None, model_group="made-up")
    assert counted == [150]  # the tokens were still counted against the tier's rate
    status = await ledger.pool.fetchval("SELECT status FROM credits.holds WHERE id = $1", hold.id)
    assert status == "settled"


PRICE = ModelPrice(
    input_cost_per_token=Decimal("0.000001"), output_cost_per_token=Decimal("0.000002"), source="test"
)
RESPONSE = {"usage": {"prompt_tokens": 100, "completion_tokens": 50}}
COST = 100 * 1000 + 50 * 2000  # micro-credits: RESPONSE's tokens at PRICE, 1000 credits a dollar


async def settler_with_flaky_ledger(
    rt: Runtime, ledger: Ledger, monkeypatch: pytest.MonkeyPatch, *, commit_first: bool
) -> tuple[Settler, list[Any]]:
    """A Settler whose ledger fails its first resolution: after committing it (the reply lost),
    or before sending it. The list collects the resolutions that reached the ledger."""
    settler = Settler(rt, lambda group: PRICE)

    async def count_tokens(claim: HoldClaim, usage: Any) -> None:
        pass

    monkeypatch.setattr(settler, "_count_tokens", count_tokens)
    resolve, calls = ledger.resolve, []

    async def flaky(item: Any) -> Any:
        first = not calls
        calls.append(item.hold_id)
        if first and not commit_first:
            raise ServiceUnavailable("the credit ledger is unavailable; try again")
        out = await resolve(item)
        if first:
            raise ServiceUnavailable("the credit ledger is unavailable; try again")
        return out

    monkeypatch.setattr(ledger, "resolve", flaky)
    return settler, calls


@pytest.fixture(params=["account", "team member"])
async def held(request: pytest.FixtureRequest, ledger: Ledger) -> HoldClaim:
    """A hold of 1 credit for model "made-up", as the pre-call hook's claim: on an account of its
    own, or a team member's (held and settled on the team; its usage event is the member's)."""
    if request.param == "account":
        requester = await new_account(ledger, "10")
    else:
        team = await new_account(ledger, "10", subject_type="team")
        requester = await new_account(ledger, parent_id=team)
    hold = await ledger.hold(requester, c("1"), ttl_seconds=60, model="made-up")
    return HoldClaim(
        hold.id, hold.subject_id, Decimal(1000), "balanced", "chat", tier="free", held=hold.amount
    )


async def settle_event(settler: Settler, claim: HoldClaim) -> None:
    """A success event's settlement, as the hooks make it (retried in the background while the
    ledger is unavailable)."""
    await settler.settle_or_retry(
        claim, {"model": "made-up"}, RESPONSE, start=None, end=None, model_group="made-up"
    )


async def test_a_settlement_retried_later_after_a_lost_reply_counts_once(
    rt: Runtime, ledger: Ledger, monkeypatch: pytest.MonkeyPatch, held: HoldClaim
) -> None:
    """The proxy's settlement committed but its reply was lost (the ledger then unreachable for
    all its own retries): the Settler's retry later finds the hold settled by that settlement,
    and counts it and its charge once. (It counted nothing: the retry read "already resolved".)
    A duplicate of the success event (another settlement of the hold) counts nothing. (A review
    found the first version of the check missed a team member's settlement: its usage event is
    the member's.)"""
    claim = held
    settler, calls = await settler_with_flaky_ledger(rt, ledger, monkeypatch, commit_first=True)
    settled, charged = Delta(SETTLEMENTS), Delta(CHARGED, tier="free")
    await settle_event(settler, claim)
    assert (settled(), charged(), len(settler._pending)) == (0, 0, 1)  # committed, not known to be
    await asyncio.wait_for(asyncio.gather(*settler._pending), 10)
    assert (settled(), charged()) == (1, COST)
    await settle_event(settler, claim)  # a duplicate event: "already resolved", not counted
    assert (settled(), charged(), len(calls)) == (1, COST, 3)
    row = await ledger.pool.fetchrow(
        "SELECT status, settled_amount FROM credits.holds WHERE subject_id = $1 AND id = $2",
        claim.subject_id,
        claim.hold_id,
    )
    assert (row["status"], row["settled_amount"]) == ("settled", COST)


async def test_a_retry_later_does_not_count_what_a_duplicate_event_settled(
    rt: Runtime, ledger: Ledger, monkeypatch: pytest.MonkeyPatch, held: HoldClaim
) -> None:
    """The first settlement fails before it reaches the ledger; a duplicate of the success event
    settles the hold (the same charge) and counts it; the first one's retry then finds the hold
    settled by another settlement: not counted again (an outside review found it counted twice)."""
    claim = held
    settler, calls = await settler_with_flaky_ledger(rt, ledger, monkeypatch, commit_first=False)
    settled, charged = Delta(SETTLEMENTS), Delta(CHARGED, tier="free")
    await settle_event(settler, claim)  # fails: retried later (in 0.5 s)
    await settle_event(settler, claim)  # the duplicate event, settled and counted
    assert (settled(), charged(), len(settler._pending)) == (1, COST, 1)
    await asyncio.wait_for(asyncio.gather(*settler._pending), 10)
    assert (settled(), charged(), len(calls)) == (1, COST, 3)


async def test_the_charges_route_counts_what_it_charged(rt: Runtime, ledger: Ledger) -> None:
    app = FastAPI()
    app.include_router(build_router(rt))
    admin = SimpleNamespace(user_role="proxy_admin", user_id=None, team_id=None, metadata={})
    app.dependency_overrides[user_api_key_auth] = lambda: admin
    subject = await new_account(ledger, "10")
    team = "team-" + secrets.token_hex(5)
    await ledger.create_account(team, tier="pro", subject_type="team")
    await ledger.credit(team, c("10"))
    member = await new_account(ledger, parent_id=team)
    unlimited = await new_account(ledger, tier="sponsored")
    free = Delta(CHARGED, tier="free", model_group=OTHER, service="audio_speech")
    pro = Delta(CHARGED, tier="pro", model_group=OTHER, service="other")
    charged, settled = Delta(CHARGED), Delta(SETTLEMENTS)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://credits.test") as client:

        async def deduct(user: str, amount: str, key: str, **more: str) -> dict[str, Any]:
            body = {"user_id": user, "amount": amount, "idempotency_key": key, **more}
            r = await client.post("/api/v1/credits/deduct", json=body)
            assert r.status_code == 200, r.text
            return dict(r.json())

        speech = {"service": "audio_speech", "model": "made-up"}
        assert (await deduct(subject, "1.5", "tts-1", **speech))["replayed"] is False
        assert (free(), settled()) == (c("1.5"), 1)
        assert (await deduct(subject, "1.5", "tts-1", **speech))["replayed"] is True
        assert (free(), settled()) == (c("1.5"), 1)  # a replay charged nothing new
        await deduct(member, "2", "m-1")  # the team pays, under its own tier
        assert pro() == c("2")
        assert (await deduct(unlimited, "3", "u-1"))["charged"] == "0.000000"
        assert (charged(), settled()) == (c("3.5"), 3)  # metered, never debited
