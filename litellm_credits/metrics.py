"""Prometheus metrics: what an operator watches on a dashboard and alerts on.

Every metric lives in ``prometheus_client``'s default registry, so LiteLLM's own ``/metrics``
(its ``prometheus`` callback) shows them beside its own; the plugin also serves them at
``GET /api/v1/admin/credits/metrics`` (:func:`render`). With several workers, set
``PROMETHEUS_MULTIPROC_DIR`` before the proxy starts: each worker then writes its samples to that
directory and a scrape of any worker reads all of them (``prometheus_client`` chooses how values
are stored when it is imported, so the variable must be in the environment the workers start with).

Labels stay bounded: never an account id (one series per account would grow without end and a
scrape would publish who spends what), a model group only when the proxy or ``credits.yaml``
configures it, a tier only from ``credits.yaml``; anything else is ``other`` (:class:`LabelBounds`).
Amounts are integer micro-credits (1 credit = 1,000,000), as in the ledger.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric

from .money import PLACES

log = logging.getLogger("litellm_credits.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# read once, as prometheus_client does when it is imported: it decides where values are kept
# (and, like it and LiteLLM, also under the older lower-case name)
MULTIPROC_DIR = os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()) or None
if MULTIPROC_DIR is not None:
    os.makedirs(MULTIPROC_DIR, exist_ok=True)  # each metric made below opens its file there
OTHER = "other"
# seconds: from half a millisecond (a cached read) to a few seconds (a ledger under strain)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MICRO = f"micro-credits (1 credit = {10**PLACES:,} micro-credits)"

# -- requests and holds ------------------------------------------------------------------------

HOLDS_TAKEN = Counter(
    "litellm_credits_holds_taken",
    "Holds taken; kind=clamped: the worst case did not fit and the hold covers a lowered output limit",
    ["kind"],
)
HOLDS_REFUSED = Counter(
    "litellm_credits_requests_refused",
    "LLM requests the pre-call hook refused, by reason "
    "(insufficient, cap, member_cap, rate_limited, disabled, no_account, invalid, unavailable, other)",
    ["reason"],
)
SETTLEMENTS = Counter("litellm_credits_settlements", "Holds settled with their actual cost")
VOIDS = Counter(
    "litellm_credits_voids",
    "Holds released without a charge: a failed call, or a request refused after its hold "
    "(a rate limit, a team mismatch)",
)
EXPIRIES = Counter(
    "litellm_credits_expiries", "Holds the sweeper resolved past their TTL, by expiry policy", ["policy"]
)
CHARGED = Counter(
    "litellm_credits_charged_microcredits",
    f"Credits debited for LLM calls, in {MICRO}",
    ["tier", "model_group", "service"],
)
CREDITED = Counter(
    "litellm_credits_credited_microcredits",
    f"Credits added to accounts (allocations, top-ups, coupons, refunds), in {MICRO}",
    ["type"],
)
HOLD_SECONDS = Histogram(
    "litellm_credits_hold_seconds", "Time to take a hold in the ledger", buckets=LATENCY_BUCKETS
)
SETTLE_SECONDS = Histogram(
    "litellm_credits_settle_seconds", "Time to settle a hold in the ledger", buckets=LATENCY_BUCKETS
)
PRE_CALL_SECONDS = Histogram(
    "litellm_credits_pre_call_seconds",
    "Time the pre-call hook adds to an LLM request (pricing, hold, limits)",
    buckets=LATENCY_BUCKETS,
)

# -- the process -------------------------------------------------------------------------------

# seconds each garbage collection of the process stopped it for, by generation (heap.py)
GC_PAUSE_SECONDS = Histogram(
    "litellm_credits_gc_pause_seconds",
    "Time Python's garbage collector stopped the process, by generation (2: a full collection)",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

# -- ledger, cache, Redis, rate limits -----------------------------------------------------------

LEDGER_RETRIES = Counter(
    "litellm_credits_ledger_retries", "Ledger statements run again after a transient database error"
)
LEDGER_BATCH_SIZE = Histogram(
    "litellm_credits_ledger_batch_size",
    "Items per ledger statement under group commit, by kind: hold, or resolve (settle, void, expiry)",
    ["kind"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
LEDGER_ERRORS = Counter(
    "litellm_credits_ledger_errors", "Ledger statements given up on: the database stayed unavailable"
)
CACHE_READS = Counter(
    "litellm_credits_cache_reads",
    "Cache reads by result: hit_local (process memory), hit_redis, miss (read from PostgreSQL), "
    "bypass (Redis down or behind: read from PostgreSQL without caching)",
    ["result"],
)
CACHE_INVALIDATIONS = Counter(
    "litellm_credits_cache_invalidations",
    "Cache entries invalidated; deferred=true: Redis was down, replayed once it answers",
    ["deferred"],
)
REDIS_FAULTS = Counter(
    "litellm_credits_redis_faults",
    "Redis calls skipped: kind=error (failed or timed out), kind=busy (every pooled connection in use)",
    ["kind"],
)
RATE_LIMITED = Counter("litellm_credits_rate_limited", "Requests refused with a 429 by a rate limit")
RATELIMIT_FALLBACKS = Counter(
    "litellm_credits_ratelimit_local_fallbacks",
    "Rate limits checked in this process only, Redis being down",
)

# -- background work ---------------------------------------------------------------------------

SWEEPER_RUNS = Counter(
    "litellm_credits_sweeper_runs", "Runs of the hold and grant expiry sweeper, by result", ["result"]
)
WEBHOOK_DELIVERIES = Counter(
    "litellm_credits_webhook_deliveries",
    "Alert webhook delivery attempts, by result (delivered, failed)",
    ["result"],
)

# -- sampled from the database (metrics_sampler.py): one value for all workers -------------------

OPEN_HOLDS = Gauge(
    "litellm_credits_open_holds",
    "Holds open now (sampled from the database)",
    multiprocess_mode="livemostrecent",
)
HELD_MICROCREDITS = Gauge(
    "litellm_credits_held_microcredits",
    f"Credits held by open holds, in {MICRO} (sampled from the database)",
    multiprocess_mode="livemostrecent",
)
ACCOUNTS = Gauge(
    "litellm_credits_accounts",
    "Credit accounts by status (sampled from the database)",
    ["status"],
    multiprocess_mode="livemostrecent",
)

SAMPLED_AT = Gauge(
    "litellm_credits_gauges_sampled_timestamp_seconds",
    "When the gauges above were last read from the database (Unix time): alert when it lags",
    multiprocess_mode="livemax",
)

# children made once: the hot path only increments
HELD_FULL = HOLDS_TAKEN.labels(kind="full")
HELD_CLAMPED = HOLDS_TAKEN.labels(kind="clamped")
CACHE_HIT_LOCAL = CACHE_READS.labels(result="hit_local")
CACHE_HIT_REDIS = CACHE_READS.labels(result="hit_redis")
CACHE_MISS = CACHE_READS.labels(result="miss")
CACHE_BYPASS = CACHE_READS.labels(result="bypass")
CACHE_INVALIDATED = CACHE_INVALIDATIONS.labels(deferred="false")
CACHE_INVALIDATION_DEFERRED = CACHE_INVALIDATIONS.labels(deferred="true")
REDIS_ERRORS = REDIS_FAULTS.labels(kind="error")
REDIS_BUSY = REDIS_FAULTS.labels(kind="busy")
WEBHOOK_DELIVERED = WEBHOOK_DELIVERIES.labels(result="delivered")
WEBHOOK_FAILED = WEBHOOK_DELIVERIES.labels(result="failed")

# the error types behind a refusal, by the reason label they count under
REFUSAL_REASONS: dict[str, str] = {
    "insufficient_credits": "insufficient",
    "team_insufficient_credits": "insufficient",
    "monthly_cap_exceeded": "cap",
    "daily_cap_exceeded": "cap",
    "request_cap_exceeded": "cap",
    "team_cap_exceeded": "cap",
    "member_cap_exceeded": "member_cap",
    "rate_limited": "rate_limited",
    "account_disabled": "disabled",
    "account_not_found": "no_account",
    "service_unavailable": "unavailable",
    "invalid_request": "invalid",
    "model_not_found": "invalid",
    "model_not_priced": "invalid",
    "cost_not_bounded": "invalid",
    "team_mismatch": "invalid",
}
_REFUSED = {reason: HOLDS_REFUSED.labels(reason=reason) for reason in {*REFUSAL_REASONS.values(), OTHER}}


def count_refusal(error_type: str) -> None:
    """Count an LLM request refused with the credits error ``error_type``."""
    _REFUSED[REFUSAL_REASONS.get(error_type, OTHER)].inc()


# -- bounded labels ----------------------------------------------------------------------------

SERVICES = frozenset(("chat", "embedding", "image", "audio_speech", "audio_transcription", "other"))
# however many model groups a proxy configures, no more series than this per metric
MAX_MODEL_GROUPS = 500


class LabelBounds:
    """The label values an operator configured; any other value is ``other``.

    A client chooses the model name it sends, and a wildcard route would pass any of them on: only
    the names the configuration lists may become label values.

        >>> bounds = LabelBounds(["free", "pro"], lambda: ["gpt-4o"])
        >>> bounds.tier("pro"), bounds.tier("vip"), bounds.model_group("gpt-4o"), bounds.model_group("x")
        ('pro', 'other', 'gpt-4o', 'other')
    """

    def __init__(
        self,
        tiers: Iterable[str],
        model_groups: Callable[[], Iterable[str]],
        *,
        refresh_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tiers = frozenset(tiers)
        self._source = model_groups
        self._refresh = refresh_seconds
        self._clock = clock
        self._groups: frozenset[str] = frozenset()
        self._read_at: float | None = None

    def tier(self, name: str | None) -> str:
        return name if name is not None and name in self._tiers else OTHER

    def service(self, name: str | None) -> str:
        return name if name is not None and name in SERVICES else OTHER

    def model_group(self, name: str | None) -> str:
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self._refresh:
            self._read_at = now  # (the model list can change at run time: models added by API)
            names = sorted({n for n in self._source() if isinstance(n, str) and "*" not in n})
            self._groups = frozenset(names[:MAX_MODEL_GROUPS])
        return name if name is not None and name in self._groups else OTHER


def count_charge(
    bounds: LabelBounds, amount: int, *, tier: str | None, model_group: str | None, service: str | None
) -> None:
    """Count ``amount`` micro-credits charged for a call. Called after the charge committed: it
    never raises (a metric must not turn a committed charge into an error, nor a retry)."""
    if amount <= 0:
        return
    try:
        labels = bounds.tier(tier), bounds.model_group(model_group), bounds.service(service)
        CHARGED.labels(*labels).inc(amount)
    except Exception:
        log.debug("litellm-credits: counting a charge failed", exc_info=True)


def count_credited(type: str, amount: int, bonus: int = 0) -> None:
    """Count credits a committed write added: ``amount`` of ``type``, and the bonus of a percent
    coupon it paid (a ``coupon`` row). Never for a replay: the first run counted them."""
    if amount > 0:
        CREDITED.labels(type=type).inc(amount)
    if bonus > 0:
        CREDITED.labels(type="coupon").inc(bonus)


# -- exposition --------------------------------------------------------------------------------


PREFIX = "litellm_credits_"


class _Ours:
    """Only this plugin's metric families of ``source``: the process (or the multiprocess
    directory) also holds LiteLLM's, whose labels name keys, users and teams, and which LiteLLM
    serves under its own access rule. A scrape of this route must not publish them."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        return (family for family in self._source.collect() if family.name.startswith(PREFIX))


