"""The plugin's exceptions, and their one mapping to HTTP.

    CreditsError                      500 internal_error (base; never shown with details)
    ├── AuthenticationError           401 authentication_error
    ├── PermissionDenied              403 permission_denied
    │   ├── AccountDisabled           403 account_disabled
    │   ├── CouponNotApplicable       403 coupon_not_applicable
    │   └── TeamMismatch              403 team_mismatch (a key of another team)
    ├── NotFound                      404 not_found
    │   ├── AccountNotFound           404 account_not_found
    │   ├── CouponNotFound            404 coupon_not_found
    │   └── ModelNotFound             404 model_not_found (not a model this proxy routes)
    ├── Conflict                      409 conflict
    │   ├── AccountExists             409 account_exists
    │   ├── IdempotencyConflict       409 idempotency_conflict
    │   ├── CouponExists              409 coupon_exists
    │   ├── CouponExhausted           409 coupon_exhausted
    │   ├── CouponAlreadyRedeemed     409 coupon_already_redeemed
    │   ├── AccountIsMember           409 account_is_member (credits go to its team)
    │   └── TeamHierarchy             409 team_hierarchy (teams have two levels)
    ├── CouponExpired                 410 coupon_expired
    ├── InvalidRequest                400 invalid_request
    │   ├── ModelNotPriced            400 model_not_priced (a model this proxy routes, no price)
    │   ├── CostNotBounded            400 cost_not_bounded (no price bounds the call up front)
    │   ├── RefundTooLarge            400 refund_exceeds_charge
    │   └── WebhookTargetRefused      400 webhook_target_refused (an address never called)
    ├── PaymentRequired               402 (abstract)
    │   ├── InsufficientCredits       402 insufficient_credits
    │   ├── MonthlyCapExceeded        402 monthly_cap_exceeded
    │   ├── DailyCapExceeded          402 daily_cap_exceeded
    │   ├── RequestCapExceeded        402 request_cap_exceeded
    │   ├── TeamInsufficientCredits   402 team_insufficient_credits (a member's team)
    │   ├── TeamCapExceeded           402 team_cap_exceeded (details.limit)
    │   └── MemberCapExceeded         402 member_cap_exceeded (details.limit)
    ├── RateLimited                   429 rate_limited (with Retry-After)
    └── ServiceUnavailable            503 service_unavailable

Every error renders as an OpenAI-shaped body ``{"error": {"message", "type", "param", "code"}}``;
structured details (balance, required, cap, resets_at) travel under ``error.details``. On
Anthropic's ``/v1/messages`` the same error keeps Anthropic's shape instead (``refusals.py``).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, ClassVar

from .money import format_credits


class CreditsError(Exception):
    """Base class; ``status`` and ``type`` decide the HTTP answer."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = {k: v for k, v in details.items() if v is not None}

    def to_body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": str(self.status),
        }
        if self.details:
            error["details"] = self.details
        return {"error": error}

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers that go with this error's answer."""
        return {}


class AuthenticationError(CreditsError):
    status = 401
    type = "authentication_error"


class PermissionDenied(CreditsError):
    status = 403
    type = "permission_denied"


class AccountDisabled(PermissionDenied):
    type = "account_disabled"


class NotFound(CreditsError):
    status = 404
    type = "not_found"


class AccountNotFound(NotFound):
    type = "account_not_found"


class Conflict(CreditsError):
    status = 409
    type = "conflict"


class AccountExists(Conflict):
    type = "account_exists"


class IdempotencyConflict(Conflict):
    """An idempotency key (or id) that was used before for a different request."""

    type = "idempotency_conflict"

    def __init__(self, message: str = "", *, param: str | None = "idempotency_key", **details: Any) -> None:
        message = message or "idempotency key already used for a different request"
        super().__init__(message, param=param, **details)


class InvalidRequest(CreditsError):
    status = 400
    type = "invalid_request"


class ModelNotPriced(InvalidRequest):
    type = "model_not_priced"


class WebhookTargetRefused(InvalidRequest):
    type = "webhook_target_refused"


class PaymentRequired(CreditsError):
    status = 402
    type = "payment_required"
    # set by the ledger on a refused hold: the most the tightest limit left (micro-credits), and
    # the paying account's tier (what a caller needs to say how much of a request that covers)
    room: int | None = None
    tier: str | None = None


class InsufficientCredits(PaymentRequired):
    type = "insufficient_credits"


