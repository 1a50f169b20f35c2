"""Charges for services used outside the proxy: a hold of exactly the amount, settled at once."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from . import metrics
from .errors import IdempotencyConflict
from .ledger import Ledger
from .ledger_sql import SQL_TX_BY_KEY
from .records import Charge, Hold, Quote, Transaction, UsageRecord

# hold ids of charges derive from (account, idempotency key) in this namespace
_CHARGE_NAMESPACE = uuid.UUID("6f1d3b8e-2c4a-4e7b-9a51-0c2f6d1e8b37")


def request_hash(request: Mapping[str, Any]) -> bytes:
    """What a charge was asked for: the client's request as it sent it (not the prices or tiers
    it was quoted at, which an operator may change between a request and its retry)."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).digest()


def _quoted_request(
    quotes: Mapping[str, Quote], default_tier: str, usage: UsageRecord, power_level: str | None
) -> dict[str, Any]:
    """The request, for callers that pass none: every tier's quote and the usage it records."""
    return {
        "quotes": sorted((t, q.amount, q.debits) for t, q in quotes.items()),
        "default_tier": default_tier,
        "usage": {k: v for k, v in asdict(usage).items() if k not in ("latency_ms", "metadata")},
        "power_level": power_level,
    }


def _same_request(hold: Hold, quotes: Mapping[str, Quote], default_tier: str, fingerprint: bytes) -> bool:
    if hold.request_hash is not None:
        return hold.request_hash == fingerprint
    # a hold from before request hashes were recorded: its amount is all there is to compare
    return hold.amount == quotes.get(hold.tier, quotes[default_tier]).amount


async def charge(
    ledger: Ledger,
    subject_id: str,
    quotes: Mapping[str, Quote],
    *,
    default_tier: str,
    idempotency_key: str,
    usage: UsageRecord,
    power_level: str | None = None,
    request: Mapping[str, Any] | None = None,
) -> Charge:
    """Charge a service used outside the proxy (search, speech, ...), idempotently; a team
    member's charge is paid by its team (whose balance the answer carries).

    It is a hold of exactly the amount, settled at once: the same checks (balance, monthly
    cap, unlimited tiers) and the same records. The hold's id derives from the idempotency
    key and is looked up before anything else, so a retry finds the first attempt (whatever
    the balance is now), finishes it if it was cut short, and never charges twice; the same
    key for another request is ``409 idempotency_conflict``. ``request`` is what the client
    sent (without the key), compared on a replay; by default, the quotes and the usage.
    """
    hold_id = uuid.uuid5(_CHARGE_NAMESPACE, f"{subject_id}\x00{idempotency_key}")
    fingerprint = request_hash(
        request if request is not None else _quoted_request(quotes, default_tier, usage, power_level)
    )
    hold = await ledger.hold_quoted(
        subject_id,
        quotes,
        default_tier=default_tier,
        ttl_seconds=3600,
        model=usage.model,
        power_level=power_level,
        hold_id=hold_id,
        request_hash=fingerprint,
    )
    if hold.replayed and not _same_request(hold, quotes, default_tier, fingerprint):
        raise IdempotencyConflict("idempotency key already used for a different charge")
    # the hold, its ledger row and the balance are the paying account's: a member's team's
    payer = hold.subject_id
    settled = await ledger.settle(payer, hold_id, hold.amount, usage)
    if settled is not None:  # settled by this request (a replay was counted by the first)
        metrics.count_charge(
            ledger.labels, settled.charged, tier=hold.tier, model_group=usage.model, service=usage.service
        )
    row = await ledger.pool.fetchrow(SQL_TX_BY_KEY, payer, f"hold:{hold_id}")
    account = await ledger.require_account(payer)
    return Charge(
        hold_id=hold_id,
        cost=hold.amount,
        charged=hold.amount if hold.debits else 0,
        balance=account.balance,
        transaction=Transaction(**dict(row)) if row else None,
        replayed=settled is None,
    )


__all__ = ["charge", "request_hash"]
