"""Request and response bodies of the credits API."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, model_validator

from ..history import PeriodError, instant
from ..money import AmountError, JSONNumber, format_credits, parse_credits
from ..records import GrantTerms
from .grant_schemas import GrantSummary

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SUBJECT = re.compile(r"^[A-Za-z0-9._:@+\-]{1,256}$")


def _amount(value: Any) -> int:
    """Micro-credits of an amount in a request body, by :func:`~litellm_credits.money.parse_credits`'s
    grammar (a decimal string such as "12.50", or a JSON number).

    The credits routes keep a JSON number with a fraction as written (a ``JSONNumber``, never a
    float), and the grammar judges that text: ``12.5`` is fine, ``1e2`` is not.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float | JSONNumber):
        raise ValueError('amount must be a decimal string such as "12.50"')
    try:
        return parse_credits(value)
    except AmountError as exc:
        raise ValueError(str(exc)) from None


def _moment(value: datetime) -> datetime:
    """A date-time PostgreSQL and Python can both hold, in UTC (no offset means UTC)."""
    try:
        return instant(value, "expires_at")
    except PeriodError as exc:
        raise ValueError(exc.message) from None


def _positive(value: int) -> int:
    if value <= 0:
        raise ValueError("amount must be greater than zero")
    return value


def _non_negative(value: int) -> int:
    if value < 0:
        raise ValueError("amount cannot be negative")
    return value


def _text(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("control characters are not allowed")
    return value


def _subject(value: str) -> str:
    if not _SUBJECT.match(value):
        raise ValueError("user_id may contain letters, digits and . _ : @ + - (1 to 256 characters)")
    return value


# An amount of credits in micro-credits, written in the API as a decimal string.
PositiveAmount = Annotated[int, BeforeValidator(_amount), AfterValidator(_positive)]
NonNegativeAmount = Annotated[int, BeforeValidator(_amount), AfterValidator(_non_negative)]
SubjectId = Annotated[str, AfterValidator(_subject)]
Text = Annotated[str, Field(max_length=500), AfterValidator(_text)]
Tier = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class CreateAccount(_In):
    user_id: SubjectId
    tier: Tier | None = None
    monthly_cap: NonNegativeAmount | None = Field(None, description="credits per calendar month (UTC)")
    display_name: Text | None = None
    parent_id: SubjectId | None = Field(
        None, description="the team this account is a member of: it spends the team's credits"
    )
    daily_cap: NonNegativeAmount | None = Field(None, description="credits per UTC day")
    request_cap: NonNegativeAmount | None = Field(None, description="credits one request may hold")


def _future(value: datetime) -> datetime:
    if value <= datetime.now(timezone.utc):
        raise ValueError("expires_at must be in the future")
    return value


class GrantTermsIn(_In):
    """The grant a credit opens: usage burns grants by priority, then the earliest expiry."""

    category: Literal["paid", "promotional"] | None = Field(
        None, description="default: paid (promotional for a bonus)"
    )
    priority: Annotated[int, Strict()] | None = Field(
        None, ge=0, le=1000, description="lower burns first (0)"
    )
    expires_at: Annotated[datetime, AfterValidator(_moment), AfterValidator(_future)] | None = Field(
        None, description="when what is left of it expires (default: never)"
    )

    def terms(self) -> GrantTerms:
        return GrantTerms(self.category, self.priority, self.expires_at)


class Allocate(GrantTermsIn):
    user_id: SubjectId
    amount: PositiveAmount = Field(description="credits to add, a decimal string with up to 6 places")
    reason: Text | None = None
    type: Literal["allocation", "bonus"] = "allocation"
    idempotency_key: Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_text)] | None = None


class Account(BaseModel):
    user_id: str
    subject_type: str
    tier: str
    balance: str
    held: str
    available: str
    monthly_cap: str | None
    month_spend: str
    month_resets_at: str
    status: str
    display_name: str | None
    created_at: str
    parent_id: str | None = Field(None, description="the team whose credits this account spends")
    daily_cap: str | None = None
    request_cap: str | None = None
    day_spend: str = Field("0.000000", description="spent today (UTC), a team's members' included")


class AccountCreated(Account):
    api_key: str = Field(description="shown once; only its hash is stored")
    key_id: int


class Transaction(BaseModel):
    id: int
    user_id: str
    member_id: str | None = Field(None, description="on a team's ledger: the member whose request it was")
    type: str
    amount: str = Field(description="signed: credits positive, usage negative")
    balance_after: str
    description: str | None
    idempotency_key: str
    model: str | None
    provider: str | None
    power_level: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    metadata: dict[str, Any]
    created_at: str


class Allocated(BaseModel):
    user_id: str
    balance: str
    transaction_id: int
    transaction: Transaction


