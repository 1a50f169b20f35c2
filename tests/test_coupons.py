"""Coupons on a real PostgreSQL: fixed and percent, and every limit, raced."""

from __future__ import annotations

import asyncio
import secrets
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from litellm_credits.coupons import Coupons
from litellm_credits.errors import (
    CouponAlreadyRedeemed,
    CouponExhausted,
    CouponExists,
    CouponExpired,
    CouponNotApplicable,
    CouponNotFound,
)
from litellm_credits.ledger import Ledger
from litellm_credits.money import parse_credits as c

from .conftest import AccountFactory
from .test_ledger import assert_sound


def new_code() -> str:
    return "T" + secrets.token_hex(5).upper()


@pytest.fixture
def coupons(ledger: Ledger) -> Coupons:
    return Coupons(ledger.pool)


async def test_fixed_coupon_credits_once(coupons: Coupons, ledger: Ledger, account: AccountFactory) -> None:
    code = new_code()
    created = await coupons.create(code.lower(), "fixed", Decimal("2.5"))
    assert (created["code"], created["value"], created["uses"]) == (code, "2.500000", 0)
    with pytest.raises(CouponExists):
        await coupons.create(code, "fixed", Decimal(1))
    subject = await account("1")
    r = await coupons.redeem(subject, code.lower())
    assert (r.credited, r.balance) == (c("2.5"), c("3.5"))
    with pytest.raises(CouponAlreadyRedeemed):
        await coupons.redeem(subject, code)
    tx = await ledger.pool.fetchrow("SELECT type, amount FROM credits.credit_transactions WHERE id = $1",
                                    r.transaction_id)  # fmt: skip
    assert (tx["type"], tx["amount"]) == ("coupon", c("2.5"))
    await assert_sound(ledger, subject)


async def test_percent_coupon_pays_on_the_next_allocation(
    coupons: Coupons, ledger: Ledger, account: AccountFactory
) -> None:
    code = new_code()
    await coupons.create(code, "percent", Decimal(20))
    subject = await account("0")
    r = await coupons.redeem(subject, code)
    assert (r.credited, r.balance) == (0, None)
    assert (await ledger.require_account(subject)).balance == 0
    await ledger.credit(subject, c("10.000003"))  # 20 % = 2.0000006, rounded down
    assert (await ledger.require_account(subject)).balance == c("10.000003") + c("2")
    await ledger.credit(subject, c("10"))  # the bonus pays once
    assert (await ledger.require_account(subject)).balance == c("22.000003")
    await ledger.credit(subject, c("1"), type="bonus")
    await assert_sound(ledger, subject)


async def test_coupon_limits(coupons: Coupons, account: AccountFactory) -> None:
    subject = await account("0")
    with pytest.raises(CouponNotFound):
        await coupons.redeem(subject, "NOPE-NOPE")
    expired = new_code()
    await coupons.create(
        expired, "fixed", Decimal(1), expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)
    )
    with pytest.raises(CouponExpired):
        await coupons.redeem(subject, expired)
    pro_only = new_code()
    await coupons.create(pro_only, "fixed", Decimal(1), tiers=["pro"])
    with pytest.raises(CouponNotApplicable):
        await coupons.redeem(subject, pro_only)
    await coupons.redeem(await account("0", tier="pro"), pro_only)
    off = new_code()
    await coupons.create(off, "fixed", Decimal(1))
    await coupons.deactivate(off)
    with pytest.raises(CouponNotFound):
        await coupons.redeem(subject, off)


async def test_concurrent_redemptions_respect_max_uses(coupons: Coupons, account: AccountFactory) -> None:
    code = new_code()
    await coupons.create(code, "fixed", Decimal(1), max_uses=3)
    subjects = [await account("0") for _ in range(12)]
    results = await asyncio.gather(*(coupons.redeem(s, code) for s in subjects), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 3
    assert all(isinstance(r, CouponExhausted) for r in results if isinstance(r, BaseException))
    listed, _ = await coupons.list(active=None, limit=1000, offset=0)
    assert next(x for x in listed if x["code"] == code)["uses"] == 3


async def test_concurrent_redemptions_by_one_account_pay_once(
    coupons: Coupons, ledger: Ledger, account: AccountFactory
) -> None:
    code = new_code()
    await coupons.create(code, "fixed", Decimal(5))
    subject = await account("0")
    results = await asyncio.gather(*(coupons.redeem(subject, code) for _ in range(8)), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, CouponAlreadyRedeemed) for r in results if isinstance(r, BaseException))
    assert (await ledger.require_account(subject)).balance == c("5")
    await assert_sound(ledger, subject)
