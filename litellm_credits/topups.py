"""Paid top-ups through Stripe Checkout (the ``stripe`` package; its API base configurable, so the
tests talk to a local fake Stripe, never the network).

- :meth:`Topups.checkout` records a top-up and opens a Checkout Session for its price; the user
  pays on Stripe's page.
- :meth:`Topups.handle` takes Stripe's webhook: the ``Stripe-Signature`` is verified (within a
  tolerance window: an old timestamp is a replay and refused), and each event id is handled once
  (``credits.stripe_events``), all in one transaction with what it changes.

  - ``checkout.session.completed`` with ``payment_status: paid``, or
    ``checkout.session.async_payment_succeeded``: the top-up is credited once, as a paid grant (a
    ``topup`` ledger row keyed by the top-up), and ``topup.succeeded`` is raised; to the team of
    an account that joined one since its checkout.
  - ``checkout.session.async_payment_failed`` / ``checkout.session.expired``: the top-up fails
    (``topup.failed``) or lapses; nothing is credited.
  - ``charge.refunded``: the share refunded so far is taken back (an ``adjustment``);
    ``charge.dispute.created``: all of it. The balance may go below zero; the next hold sees it.
    ``topup.reversed`` is raised.
  - Anything else is recorded and ignored.
"""

from __future__ import annotations

import json
from collections.abc import MutableSequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any

import asyncpg
import stripe

from . import metrics
from .errors import (
    AccountIsMember,
    AccountNotFound,
    CreditsError,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
)
from .ledger_sql import SQL_CREDIT
from .money import MICRO, format_credits
from .topups_sql import (
    SQL_ACCOUNT,
    SQL_ALERT,
    SQL_BY_ID,
    SQL_BY_INTENT,
    SQL_BY_SESSION,
    SQL_CREDITED_TO,
    SQL_DEBIT_GRANT,
    SQL_DISABLE_RECHARGE,
    SQL_DUE_RECHARGES,
    SQL_EVENT,
    SQL_FAILED,
    SQL_GET_RECHARGE,
    SQL_INTENT,
    SQL_LIST,
    SQL_NEW,
    SQL_OUTCOME,
    SQL_PAID,
    SQL_PAYER_LOCKED,
    SQL_RECHARGE_CLAIM,
    SQL_RECHARGE_METHOD,
    SQL_RECHARGE_TERMS,
    SQL_REVERSED,
    SQL_SESSION,
    SQL_SET_RECHARGE,
    SQL_STALE_RECHARGES,
    SQL_STATUS,
    SQL_TAKE_FROM_GRANT,
    SQL_UNANSWERED_RECHARGES,
    STALE_RECHARGE,
    UNANSWERED_RECHARGE,
)


class InvalidSignature(CreditsError):
    status = 400
    type = "invalid_signature"


class TopupsNotConfigured(CreditsError):
    """This proxy sells no credits (Stripe's keys are not set): the routes do not exist here."""

    status = 404
    type = "topups_not_configured"


@dataclass(frozen=True)
class Pricing:
    currency: str  # ISO 4217, lower case
    credits_per_unit: Decimal  # credits one currency unit buys
    minor_units: int  # minor units in one unit (100 for usd, eur)
    min_amount: int  # micro-credits
    max_amount: int

    def price(self, amount: int) -> int:
        """What ``amount`` micro-credits cost, in minor units, rounded up."""
        units = Decimal(amount) / MICRO / self.credits_per_unit * self.minor_units
        return int(units.to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True)
class Handled:
    event_id: str
    duplicate: bool
    outcome: str
    subject_id: str | None = None