class TransactionPage(BaseModel):
    items: list[Transaction]
    total: int
    limit: int
    offset: int
    next_before: int | None = Field(None, description="pass as `before` for the next page; null on the last")


class Balance(Account):
    grants: GrantSummary = Field(description="what the balance is made of, and its next expiry")
    recent_transactions: list[Transaction] | None = Field(None, description="with include_history=true")


class UsageTotals(BaseModel):
    requests: int
    succeeded: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    cost: str = Field(description="full price of the usage, in credits")
    charged: str = Field(description="what was debited (0 on unlimited tiers)")


class DailyUsage(UsageTotals):
    date: str


class UsageStats(UsageTotals):
    start: str
    end: str
    daily: list[DailyUsage]


class UsageBreakdown(BaseModel):
    start: str
    end: str
    items: list[dict[str, Any]] = Field(description="usage totals per model, power level or service")


class SetMonthlyCap(_In):
    monthly_cap: NonNegativeAmount | None = Field(
        description="credits per calendar month (UTC); null removes it"
    )


class MonthlyCap(BaseModel):
    user_id: str
    monthly_cap: str | None
    month_spend: str
    held: str
    remaining: str | None
    resets_at: str


# Integers in request bodies are JSON integers: no booleans (``true`` was charged as one token),
# no strings (``"1_000"`` was 1000), no floats
TokenCount = Annotated[int, Strict(), Field(ge=0, le=100_000_000)]


class CalculateCost(_In):
    model: Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_text)]
    prompt_tokens: TokenCount = 0
    completion_tokens: TokenCount = 0
    cached_tokens: TokenCount = 0
    reasoning_tokens: TokenCount = 0
    power_level: Literal["eco", "balanced", "precision"] | None = None


class CostQuote(BaseModel):
    model: str
    cost: str = Field(description="credits, a decimal string")
    usd: str = Field(description="the upstream price in USD, exact")
    power_level: str
    tier: str
    free: bool


Service = Literal["chat", "embedding", "image", "audio_speech", "audio_transcription", "search", "other"]
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_text)]


class Deduct(_In):
    user_id: SubjectId
    amount: PositiveAmount = Field(description="credits to charge, a decimal string")
    idempotency_key: IdempotencyKey = Field(description="the same key never charges twice")
    service: Service = "other"
    model: Annotated[str, Field(max_length=256), AfterValidator(_text)] | None = None
    description: Text | None = None


class CalculateAndDeduct(_In):
    user_id: SubjectId
    idempotency_key: IdempotencyKey
    service: Service
    model: Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_text)]
    prompt_tokens: TokenCount = 0
    completion_tokens: TokenCount = 0
    cached_tokens: TokenCount = 0
    reasoning_tokens: TokenCount = 0
    characters: TokenCount = Field(0, description="text-to-speech input characters")
    seconds: Annotated[int, Strict(), Field(ge=0, le=86_400)] = Field(
        0, description="speech-to-text audio seconds"
    )
    images: Annotated[int, Strict(), Field(ge=0, le=1000)] = 0
    power_level: Literal["eco", "balanced", "precision"] | None = None


class Charged(BaseModel):
    user_id: str
    service: str
    charged: str = Field(description="debited now (0 on unlimited tiers, or on a replay)")
    cost: str = Field(description="the price of the usage")
    balance: str
    transaction_id: int | None
    replayed: bool = Field(description="true when the idempotency key had been used: nothing new was charged")


WhenShortField = Annotated[
    Literal["refuse", "clamp"] | None,
    Field(
        description="what this key's requests do when their worst case does not fit: refuse (402) "
        "or clamp (hold what is left, lower the output limit); unset: the tier decides"
    ),
]


class CreateKey(_In):
    user_id: SubjectId
    role: Literal["user", "service", "admin"] = Field(
        "user", description="service keys may charge accounts; admin keys may do everything"
    )
    name: Annotated[str, Field(max_length=200), AfterValidator(_text)] | None = None
    when_short: WhenShortField = None


class KeyInfo(BaseModel):
    id: int
    user_id: str
    prefix: str
    role: str
    name: str | None
    when_short: str | None = None
    created_at: str
    revoked_at: str | None


class KeyCreated(BaseModel):
    id: int
    user_id: str
    prefix: str
    role: str
    when_short: str | None = None
    api_key: str = Field(description="shown once; only its hash is stored")


class UpdateAccount(_In):
    """Only the fields sent change; a cap of null removes it, ``"parent_id": null`` takes the
    account out of its team."""

    tier: Tier | None = None
    monthly_cap: NonNegativeAmount | None = None
    status: Literal["active", "disabled"] | None = None
    display_name: Text | None = None
    daily_cap: NonNegativeAmount | None = None
    request_cap: NonNegativeAmount | None = None
    parent_id: SubjectId | None = Field(
        None, description="move the account into this team (null: out of its team)"
    )


