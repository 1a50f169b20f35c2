"""What the pre-call hook promises the settlement, signed so that only this process mints it.

The claim travels in the request's metadata, which a client could also write to: the HMAC under a
key born with the process makes a forged or replayed-elsewhere claim worthless.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .records import Service


@dataclass(frozen=True)
class HoldClaim:
    """What the pre-call hook promised the settlement: who, which hold, at what rate."""

    hold_id: uuid.UUID
    subject_id: str
    rate: Decimal  # credits per USD of list price (tier markup x power level)
    power_level: str
    service: Service
    # on a key the user brought: the share of the cost charged (the usage event still records
    # the full cost); None on the operator's or a provisioned key
    byok_fee: Decimal | None = None
    tier: str = ""  # the account's tier when the hold was taken (its token limit)


class HoldSigner:
    """Signs hold claims so that only this process's pre-call hook can mint them."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def sign(self, claim: HoldClaim) -> str:
        body = json.dumps(
            [
                str(claim.hold_id),
                claim.subject_id,
                str(claim.rate),
                claim.power_level,
                claim.service,
                None if claim.byok_fee is None else str(claim.byok_fee),
                claim.tier,
            ],
            separators=(",", ":"),
        ).encode()
        mac = hmac.new(self._key, body, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(body).decode() + "." + base64.urlsafe_b64encode(mac).decode()

    def verify(self, token: Any) -> HoldClaim | None:
        if not isinstance(token, str) or "." not in token:
            return None
        try:
            body_b64, mac_b64 = token.split(".", 1)
            body = base64.urlsafe_b64decode(body_b64)
            mac = base64.urlsafe_b64decode(mac_b64)
        except (ValueError, TypeError):
            return None
        if not hmac.compare_digest(mac, hmac.new(self._key, body, hashlib.sha256).digest()):
            return None
        hold_id, subject_id, rate, power_level, service, fee, tier = json.loads(body)
        return HoldClaim(
            uuid.UUID(hold_id),
            subject_id,
            Decimal(rate),
            power_level,
            service,
            None if fee is None else Decimal(fee),
            tier,
        )


__all__ = ["HoldClaim", "HoldSigner"]
