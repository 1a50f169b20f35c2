"""Paid top-ups through Stripe, on a real PostgreSQL, against a fake Stripe in its own process:
a Checkout Session opened at the configured price; Stripe's webhook verified (signature and age)
and handled once per event id; the top-up credited once as a paid grant; refunds and disputes
taken back."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from litellm_credits.errors import AccountIsMember, InvalidRequest
from litellm_credits.grants import Grants
from litellm_credits.history import History, TxFilter
from litellm_credits.ledger import Ledger, UsageRecord
from litellm_credits.money import parse_credits as c
from litellm_credits.topups import InvalidSignature, Pricing, Topups, TopupsNotConfigured
from litellm_credits.webhooks import slack_text

from .conftest import STRIPE_WEBHOOK_SECRET as WEBHOOK_SECRET
from .conftest import AccountFactory, Proxy
from .test_grants import assert_identities

PRICING = Pricing(
    currency="usd", credits_per_unit=Decimal(1), minor_units=100, min_amount=c("5"), max_amount=c("10000")
)


@pytest.fixture
async def topups(ledger: Ledger, fake_stripe: tuple[str, Path]) -> AsyncIterator[Topups]:
    made = Topups(
        ledger.pool,
        PRICING,
        api_key="sk_test_" + uuid.uuid4().hex,
        webhook_secret=WEBHOOK_SECRET,
        api_base=fake_stripe[0],
        success_url="http://127.0.0.1/done",
        cancel_url="http://127.0.0.1/cancelled",
    )
    yield made
    await made.close()


def signed(event: dict[str, Any], *, secret: str = WEBHOOK_SECRET, age: int = 0) -> tuple[bytes, str]:
    """An event as Stripe sends it: the body, and its Stripe-Signature (written from Stripe's docs:
    t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the endpoint's secret>)."""
    body = json.dumps(event).encode()
    t = int(time.time()) - age
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return body, f"t={t},v1={mac}"


def tampered(header: str) -> str:
    """The header with its signature's last hex digit changed (always: never the same digit)."""
    return header[:-1] + ("1" if header.endswith("0") else "0")


def event(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"id": "evt_" + uuid.uuid4().hex, "object": "event", "type": kind, "data": {"object": obj}}


async def balance(ledger: Ledger, subject: str) -> int:
    return (await ledger.require_account(subject)).balance


async def test_checkout_opens_a_session_at_the_configured_price(
    topups: Topups, account: AccountFactory, fake_stripe: tuple[str, Path]
) -> None:
    subject = await account("0")
    created = await topups.checkout(subject, c("12.5"))
    assert created["price"] == {"currency": "usd", "unit_amount": 1250}  # a credit a dollar here
    assert created["checkout_url"].startswith("https://checkout.stripe.test/c/pay/cs_test_")
    asked = [json.loads(line) for line in fake_stripe[1].read_text().splitlines()][-1]["form"]
    assert asked["line_items[0][price_data][unit_amount]"] == "1250"
    assert asked["metadata[user_id]"] == subject and asked["mode"] == "payment"
    assert (await topups.list(subject, limit=10, offset=0))[0]["status"] == "open"
    # an amount that costs a fraction of a cent is rounded up to the cent
    assert (await topups.checkout(subject, c("5.0001")))["price"]["unit_amount"] == 501
    for wrong in (c("4.99"), c("10000.000001")):
        with pytest.raises(InvalidRequest):
            await topups.checkout(subject, wrong)


async def test_a_paid_session_delivered_twice_credits_once(
    topups: Topups, ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("0")
    created = await topups.checkout(subject, c("20"))
    paid = event(
        "checkout.session.completed",
        {
            "id": created["checkout_session_id"],
            "payment_status": "paid",
            "payment_intent": "pi_" + uuid.uuid4().hex,
        },
    )
    first = await topups.handle(*signed(paid))
    again = await topups.handle(*signed(paid))
    assert (first.outcome, first.duplicate, again.duplicate) == ("credited", False, True)
    assert await balance(ledger, subject) == c("20")
    # the same session in another event (Stripe's async success after the completion) credits nothing more
    late = event("checkout.session.async_payment_succeeded", {"id": created["checkout_session_id"]})
    assert (await topups.handle(*signed(late))).outcome == "credited before"
    assert await balance(ledger, subject) == c("20")
    grant = await ledger.pool.fetchrow(
        "SELECT category, source, remaining FROM credits.grants WHERE subject_id = $1", subject
    )
    assert tuple(grant) == ("paid", "topup", c("20"))
    alerts = await ledger.pool.fetch("SELECT type FROM credits.outbox WHERE subject_id = $1", subject)
    assert [a["type"] for a in alerts] == ["topup.succeeded"]
    await assert_identities(ledger, subject)


async def test_an_unpaid_completion_waits_for_the_async_payment(
    topups: Topups, ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("0")
    created = await topups.checkout(subject, c("10"))
    session = {"id": created["checkout_session_id"], "payment_status": "unpaid"}
    assert (
        await topups.handle(*signed(event("checkout.session.completed", session)))
    ).outcome == "awaiting payment"
    assert await balance(ledger, subject) == 0
    failed = event("checkout.session.async_payment_failed", {"id": created["checkout_session_id"]})
    assert (await topups.handle(*signed(failed))).outcome == "failed"
    assert await balance(ledger, subject) == 0
    assert (await topups.list(subject, limit=1, offset=0))[0]["status"] == "failed"


async def test_a_bad_signature_or_an_old_timestamp_is_refused_and_changes_nothing(
    topups: Topups, ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("0")
    created = await topups.checkout(subject, c("10"))
    paid = event(
        "checkout.session.completed", {"id": created["checkout_session_id"], "payment_status": "paid"}
    )
    body, header = signed(paid)
    for attempt in (
        (body, tampered(header)),
        (body, header.replace("v1=", "v1=0")),
        (body + b" ", header),
        signed(paid, secret="whsec_someone_else"),
        signed(paid, age=301),  # a replay of an old delivery
        (body, None),
        (b"\xff\xfe", header),
    ):
        with pytest.raises(InvalidSignature):
            await topups.handle(*attempt)
    assert await balance(ledger, subject) == 0
    seen = await ledger.pool.fetchval(
        "SELECT count(*) FROM credits.stripe_events WHERE event_id = $1", paid["id"]
    )
    assert seen == 0  # a refused event is not recorded: Stripe's genuine retry is still handled
    assert (await topups.handle(body, header)).outcome == "credited"


async def test_a_reversal_takes_back_the_topups_own_credit_first(
    topups: Topups, ledger: Ledger, account: AccountFactory
) -> None:
    """A promotion that expires soon burns before paid credit; a refund of the top-up must not
    take it instead of the refunded credit (turning expiring credit into paid credit)."""
    from datetime import datetime, timedelta, timezone

    from litellm_credits.records import GrantTerms

    subject = await account("0")
    soon = datetime.now(timezone.utc) + timedelta(days=1)
    await ledger.credit(subject, c("100"), description="promo", terms=GrantTerms("promotional", 0, soon))
    created = await topups.checkout(subject, c("100"))
    intent = "pi_" + uuid.uuid4().hex
    paid = {"id": created["checkout_session_id"], "payment_status": "paid", "payment_intent": intent}
    await topups.handle(*signed(event("checkout.session.completed", paid)))
    refund = {"object": "charge", "payment_intent": intent, "amount_refunded": 10000}
    assert (await topups.handle(*signed(event("charge.refunded", refund)))).outcome == "taken back"
    summary = await Grants(ledger.pool).summary(subject)
    assert (summary["promotional"], summary["paid"]) == ("100.000000", "0.000000")
    await assert_identities(ledger, subject)


async def test_refunds_and_disputes_take_the_credits_back(
    topups: Topups, ledger: Ledger, account: AccountFactory
) -> None:
    subject = await account("0")
    created = await topups.checkout(subject, c("10"))  # 1000 cents
    intent = "pi_" + uuid.uuid4().hex
    session = {"id": created["checkout_session_id"], "payment_status": "paid", "payment_intent": intent}
    await topups.handle(*signed(event("checkout.session.completed", session)))
    held = await ledger.hold(subject, c("6"), ttl_seconds=600)
    await ledger.settle(subject, held.id, c("6"), UsageRecord(model="m"))  # 4 left

    # a partial refund (Stripe's running total: 300 cents) takes back 3 credits
    refund = {"object": "charge", "payment_intent": intent, "amount_refunded": 300, "refunded": False}
    assert (await topups.handle(*signed(event("charge.refunded", refund)))).outcome == "taken back"
    assert await balance(ledger, subject) == c("1")
    # a dispute takes back the rest of the top-up: the balance goes below zero
    dispute = {"object": "dispute", "payment_intent": intent, "amount": 1000}
    assert (await topups.handle(*signed(event("charge.dispute.created", dispute)))).outcome == "taken back"
    assert await balance(ledger, subject) == -c("6")
    # the next hold sees it
    with pytest.raises(Exception, match="insufficient"):
        await ledger.hold(subject, c("0.01"), ttl_seconds=600)
    # a later refund event for what was taken back already changes nothing
    refund["amount_refunded"] = 1000
    assert (await topups.handle(*signed(event("charge.refunded", refund)))).outcome == "taken back before"
    assert await balance(ledger, subject) == -c("6")
    kinds = [
        r["type"]
        for r in await ledger.pool.fetch(
            "SELECT type FROM credits.outbox WHERE subject_id = $1 ORDER BY id", subject
        )
    ]
    assert kinds.count("topup.reversed") == 2
    await assert_identities(ledger, subject)


async def test_members_and_unconfigured_proxies_are_refused(
    topups: Topups, ledger: Ledger, account: AccountFactory
) -> None:
    team = await account("0")
    member = "member-" + uuid.uuid4().hex[:8]
    await ledger.create_account(member, tier="free", parent_id=team)
    with pytest.raises(AccountIsMember):
        await topups.checkout(member, c("10"))
    bare = Topups(ledger.pool, PRICING, api_key=None, webhook_secret=None, success_url="x", cancel_url="y")
    with pytest.raises(TopupsNotConfigured):
        await bare.checkout(team, c("10"))
    with pytest.raises(TopupsNotConfigured):
        await bare.handle(b"{}", "t=1,v1=00")


async def test_a_topup_paid_after_its_account_joined_a_team_credits_the_team(
    topups: Topups, ledger: Ledger, account: AccountFactory
) -> None:
    """Regression: the payment was taken and nothing credited (outcome "account is a member", the
    top-up left open). The account spends its team's credits now: the team gets what it paid for,
    and a refund takes it back from the team."""
    alone, team = await account("0"), await account("0")
    created = await topups.checkout(alone, c("10"))
    await ledger.pool.execute(
        "UPDATE credits.credit_accounts SET parent_id = $2 WHERE subject_id = $1", alone, team
    )
    intent = "pi_" + uuid.uuid4().hex
    session = {"id": created["checkout_session_id"], "payment_status": "paid", "payment_intent": intent}
    handled = await topups.handle(*signed(event("checkout.session.completed", session)))
    assert (handled.outcome, handled.subject_id) == ("credited", team)  # (its cache entry is changed)
    assert (await balance(ledger, team), await balance(ledger, alone)) == (c("10"), 0)
    [row] = await topups.list(alone, limit=10, offset=0)  # the member's own top-up, paid
    assert row["status"] == "paid"
    tx = await ledger.pool.fetchrow(
        "SELECT subject_id, type, member_id, metadata FROM credits.credit_transactions WHERE id = $1",
        row["transaction_id"],
    )
    assert (tx["subject_id"], tx["type"], tx["member_id"]) == (team, "topup", alone)
    assert tx["metadata"]["member_id"] == alone
    # the team's history filtered by the member shows it (the member_id column, not only metadata)
    shown, total = await History(ledger.pool).page(team, limit=10, where=TxFilter(member=alone))
    assert ([t.id for t in shown], total) == ([row["transaction_id"]], 1)
    [alert] = await ledger.pool.fetch("SELECT data FROM credits.outbox WHERE subject_id = $1", alone)
    assert (alert["data"]["credited_to"], alert["data"]["balance"]) == (team, "10.000000")
    text = slack_text("topup.succeeded", alert["data"])
    assert text == f"{alone} topped up 10.000000 credits (credited to team {team}).", text

    refund = {"object": "charge", "payment_intent": intent, "amount_refunded": 400}
    assert (await topups.handle(*signed(event("charge.refunded", refund)))).outcome == "taken back"
    assert (await balance(ledger, team), await balance(ledger, alone)) == (c("6"), 0)
    reversed_ = await ledger.pool.fetchval(
        "SELECT data FROM credits.outbox WHERE subject_id = $1 AND type = 'topup.reversed'", alone
    )
    text = slack_text("topup.reversed", reversed_)
    assert (
        text == f"4.000000 credits of {alone}'s top-up were taken back from team {team} (charge.refunded)."
    ), text
    shown, total = await History(ledger.pool).page(team, limit=10, where=TxFilter(member=alone))
    assert ([t.type for t in shown], total) == (["adjustment", "topup"], 2)  # the reversal, the top-up
    await assert_identities(ledger, team)
    await assert_identities(ledger, alone)


def test_topup_routes_through_the_proxy(proxy: Proxy) -> None:
    _, key = proxy.create_account("0")
    with httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as me:
        r = me.post("/api/v1/credits/topups", json={"amount": "1500"})
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["price"] == {"currency": "usd", "unit_amount": 150}  # 1000 credits a dollar
        for bad in ({"amount": "1"}, {"amount": "-5"}, {"amount": "abc"}, {}):
            r = me.post("/api/v1/credits/topups", json=bad)
            assert r.status_code in (400, 422) and r.json()["error"]["type"], (bad, r.text)
        paid = event(
            "checkout.session.completed", {"id": created["checkout_session_id"], "payment_status": "paid"}
        )
        body, header = signed(paid)
        anonymous = httpx.Client(base_url=proxy.url, timeout=30)
        r = anonymous.post(
            "/api/v1/credits/stripe/webhook", content=body, headers={"stripe-signature": tampered(header)}
        )
        assert (r.status_code, r.json()["error"]["type"]) == (400, "invalid_signature"), r.text
        r = anonymous.post(
            "/api/v1/credits/stripe/webhook", content=body, headers={"stripe-signature": header}
        )
        assert r.json() == {"received": True, "duplicate": False, "outcome": "credited"}, r.text
        r = anonymous.post(
            "/api/v1/credits/stripe/webhook", content=body, headers={"stripe-signature": header}
        )
        assert r.json()["duplicate"] is True
        assert me.get("/api/v1/credits/balance").json()["grants"]["paid"] == "1500.000000"
        [listed] = me.get("/api/v1/credits/topups").json()
        assert (listed["status"], listed["amount"]) == ("paid", "1500.000000")


async def recharging(topups: Topups, ledger: Ledger, account: AccountFactory, **terms: Any) -> str:
    subject = await account("10")
    await topups.set_recharge(
        subject,
        threshold=c("5"),
        amount=c("20"),
        customer_id="cus_" + uuid.uuid4().hex,
        payment_method_id=terms.pop("payment_method_id", "pm_card_visa"),
        max_per_month=terms.pop("max_per_month", 5),
        max_amount_per_month=terms.pop("max_amount_per_month", None),
    )
    return subject


def intents(fake_stripe: tuple[str, Path], subject: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in fake_stripe[1].read_text().splitlines()]
    return [
        x
        for x in lines
        if x["path"] == "/v1/payment_intents" and x["form"].get("metadata[user_id]") == subject
    ]


async def test_auto_recharge_under_20_concurrent_callers_creates_one_payment_intent(
    topups: Topups, ledger: Ledger, account: AccountFactory, fake_stripe: tuple[str, Path]
) -> None:
    subject = await recharging(topups, ledger, account)
    assert await topups.maybe_recharge(subject) == "not due"  # 10 is not below 5
    held = await ledger.hold(subject, c("6"), ttl_seconds=600)
    await ledger.settle(subject, held.id, c("6"), UsageRecord(model="m"))  # 4: below 5

    outcomes = await asyncio.gather(*(topups.maybe_recharge(subject) for _ in range(20)))
    assert outcomes.count("started") == 1, outcomes
    [asked] = intents(fake_stripe, subject)
    assert (asked["form"]["amount"], asked["form"]["off_session"], asked["form"]["confirm"]) == (
        "2000",
        "true",
        "true",
    )
    assert await balance(ledger, subject) == c("4")  # nothing until Stripe says it was paid

    [topup] = await topups.list(subject, limit=10, offset=0)
    succeeded = event(
        "payment_intent.succeeded",
        {
            "id": "pi_x",
            "object": "payment_intent",
            "metadata": {"topup_id": str(topup["id"]), "user_id": subject},
        },
    )
    await ledger.pool.execute("UPDATE credits.topups SET payment_intent_id = NULL WHERE id = $1", topup["id"])
    assert (await topups.handle(*signed(succeeded))).outcome == "credited"
    assert (
        await topups.handle(*signed({**succeeded, "id": "evt_" + uuid.uuid4().hex}))
    ).outcome == "credited before"
    assert await balance(ledger, subject) == c("24")
    assert await topups.maybe_recharge(subject) == "not due"
    await assert_identities(ledger, subject)


async def test_auto_recharge_stops_at_its_monthly_cap_and_a_declined_card_fails_it(
    topups: Topups, ledger: Ledger, account: AccountFactory, fake_stripe: tuple[str, Path]
) -> None:
    subject = await recharging(topups, ledger, account, max_per_month=1)
    await ledger.credit(subject, -c("8"), type="adjustment")  # 2: below 5
    assert await topups.maybe_recharge(subject) == "started"
    await ledger.pool.execute("UPDATE credits.topups SET status = 'paid' WHERE subject_id = $1", subject)
    assert await topups.maybe_recharge(subject) == "in flight or capped"  # one a month
    assert len(intents(fake_stripe, subject)) == 1

    declined = await recharging(topups, ledger, account, payment_method_id="pm_card_chargeDeclined")
    await ledger.credit(declined, -c("8"), type="adjustment")
    assert await topups.maybe_recharge(declined) == "failed"
    [topup] = await topups.list(declined, limit=10, offset=0)
    assert topup["status"] == "failed"
    kinds = [
        r["type"]
        for r in await ledger.pool.fetch("SELECT type FROM credits.outbox WHERE subject_id = $1", declined)
    ]
    assert kinds == ["topup.failed"]
    assert await balance(ledger, declined) == c("2")
    # a declined card is not tried again: the account's auto-recharge is off until a person acts
    assert (await topups.recharge_settings(declined))["enabled"] is False
    assert await topups.maybe_recharge(declined) == "not due"
    assert len(intents(fake_stripe, declined)) == 1


async def test_a_recharge_that_never_reached_stripe_is_asked_again_then_failed(
    topups: Topups, ledger: Ledger, account: AccountFactory, fake_stripe: tuple[str, Path]
) -> None:
    """A process that died (or got no answer) between claiming a recharge and Stripe's reply left
    it open without a PaymentIntent: the next sweep asks Stripe again under the same idempotency
    key; one a day old is failed, so the account's next recharge is not blocked forever."""
    subject = await recharging(topups, ledger, account)
    await ledger.credit(subject, -c("8"), type="adjustment")  # 2: below 5
    claimed = await ledger.pool.fetchval(
        "INSERT INTO credits.topups (subject_id, amount, currency, unit_amount, kind, updated_at)"
        " VALUES ($1, $2, 'usd', 2000, 'recharge', now() - interval '5 minutes') RETURNING id",
        subject,
        c("20"),
    )
    assert await topups.maybe_recharge(subject) == "in flight or capped"
    await topups.recharge_due()
    [asked] = intents(fake_stripe, subject)
    assert asked["headers"].get("Idempotency-Key") == f"recharge-{claimed}"
    [row] = await topups.list(subject, limit=10, offset=0)
    assert (row["id"], row["status"]) == (claimed, "open")  # now waiting for Stripe's webhook

    other = await recharging(topups, ledger, account)
    await ledger.credit(other, -c("8"), type="adjustment")
    stale = await ledger.pool.fetchval(
        "INSERT INTO credits.topups (subject_id, amount, currency, unit_amount, kind, created_at, updated_at)"
        " VALUES ($1, $2, 'usd', 2000, 'recharge', now() - interval '2 days', now() - interval '2 days')"
        " RETURNING id",
        other,
        c("20"),
    )
    await topups.recharge_due()  # failed (Stripe keeps keys a day), then a new recharge starts
    statuses = {t["id"]: t["status"] for t in await topups.list(other, limit=10, offset=0)}
    assert statuses.pop(stale) == "failed" and list(statuses.values()) == ["open"]
    assert len(intents(fake_stripe, other)) == 1