class MonthlyCapExceeded(PaymentRequired):
    type = "monthly_cap_exceeded"

    @classmethod
    def for_request(
        cls,
        *,
        cap: int,
        month_spend: int,
        held: int,
        required: int,
        resets_at: datetime,
        **details: Any,
    ) -> MonthlyCapExceeded:
        """The refusal of a hold of ``required`` micro-credits that the monthly cap does not fit.

        The cap bounds this month's spend + open holds + the request. The message says the cap is
        *reached* only when the spend alone is at it; otherwise the request *would exceed* it, and
        the message says how much is left. Amounts are micro-credits; ``details`` (``balance``,
        ``available``) pass through to ``error.details``.
        """
        resets = resets_at.isoformat()
        if month_spend >= cap:
            message = (
                f"monthly cap of {format_credits(cap)} credits reached "
                f"({format_credits(month_spend)} spent this month); it resets at {resets}"
            )
        else:
            left = max(cap - month_spend - held, 0)
            message = (
                f"this request would exceed the monthly cap of {format_credits(cap)} credits: "
                f"{format_credits(required)} required, {format_credits(left)} left this month "
                f"({format_credits(month_spend)} spent, {format_credits(held)} held by calls in "
                f"progress); it resets at {resets}"
            )
        return cls(
            message,
            **details,
            held=format_credits(held),
            required=format_credits(required),
            monthly_cap=format_credits(cap),
            month_spend=format_credits(month_spend),
            resets_at=resets,
        )


class DailyCapExceeded(PaymentRequired):
    type = "daily_cap_exceeded"


class RequestCapExceeded(PaymentRequired):
    type = "request_cap_exceeded"


class TeamInsufficientCredits(PaymentRequired):
    """The member's team has not the credits for the request."""

    type = "team_insufficient_credits"


class TeamCapExceeded(PaymentRequired):
    """A cap of the member's team (``details.limit``: monthly, daily or per_request)."""

    type = "team_cap_exceeded"


class MemberCapExceeded(PaymentRequired):
    """A cap the team set on this member (``details.limit``: monthly, daily or per_request)."""

    type = "member_cap_exceeded"


class CostNotBounded(InvalidRequest):
    """A priced call whose cost nothing bounds before it runs (``unbounded_calls`` allows it)."""

    type = "cost_not_bounded"


class TeamMismatch(PermissionDenied):
    type = "team_mismatch"


class AccountIsMember(Conflict):
    type = "account_is_member"


class TeamHierarchy(Conflict):
    type = "team_hierarchy"


class RefundTooLarge(InvalidRequest):
    type = "refund_exceeds_charge"


class CouponNotFound(NotFound):
    type = "coupon_not_found"


class ModelNotFound(NotFound):
    type = "model_not_found"


class CouponExpired(CreditsError):
    status = 410
    type = "coupon_expired"


class CouponExhausted(Conflict):
    type = "coupon_exhausted"


class CouponAlreadyRedeemed(Conflict):
    type = "coupon_already_redeemed"


class CouponExists(Conflict):
    type = "coupon_exists"


class CouponNotApplicable(PermissionDenied):
    type = "coupon_not_applicable"


class RateLimited(CreditsError):
    status = 429
    type = "rate_limited"

    def __init__(self, message: str, *, retry_after: float, **details: Any) -> None:
        super().__init__(message, retry_after=max(1, math.ceil(retry_after)), **details)

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.details["retry_after"])}


class ServiceUnavailable(CreditsError):
    status = 503
    type = "service_unavailable"


def to_proxy_exception(err: CreditsError, *, anthropic: bool = False) -> Exception:
    """The LiteLLM ``ProxyException`` that makes the proxy answer with this error (in Anthropic's
    error shape when ``anthropic``, for ``/v1/messages``)."""
    from .refusals import to_proxy_exception as render

    return render(err, anthropic=anthropic)


__all__ = [
    "AccountDisabled",
    "AccountExists",
    "AccountIsMember",
    "AccountNotFound",
    "AuthenticationError",
    "Conflict",
    "CostNotBounded",
    "CouponAlreadyRedeemed",
    "CouponExhausted",
    "CouponExists",
    "CouponExpired",
    "CouponNotApplicable",
    "CouponNotFound",
    "CreditsError",
    "DailyCapExceeded",
    "IdempotencyConflict",
    "InsufficientCredits",
    "InvalidRequest",
    "MemberCapExceeded",
    "ModelNotFound",
    "ModelNotPriced",
    "MonthlyCapExceeded",
    "NotFound",
    "PaymentRequired",
    "PermissionDenied",
    "RateLimited",
    "RefundTooLarge",
    "RequestCapExceeded",
    "ServiceUnavailable",
    "TeamCapExceeded",
    "TeamHierarchy",
    "TeamInsufficientCredits",
    "TeamMismatch",
    "WebhookTargetRefused",
    "to_proxy_exception",
]