class Topups:
    def __init__(
        self,
        pool: asyncpg.Pool,
        pricing: Pricing,
        *,
        api_key: str | None,
        webhook_secret: str | None,
        api_base: str | None = None,
        success_url: str,
        cancel_url: str,
        tolerance_seconds: int = 300,
    ) -> None:
        self.pool = pool
        self.pricing = pricing
        self.api_key = api_key
        self.webhook_secret = webhook_secret
        self.api_base = api_base
        self.success_url = success_url
        self.cancel_url = cancel_url
        self.tolerance = tolerance_seconds
        self._http: stripe.HTTPXClient | None = None
        self._stripe: stripe.StripeClient | None = None

    def _client(self) -> stripe.StripeClient:
        """One Stripe client (and its connection pool) for this instance's life."""
        if not self.api_key:
            raise TopupsNotConfigured("top-ups are not configured: set CREDITS_STRIPE_SECRET_KEY")
        if self._stripe is None:
            self._http = stripe.HTTPXClient(allow_sync_methods=False)
            self._stripe = stripe.StripeClient(
                self.api_key,
                base_addresses={"api": self.api_base} if self.api_base else None,
                http_client=self._http,
                max_network_retries=2,
            )
        return self._stripe

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close_async()
            self._http, self._stripe = None, None

    async def checkout(self, subject_id: str, amount: int) -> dict[str, Any]:
        """Open a Checkout Session for ``amount`` micro-credits: the page the user pays on."""
        p = self.pricing
        await self._payer(subject_id, amount, "a top-up")
        client = self._client()
        price = p.price(amount)
        topup_id = await self.pool.fetchval(SQL_NEW, subject_id, amount, p.currency, price)
        try:
            session = await client.v1.checkout.sessions.create_async(
                params={
                    "mode": "payment",
                    "client_reference_id": subject_id,
                    "success_url": self.success_url,
                    "cancel_url": self.cancel_url,
                    "line_items": [
                        {
                            "quantity": 1,
                            "price_data": {
                                "currency": p.currency,
                                "unit_amount": price,
                                "product_data": {"name": f"{format_credits(amount)} credits"},
                            },
                        }
                    ],
                    "metadata": {"topup_id": str(topup_id), "user_id": subject_id},
                    "payment_intent_data": {"metadata": {"topup_id": str(topup_id), "user_id": subject_id}},
                },
                options={"idempotency_key": f"topup-{topup_id}"},
            )
        except stripe.StripeError as exc:
            raise ServiceUnavailable(
                f"Stripe refused or did not answer: {exc.user_message or type(exc).__name__}"
            ) from exc
        await self.pool.execute(SQL_SESSION, topup_id, session.id)
        return {
            "id": topup_id,
            "user_id": subject_id,
            "amount": format_credits(amount),
            "price": {"currency": p.currency, "unit_amount": price},
            "checkout_url": session.url,
            "checkout_session_id": session.id,
        }

    async def _payer(self, subject_id: str, amount: int, what: str) -> None:
        """Refuse an amount outside the configured range, a missing account, or a team member
        (whose team pays)."""
        p = self.pricing
        if not p.min_amount <= amount <= p.max_amount:
            raise InvalidRequest(
                f"{what} is between {format_credits(p.min_amount)} and "
                f"{format_credits(p.max_amount)} credits",
                param="amount",
            )
        row = await self.pool.fetchrow(SQL_ACCOUNT, subject_id)
        if row is None:
            raise AccountNotFound(f"no credit account {subject_id!r}", param="user_id")
        if row["parent_id"] is not None:
            raise AccountIsMember(
                f"{subject_id!r} spends its team's credits; the team {row['parent_id']!r} pays",
                param="user_id",
                team_id=row["parent_id"],
            )

    async def list(self, subject_id: str, *, limit: int, offset: int) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(SQL_LIST, subject_id, limit, offset)
        return [
            {
                "id": r["id"],
                "amount": format_credits(r["amount"]),
                "price": {"currency": r["currency"], "unit_amount": r["unit_amount"]},
                "status": r["status"],
                "reversed": format_credits(r["reversed"]),
                "disputed": r["disputed"],
                "transaction_id": r["transaction_id"],
                "created_at": r["created_at"].isoformat(),
            }
            for r in rows
        ]

    def verify(self, payload: bytes, signature: str | None) -> dict[str, Any]:
        """The event, if Stripe signed it within the tolerance window; else InvalidSignature."""
        if not self.webhook_secret:
            raise TopupsNotConfigured("top-ups are not configured: set CREDITS_STRIPE_WEBHOOK_SECRET")
        try:
            stripe.WebhookSignature.verify_header(
                payload.decode("utf-8"), signature or "", self.webhook_secret, self.tolerance
            )
            event = json.loads(payload)
        except (stripe.SignatureVerificationError, UnicodeDecodeError, ValueError):
            raise InvalidSignature("the Stripe-Signature does not verify (or is too old)") from None
        if (
            not isinstance(event, dict)
            or not isinstance(event.get("id"), str)
            or not isinstance(event.get("data", {}).get("object"), dict)
        ):
            raise InvalidRequest("not a Stripe event", param="body")
        return event

    async def handle(self, payload: bytes, signature: str | None) -> Handled:
        event = self.verify(payload, signature)
        kind, obj = str(event.get("type", "")), event["data"]["object"]
        credited: list[int] = []  # what the event credited, counted once it is committed
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(SQL_EVENT, event["id"], kind) is None:
                return Handled(event["id"], True, "duplicate")
            outcome, subject = await self._apply(conn, kind, obj, credited)
            await conn.execute(SQL_OUTCOME, event["id"], outcome)
        metrics.count_credited("topup", sum(credited))
        return Handled(event["id"], False, outcome, subject)

    async def _apply(
        self, conn: asyncpg.Connection, kind: str, obj: dict[str, Any], credited: MutableSequence[int]
    ) -> tuple[str, str | None]:
        if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
            if kind == "checkout.session.completed" and obj.get("payment_status") != "paid":
                return "awaiting payment", None
            topup = await conn.fetchrow(SQL_BY_SESSION, obj.get("id"))
            return await self._credit(
                conn, topup, obj.get("payment_intent"), {"checkout_session": obj.get("id")}, credited
            )
        if kind in ("payment_intent.succeeded", "payment_intent.payment_failed", "payment_intent.canceled"):
            # a recharge's (a Checkout's own PaymentIntent may fail and be retried in its session)
            topup_id = str((obj.get("metadata") or {}).get("topup_id", ""))
            topup = await conn.fetchrow(SQL_BY_ID, int(topup_id)) if topup_id.isdigit() else None
            if topup is None or topup["kind"] != "recharge":
                return "not a recharge", None
            if topup["payment_intent_id"] not in (None, obj.get("id")):
                return "unknown payment", None
            if kind == "payment_intent.succeeded":
                payment = {"payment_intent": obj.get("id")}
                return await self._credit(conn, topup, obj.get("id"), payment, credited)
            failed = await conn.fetchrow(SQL_FAILED, topup["id"])
            if failed is not None:
                await self._alert(conn, "topup.failed", failed)
            return "failed", topup["subject_id"]
        if kind in ("checkout.session.async_payment_failed", "checkout.session.expired"):
            topup = await conn.fetchrow(SQL_BY_SESSION, obj.get("id"))
            if topup is None:
                return "unknown session", None
            status = "failed" if kind.endswith("failed") else "expired"
            await conn.execute(SQL_STATUS, topup["id"], status)
            if status == "failed":
                await self._alert(conn, "topup.failed", topup)
            return status, topup["subject_id"]
        if kind in ("charge.refunded", "charge.dispute.created"):
            topup = await conn.fetchrow(SQL_BY_INTENT, obj.get("payment_intent"))
            if topup is None or topup["status"] != "paid":
                return "not a credited top-up", None
            if kind == "charge.dispute.created":
                target, disputed = topup["amount"], True
                await conn.execute(SQL_DISABLE_RECHARGE, topup["subject_id"])  # not that card again
            else:  # the share of the price refunded so far (Stripe's running total), rounded up
                refunded = min(int(obj.get("amount_refunded") or 0), topup["unit_amount"])
                target = -(-topup["amount"] * refunded // topup["unit_amount"])
                disputed = False
            take = target - topup["reversed"]
            if take <= 0:
                return "taken back before", topup["subject_id"]
            # from the account it credited (its team's, if it had joined one): from the top-up's
            # own grant first (what is left of it); the rest, already spent, by the usual order (or
            # as overrun)
            credited_to = await conn.fetchval(SQL_CREDITED_TO, topup["transaction_id"], topup["id"])
            payer = credited_to or topup["subject_id"]
            own = await conn.fetchrow(SQL_TAKE_FROM_GRANT, payer, topup["transaction_id"], take)
            tx = None
            for part, grant, suffix in (
                (own["taken"] if own else 0, own["id"] if own else None, "own"),
                (take - (own["taken"] if own else 0), None, "rest"),
            ):
                if part > 0:
                    tx = await conn.fetchrow(
                        SQL_DEBIT_GRANT,
                        payer,
                        -part,
                        f"topup-reversal:{topup['id']}:{target}:{suffix}",
                        f"top-up {topup['id']} {'disputed' if disputed else 'refunded'}",
                        {"topup_id": topup["id"], "reason": kind},
                        grant,
                        None if payer == topup["subject_id"] else topup["subject_id"],
                    )
            await conn.execute(SQL_REVERSED, topup["id"], target, disputed)
            balance = tx["balance_after"] if tx is not None else None
            await self._alert(
                conn,
                "topup.reversed",
                topup,
                balance=balance,
                taken_back=take,
                reason=kind,
                **_team(topup, payer),
            )
            return "taken back", payer
        return "ignored", None

    async def _credit(
        self,
        conn: asyncpg.Connection,
        topup: Any,
        payment_intent: str | None,
        metadata: dict[str, Any],
        credited: MutableSequence[int],
    ) -> tuple[str, str | None]:
        """Credit a paid top-up once, as a paid grant (a ``topup`` row keyed by the top-up); the
        amount is appended to ``credited``."""
        if topup is None:
            return "unknown top-up", None
        if topup["status"] == "paid":
            return "credited before", topup["subject_id"]
        # the account it credits: the top-up's own, or (if the account joined a team since its
        # checkout: it spends the team's credits now) its team's, and a reversal takes it back from
        # there. The member's row is locked first (a move out of the team waits; the batches' order)
        member = topup["subject_id"]
        paid_to = await conn.fetchval(SQL_PAYER_LOCKED, member)
        if paid_to is None:
            return "unknown account", member
        by_member = None if paid_to == member else member
        by = "" if by_member is None else f" by member {member}"
        tx = await conn.fetchrow(
            SQL_CREDIT,
            paid_to,
            topup["amount"],
            "topup",
            f"topup:{topup['id']}",
            f"top-up {topup['id']}{by} ({topup['unit_amount']} {topup['currency']} minor units)",
            {"topup_id": topup["id"], **({} if by_member is None else {"member_id": member}), **metadata},
            None,
            "paid",
            None,
            None,
            by_member,  # (a team's history filtered by member shows it)
        )
        if tx is None:  # (teams have two levels: a team is never a member)
            return "account is a member", member
        await conn.execute(SQL_PAID, topup["id"], payment_intent, tx["id"])
        credited.append(tx["amount"])
        await self._alert(
            conn, "topup.succeeded", topup, balance=tx["balance_after"], **_team(topup, paid_to)
        )
        return "credited", paid_to

    # auto-recharge -------------------------------------------------------------------------

    async def set_recharge(
        self,
        subject_id: str,
        *,
        threshold: int,
        amount: int,
        customer_id: str,
        payment_method_id: str,
        max_per_month: int,
        max_amount_per_month: int | None,
    ) -> dict[str, Any]:
        await self._payer(subject_id, amount, "a recharge")
        saved = await self.pool.fetchrow(
            SQL_SET_RECHARGE,
            subject_id,
            threshold,
            amount,
            customer_id,
            payment_method_id,
            max_per_month,
            max_amount_per_month,
        )
        return recharge_json(saved)

    async def recharge_settings(self, subject_id: str, *, disable: bool = False) -> dict[str, Any]:
        row = await self.pool.fetchrow(SQL_DISABLE_RECHARGE if disable else SQL_GET_RECHARGE, subject_id)
        if row is None:
            raise NotFound("no auto-recharge for this account", param="user_id")
        return recharge_json(row)

    async def maybe_recharge(self, subject_id: str) -> str:
        """Start a recharge if the account is below its threshold, none is in flight and the
        month's caps allow it: an off-session PaymentIntent, credited when its webhook says it
        succeeded. Safe to call from any number of places at once: one claims it."""
        amount = await self.pool.fetchval(SQL_RECHARGE_TERMS, subject_id)
        if amount is None:
            return "not due"
        self._client()  # (refused before anything is claimed when Stripe is not configured)
        price = self.pricing.price(amount)
        topup_id = await self.pool.fetchval(
            SQL_RECHARGE_CLAIM, subject_id, self.pricing.currency, price, amount
        )
        if topup_id is None:
            return "in flight or capped"
        return await self._charge(topup_id, subject_id, price)

    async def _charge(self, topup_id: int, subject_id: str, price: int) -> str:
        """Ask Stripe to charge a claimed recharge (again, after a lost answer: the same
        idempotency key returns the first PaymentIntent). A refusal fails it and turns the
        account's auto-recharge off (a declined card is not tried again without a person); an
        answer that never came leaves it open, for the next sweep to ask again."""
        method = await self.pool.fetchrow(SQL_RECHARGE_METHOD, subject_id)
        try:
            intent = await self._client().v1.payment_intents.create_async(
                params={
                    "amount": price,
                    "currency": self.pricing.currency,
                    "customer": method["customer_id"],
                    "payment_method": method["payment_method_id"],
                    "off_session": True,
                    "confirm": True,
                    "metadata": {"topup_id": str(topup_id), "user_id": subject_id},
                },
                options={"idempotency_key": f"recharge-{topup_id}"},
            )
        except (stripe.APIConnectionError, stripe.RateLimitError):
            return "no answer"  # Stripe may have charged: ask again with the same key later
        except stripe.APIError as exc:
            if (exc.http_status or 500) >= 500:
                return "no answer"
            return await self._refused(topup_id, exc)
        except stripe.StripeError as exc:
            return await self._refused(topup_id, exc)
        await self.pool.execute(SQL_INTENT, topup_id, intent.id)
        return "started"

    async def _refused(self, topup_id: int, exc: stripe.StripeError) -> str:
        async with self.pool.acquire() as conn, conn.transaction():
            failed = await conn.fetchrow(SQL_FAILED, topup_id)
            if failed is not None:
                await conn.execute(SQL_DISABLE_RECHARGE, failed["subject_id"])
                await self._alert(conn, "topup.failed", failed, error=exc.user_message or type(exc).__name__)
        return "failed"

    async def recharge_due(self, *, batch: int = 100) -> int:
        """Start the recharges that are due (the dispatcher's loop); how many started.

        A recharge whose PaymentIntent is not known (Stripe did not answer, or the process died in
        between) is asked for again with its idempotency key after ``UNANSWERED_RECHARGE``; one
        still without an answer after ``STALE_RECHARGE`` (Stripe keeps keys for a day) is failed,
        so it cannot block the account's next recharge forever (were Stripe to report it paid
        after all, the webhook still credits it)."""
        for row in await self.pool.fetch(SQL_UNANSWERED_RECHARGES, UNANSWERED_RECHARGE, STALE_RECHARGE):
            await self._charge(row["id"], row["subject_id"], row["unit_amount"])
        async with self.pool.acquire() as conn, conn.transaction():
            for stale in await conn.fetch(SQL_STALE_RECHARGES, STALE_RECHARGE):
                await self._alert(conn, "topup.failed", stale, error="no PaymentIntent was created")
        subjects = [r["subject_id"] for r in await self.pool.fetch(SQL_DUE_RECHARGES, batch)]
        return sum([await self.maybe_recharge(s) == "started" for s in subjects])

    @staticmethod
    async def _alert(conn: asyncpg.Connection, kind: str, topup: Any, **extra: Any) -> None:
        data = {
            "user_id": topup["subject_id"],
            "topup_id": topup["id"],
            "amount": format_credits(topup["amount"]),
            "price": {"currency": topup["currency"], "unit_amount": topup["unit_amount"]},
        }
        for key, value in extra.items():
            data[key] = (
                format_credits(value) if key in ("balance", "taken_back") and value is not None else value
            )
        await conn.execute(SQL_ALERT, kind, topup["subject_id"], data)


def _team(topup: Any, paid_to: str) -> dict[str, str]:
    """An alert's ``credited_to``, when a top-up credited the team its account had joined."""
    return {} if paid_to == topup["subject_id"] else {"credited_to": paid_to}


def recharge_json(row: Any) -> dict[str, Any]:
    return {
        "user_id": row["subject_id"],
        "threshold": format_credits(row["threshold"]),
        "amount": format_credits(row["amount"]),
        "customer_id": row["customer_id"],
        "payment_method_id": row["payment_method_id"],
        "max_per_month": row["max_per_month"],
        "max_amount_per_month": None
        if row["max_amount_per_month"] is None
        else format_credits(row["max_amount_per_month"]),
        "enabled": row["enabled"],
    }


__all__ = ["Handled", "InvalidSignature", "Pricing", "Topups", "TopupsNotConfigured", "recharge_json"]
