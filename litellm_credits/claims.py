"""What the pre-call hook promises the settlement, signed so that only this process mints it.

The claim travels in the request's metadata, which a client could also write to: the HMAC under a
key born with the process makes a forged or replayed-elsewhere claim worthless.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import uuid
from collections import OrderedDict
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import orjson

from .records import Service


@dataclass(frozen=True)
class HoldClaim:
    """What the pre-call hook promised the settlement: who, which hold, at what rate, and what the
    stream guard needs to stop a stream at the hold."""

    hold_id: uuid.UUID
    subject_id: str  # the account that pays (the requester, or its team)
    rate: Decimal  # credits per USD of list price (tier markup x power level)
    power_level: str
    service: Service
    # on a key the user brought: the share of the cost charged (the usage event still records
    # the full cost); None on the operator's or a provisioned key
    byok_fee: Decimal | None = None
    tier: str = ""  # the paying account's tier when the hold was taken (its token limit)
    account_id: str = ""  # the account the request was made for (a member, or the payer itself)
    held: int = 0  # micro-credits held
    prompt_tokens: int = 0  # as counted before the call
    prompt_usd: Decimal = Decimal(0)  # the prompt at its highest rate
    output_usd: Decimal = Decimal(0)  # one output token at its highest rate
    # the output limit the request went out with when the hold was clamped, and what it asked
    max_tokens: int | None = None
    requested_max_tokens: int | None = None
    service_tier: str | None = None  # the service tier the request asked for
    started: float = 0.0  # when the hold was taken (UTC epoch seconds): the moment prices apply
    # a transcription's audio seconds as held: charged when the response reports no duration
    audio_seconds: Decimal | None = None

    @property
    def requester(self) -> str:
        return self.account_id or self.subject_id

    @property
    def started_at(self) -> datetime:
        return datetime.fromtimestamp(self.started, timezone.utc)


_DECIMALS = frozenset(f.name for f in fields(HoldClaim) if f.type in ("Decimal", "Decimal | None"))


_FIELDS = tuple(f.name for f in fields(HoldClaim))


def _encode(value: Any) -> Any:
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    return value


class HoldSigner:
    """Signs hold claims so that only this process's pre-call hook can mint them."""

    def __init__(self, key: bytes | None = None, *, remember: int = 4096) -> None:
        self._key = key or secrets.token_bytes(32)
        # a request's claim is read by several hooks (the headers, the stream guard, success,
        # failure): the claims this process signed or verified last are kept by their token, so
        # a claim is checked and parsed at most once, and not at all while its request is among
        # the last ``remember`` this process held for (a token found here is one this signer
        # made or checked: a forged one never is)
        self._verified: OrderedDict[str, HoldClaim] = OrderedDict()
        self._remember = remember

    def sign(self, claim: HoldClaim) -> str:
        # field by field, not astuple (which deep-copies every value: a third of this call's time)
        body = orjson.dumps([_encode(getattr(claim, name)) for name in _FIELDS])
        mac = hmac.digest(self._key, body, "sha256")
        token = base64.urlsafe_b64encode(body).decode() + "." + base64.urlsafe_b64encode(mac).decode()
        self._keep(token, claim)
        return token

    def verify(self, token: Any) -> HoldClaim | None:
        if not isinstance(token, str) or "." not in token:
            return None
        claim = self._verified.get(token)  # only a token signed or verified here is found
        if claim is None:
            claim = self._check(token)
            if claim is not None:
                self._keep(token, claim)
        return claim

    def _keep(self, token: str, claim: HoldClaim) -> None:
        self._verified[token] = claim
        if len(self._verified) > self._remember:
            self._verified.popitem(last=False)

    def _check(self, token: str) -> HoldClaim | None:
        try:
            body_b64, mac_b64 = token.split(".", 1)
            body = base64.urlsafe_b64decode(body_b64)
            mac = base64.urlsafe_b64decode(mac_b64)
        except (ValueError, TypeError):
            return None
        if not hmac.compare_digest(mac, hmac.digest(self._key, body, "sha256")):
            return None
        values = dict(zip(_FIELDS, json.loads(body), strict=True))
        values["hold_id"] = uuid.UUID(values["hold_id"])
        for name in _DECIMALS:
            if values[name] is not None:
                values[name] = Decimal(values[name])
        return HoldClaim(**values)


__all__ = ["HoldClaim", "HoldSigner"]
