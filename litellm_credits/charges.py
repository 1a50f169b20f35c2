"""Charges for services used outside the proxy: a hold of exactly the amount, settled at once."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from .errors import Conflict
from .ledger import Ledger
from .ledger_sql import SQL_TX_BY_KEY
from .records import Charge, Quote, Transaction, UsageRecord

# hold ids of charges derive from (account, idempotency key) in this namespace
_CHARGE_NAMESPACE = uuid.UUID("6f1d3b8e-2c4a-4e7b-9a51-0c2f6d1e8b37")


async def charge(
    ledger: Ledger,
    subject_id: str,
    quotes: Mapping[str, Quote],
    *,
    default_tier: str,
    idempotency_key: str,
    usage: UsageRecord,
    power_level: str | None = None,
) -> Charge:
    """Charge a service used outside the proxy (search, speech, ...), idempotently.

    It is a hold of exactly the amount, settled at once: the same checks (balance, monthly
    cap, unlimited tiers) and the same records. The hold's id derives from the idempotency
    key, so a retry finds the first attempt, finishes it if it was cut short, and never
    charges twice; the same key with another amount is a conflict.
    """
    hold_id = uuid.uuid5(_CHARGE_NAMESPACE, f"{subject_id}\x00{idempotency_key}")
    hold = await ledger.hold_quoted(
        subject_id,
        quotes,
        default_tier=default_tier,
        ttl_seconds=3600,
        model=usage.model,
        power_level=power_level,
        hold_id=hold_id,
    )
    quoted = quotes.get(hold.tier, quotes[default_tier])
    if hold.amount != quoted.amount:
        raise Conflict("idempotency key already used for a different charge", param="idempotency_key")
    settled = await ledger.settle(subject_id, hold_id, hold.amount, usage)
    row = await ledger.pool.fetchrow(SQL_TX_BY_KEY, subject_id, f"hold:{hold_id}")
    account = await ledger.require_account(subject_id)
    return Charge(
        hold_id=hold_id,
        cost=hold.amount,
        charged=hold.amount if hold.debits else 0,
        balance=account.balance,
        transaction=Transaction(**dict(row)) if row else None,
        replayed=settled is None,
    )


__all__ = ["charge"]
