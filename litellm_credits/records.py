"""The ledger's records: accounts, transactions, holds and what settles them."""

from __future__ import annotations

import json
import uuid
from dataclasses import astuple, dataclass, fields
from datetime import datetime
from typing import Any, Literal

from .money import format_credits

Service = Literal["chat", "embedding", "image", "audio_speech", "audio_transcription", "search", "other"]


_ACCOUNT_TIMES = frozenset({"created_at", "updated_at", "resets_at"})


@dataclass(frozen=True)
class Account:
    subject_id: str
    subject_type: str
    tier: str
    balance: int
    held: int
    monthly_cap: int | None
    month_spend: int
    status: str
    display_name: str | None
    created_at: datetime
    updated_at: datetime
    resets_at: datetime
    parent_id: str | None = None  # the team it spends from (a member), or None
    daily_cap: int | None = None
    request_cap: int | None = None
    day_spend: int = 0

    @property
    def available(self) -> int:
        return self.balance - self.held

    def to_cache(self) -> str:
        """A compact JSON form for the cache (exact: amounts stay integers)."""
        values = [v.isoformat() if isinstance(v, datetime) else v for v in astuple(self)]
        return json.dumps(values, separators=(",", ":"))

    @classmethod
    def from_cache(cls, text: str) -> Account:
        data: dict[str, Any] = {
            f.name: datetime.fromisoformat(v) if f.name in _ACCOUNT_TIMES else v
            for f, v in zip(fields(cls), json.loads(text), strict=True)
        }
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return {
            "user_id": self.subject_id,
            "subject_type": self.subject_type,
            "tier": self.tier,
            "balance": format_credits(self.balance),
            "held": format_credits(self.held),
            "available": format_credits(self.available),
            "monthly_cap": None if self.monthly_cap is None else format_credits(self.monthly_cap),
            "month_spend": format_credits(self.month_spend),
            "month_resets_at": self.resets_at.isoformat(),
            "status": self.status,
            "display_name": self.display_name,
            "created_at": self.created_at.isoformat(),
            "parent_id": self.parent_id,
            "daily_cap": None if self.daily_cap is None else format_credits(self.daily_cap),
            "request_cap": None if self.request_cap is None else format_credits(self.request_cap),
            "day_spend": format_credits(self.day_spend),
        }


@dataclass(frozen=True)
class GrantTerms:
    """The terms of the grant a credit opens (migration 0010); None takes the credit type's
    default: paid (promotional for coupons and bonuses), priority 0, no expiry."""

    category: Literal["paid", "promotional"] | None = None
    priority: int | None = None  # 0-1000; lower burns first
    expires_at: datetime | None = None

    def args(self) -> tuple[str | None, int | None, datetime | None]:
        return self.category, self.priority, self.expires_at

    @classmethod
    def recorded(cls, row: Any) -> GrantTerms:
        """The terms a credit asked for, as its ledger row recorded them."""
        return cls(row["grant_category"], row["grant_priority"], row["grant_expires_at"])


DEFAULT_TERMS = GrantTerms()


@dataclass(frozen=True)
class Transaction:
    id: int
    subject_id: str
    amount: int
    balance_after: int
    type: str
    idempotency_key: str
    description: str | None
    created_at: datetime
    hold_id: uuid.UUID | None = None
    model: str | None = None
    provider: str | None = None
    power_level: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    metadata: dict[str, Any] | None = None
    member_id: str | None = None  # on a team's ledger: the member whose request this was

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.subject_id,
            "member_id": self.member_id,
            "type": self.type,
            "amount": format_credits(self.amount),
            "balance_after": format_credits(self.balance_after),
            "description": self.description,
            "idempotency_key": self.idempotency_key,
            "model": self.model,
            "provider": self.provider,
            "power_level": self.power_level,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "metadata": self.metadata or {},
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class Quote:
    """What a request would hold on one tier: the amount, and whether the tier is debited.

    ``minimum`` is the least a hold that does not fit may take instead (a clamped hold, and the
    request's output limit lowered to what it covers); None refuses what does not fit whole.
    """

    amount: int
    debits: bool = True
    minimum: int | None = None


@dataclass(frozen=True)
class Hold:
    id: uuid.UUID
    subject_id: str  # the account that pays: the requester, or its team
    amount: int
    debits: bool
    expires_at: datetime
    tier: str = ""
    # the hold existed already (its id was replayed): nothing new was held
    replayed: bool = False
    # what a keyed hold was asked for (see ledger_sql.SQL_HOLD); None when not recorded
    request_hash: bytes | None = None
    # what the request's tier quoted; more than ``amount`` when the hold was clamped
    quoted: int | None = None

    @property
    def clamped(self) -> bool:
        return self.quoted is not None and self.amount < self.quoted


@dataclass(frozen=True)
class Settlement:
    balance: int
    charged: int
    transaction_id: int | None


@dataclass(frozen=True)
class UsageRecord:
    """What a resolved hold records in ``usage_events``."""

    service: Service = "chat"
    model: str | None = None
    provider: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost: int | None = None  # full price; defaults to the charge
    latency_ms: int | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class Charge:
    """A charge made outside the proxy; ``replayed`` when its idempotency key was seen before."""

    hold_id: uuid.UUID
    cost: int  # the price at the account's tier
    charged: int  # what was debited (0 on an unlimited tier)
    balance: int
    transaction: Transaction | None
    replayed: bool


__all__ = ["Account", "Charge", "Hold", "Quote", "Service", "Settlement", "Transaction", "UsageRecord"]