def render() -> tuple[bytes, str]:
    """The text exposition of this plugin's metrics (every worker's, in multiprocess mode), and
    its content type. Blocking: call it in a thread."""
    from .heap import record_pauses  # (heap reports into this module)

    record_pauses()
    if MULTIPROC_DIR is None:
        source: Any = REGISTRY
    else:
        source = multiprocess.MultiProcessCollector(None, path=MULTIPROC_DIR)
    return generate_latest(_Ours(source)), CONTENT_TYPE_LATEST  # type: ignore[arg-type]


# -- this process's counters, for the health route ----------------------------------------------

_LEGACY: dict[str, Any] = {
    "cache_hits_local": CACHE_HIT_LOCAL,
    "cache_hits_redis": CACHE_HIT_REDIS,
    "cache_misses": CACHE_MISS,
    "cache_bypassed": CACHE_BYPASS,
    "cache_invalidations": CACHE_INVALIDATED,
    "cache_invalidations_deferred": CACHE_INVALIDATION_DEFERRED,
    "redis_errors": REDIS_ERRORS,
    "redis_busy": REDIS_BUSY,
    "ratelimit_local_fallbacks": RATELIMIT_FALLBACKS,
    "rate_limited": RATE_LIMITED,
}
COUNTERS = tuple(_LEGACY)


class ProcessCounters:
    """This process's values of the counters the health route lists (``counters``)."""

    def __getitem__(self, name: str) -> int:
        return int(_LEGACY[name]._value.get())

    def snapshot(self) -> dict[str, int]:
        return {name: self[name] for name in COUNTERS}


metrics = ProcessCounters()

__all__ = [
    "COUNTERS",
    "LATENCY_BUCKETS",
    "MULTIPROC_DIR",
    "LabelBounds",
    "ProcessCounters",
    "count_charge",
    "count_credited",
    "count_refusal",
    "metrics",
    "render",
]