class MemberCaps(_In):
    """A team member's caps; only the fields sent change, null removes a cap."""

    monthly_cap: NonNegativeAmount | None = Field(None, description="credits per calendar month (UTC)")
    daily_cap: NonNegativeAmount | None = Field(None, description="credits per UTC day")
    request_cap: NonNegativeAmount | None = Field(None, description="credits one request may hold")


class MemberPage(BaseModel):
    team_id: str
    items: list[Account]
    total: int
    limit: int
    offset: int


class AccountPage(BaseModel):
    items: list[Account]
    total: int
    limit: int
    offset: int


class Refund(_In):
    user_id: SubjectId
    transaction_id: Annotated[
        int, Strict(), Field(ge=1, le=2**63 - 1, description="the usage charge to refund")
    ]
    amount: PositiveAmount | None = Field(None, description="default: all that is left to refund")
    reason: Text | None = None
    idempotency_key: IdempotencyKey | None = None


class Refunded(BaseModel):
    user_id: str
    balance: str
    transaction_id: int
    transaction: Transaction


class Grant(_In):
    user_id: SubjectId
    amount: PositiveAmount


class BulkAllocate(GrantTermsIn):
    items: Annotated[list[Grant], Field(min_length=1, max_length=1000)]
    reason: Text | None = None
    type: Literal["allocation", "bonus"] = "allocation"
    idempotency_key: IdempotencyKey | None = None

    @model_validator(mode="after")
    def _unique(self) -> BulkAllocate:
        ids = [g.user_id for g in self.items]
        if len(set(ids)) != len(ids):
            raise ValueError("each user_id may appear once")
        return self


class Granted(BaseModel):
    user_id: str
    amount: str
    balance: str
    transaction_id: int


class BulkAllocated(BaseModel):
    count: int
    total: str
    items: list[Granted]


class SystemAnalytics(UsageTotals):
    start: str
    end: str
    active_accounts: int = Field(description="accounts with usage in the period")
    credited: dict[str, str] = Field(description="credits added in the period, by transaction type")
    accounts: int
    accounts_active: int
    outstanding_balance: str = Field(description="the sum of all balances now")
    held: str


class Spender(BaseModel):
    rank: int
    user_id: str
    charged: str
    cost: str
    requests: int


class TopSpenders(BaseModel):
    start: str
    end: str
    items: list[Spender]


class Bucket(BaseModel):
    range: str = Field(description="balance range in credits, lower bound included")
    accounts: int


class TierDistribution(BaseModel):
    tier: str
    accounts: int
    balance: str
    held: str
    histogram: list[Bucket]


class Distribution(BaseModel):
    tiers: list[TierDistribution]


class Health(BaseModel):
    database: Literal["ok", "unavailable"]
    redis: dict[str, Any] = Field(description="configured, healthy, down_for_seconds")
    cache: dict[str, Any] = Field(description="entries in this process, whether memory is trusted")
    counters: dict[str, int] = Field(description="this process's counters since it started")


class ProvisionOpenRouter(_In):
    user_id: SubjectId


class BringOpenRouterKey(_In):
    key: Annotated[str, Field(pattern=r"^sk-or-[A-Za-z0-9_-]{10,200}$", description="an OpenRouter API key")]


class OpenRouterStatus(BaseModel):
    user_id: str
    key: str = Field(description="the key's last four characters only")
    byok: bool
    credit_limit_usd: str | None = Field(description="the cap set at OpenRouter (provisioned keys)")
    last_synced_at: str | None
    status: str
    openrouter_usage_usd: str | None = Field(description="the key's usage as OpenRouter last reported it")
    openrouter_limit_remaining_usd: str | None = Field(
        description="credit left under the key's limit at OpenRouter (a brought key: the user's own)"
    )
    is_free_tier: bool | None = Field(
        description="OpenRouter's account has bought no credits: free models and its daily allowance only"
    )


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str
    details: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


__all__ = [
    "Account",
    "AccountCreated",
    "AccountPage",
    "Allocate",
    "Allocated",
    "Balance",
    "BringOpenRouterKey",
    "BulkAllocate",
    "BulkAllocated",
    "CalculateAndDeduct",
    "CalculateCost",
    "Charged",
    "CostQuote",
    "CreateAccount",
    "CreateKey",
    "Deduct",
    "Distribution",
    "ErrorBody",
    "Health",
    "KeyCreated",
    "KeyInfo",
    "MonthlyCap",
    "NonNegativeAmount",
    "OpenRouterStatus",
    "PositiveAmount",
    "ProvisionOpenRouter",
    "Refund",
    "Refunded",
    "SetMonthlyCap",
    "SystemAnalytics",
    "TopSpenders",
    "Transaction",
    "TransactionPage",
    "UpdateAccount",
    "UsageBreakdown",
    "UsageStats",
    "format_credits",
]
