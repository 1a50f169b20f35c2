"""The requests and tokens per minute a tier allows an account's LLM calls.

A tier's limits need the account's tier, which only its hold reports. Each process remembers
the tier an account's last hold reported for a few seconds: a call that its limits refuse is
then refused before its hold (it costs the ledger nothing); an account seen for the first time,
or whose tier changed, is checked after its hold, and a refusal releases the hold.
"""

from __future__ import annotations

import time

from .errors import RateLimited
from .ratelimit import Rate
from .records import Hold, UsageRecord
from .runtime import Runtime

# how long the tier an account's hold reported is trusted for checking its limits before a hold
TIER_MEMORY_SECONDS = 10.0


class TierLimits:
    """Checks a tier's rpm and tpm for an account's LLM calls (429 ``rate_limited``)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # account -> tier of its last hold here, and when
        self._tiers: dict[str, tuple[str, float]] = {}

    def learn_tier(self, subject: str, tier: str) -> None:
        """Remember the account's tier as its last hold reported it (for the next call's limits)."""
        if len(self._tiers) >= 100_000 and subject not in self._tiers:
            self._tiers.clear()
        self._tiers[subject] = (tier, time.monotonic())

    def known_tier(self, subject: str) -> str | None:
        """The tier learned in the last few seconds: a changed tier is honoured that soon, and a
        throttled account costs at most one hold (then voided) per that many seconds."""
        known = self._tiers.get(subject)
        if known is None or time.monotonic() - known[1] > TIER_MEMORY_SECONDS:
            return None
        return known[0]

    async def check(self, subject: str, tier_name: str) -> None:
        """The tier's requests and tokens per minute for this account (429 ``rate_limited``).
        Buckets are per tier: a changed tier starts from a full one, and is never counted twice.

        Tokens are counted when a call settles, so here the question is only whether the account
        is in debt.
        """
        tier = self.runtime.settings.credits.tiers.get(tier_name)
        if tier is None or (tier.rpm is None and tier.tpm is None):
            return
        limiter = self.runtime.limiter
        if tier.rpm is not None:
            await limiter.check(subject, f"llm_rpm:{tier_name}", Rate(tier.rpm, 60))
        if tier.tpm is not None:
            await limiter.check(subject, f"llm_tpm:{tier_name}", Rate(tier.tpm, 60), cost=0)

    async def after_hold(self, subject: str, hold: Hold, model: str) -> None:
        """The limits of the tier the hold reported (first call of an account in this process, or
        its tier changed); a refusal releases the hold."""
        try:
            await self.check(subject, hold.tier)
        except RateLimited:
            ledger = await self.runtime.ledger()
            usage = UsageRecord(model=model, cost=0, metadata={"error": "rate_limited"})
            await ledger.void(hold.subject_id, hold.id, usage)
            raise


__all__ = ["TIER_MEMORY_SECONDS", "TierLimits"]
