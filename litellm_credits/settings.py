"""Settings: connection details from the environment, behaviour from ``credits.yaml``.

Both are read once at start-up into one :class:`Settings` object; request code never reads the
environment.

    >>> s = Settings.load()                     # CREDITS_* variables + the YAML at CREDITS_CONFIG
    >>> s.credits.credits_per_usd
    Decimal('1000')
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from .ledger_batch import DEFAULT_BATCH_LANES, DEFAULT_BATCH_SIZE
from .money import PLACES, parse_credits, to_decimal


def _credits(value: Any) -> Decimal:
    return Decimal(parse_credits(value)).scaleb(-PLACES)


# a price or a rate (E notation allowed: prices per token are tiny)
Dec = Annotated[Decimal, BeforeValidator(to_decimal)]
# an amount of credits, by the grammar of every money input (money.parse_credits)
CreditsAmount = Annotated[Decimal, BeforeValidator(_credits)]
PowerLevel = Literal["eco", "balanced", "precision"]
WhenShort = Literal["refuse", "clamp"]
POWER_LEVELS: tuple[PowerLevel, ...] = ("eco", "balanced", "precision")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TierAlertsConfig(_Strict):
    """A tier's default alert thresholds (an account may set its own)."""

    # balance.low below each of these balances (credits)
    balance_below: tuple[CreditsAmount, ...] = ()
    # monthly_cap.reached at each of these percentages of the account's monthly cap
    monthly_cap_percent: tuple[Annotated[int, Field(gt=0, le=1000)], ...] = (80, 100)


class TierConfig(_Strict):
    """A pricing tier: ``markup`` is a fraction added to every charge (0.1 = +10 %)."""

    markup: Dec = Decimal(0)
    unlimited: bool = Field(False, description="record usage at full cost, never debit")
    # per-account limits on LLM calls (None = no limit): requests and tokens per minute
    rpm: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    # a request whose worst case does not fit: hold what is left and lower its output limit to
    # what that covers (clamp), or refuse it with 402 (refuse); a key's metadata may override
    when_short: WhenShort = "clamp"
    alerts: TierAlertsConfig = Field(default_factory=TierAlertsConfig)

    @model_validator(mode="after")
    def _check(self) -> TierConfig:
        if self.markup < 0:
            raise ValueError("markup cannot be negative")
        return self


class ModelPriceConfig(_Strict):
    """Per-model override; any price left out falls back to the deployment or LiteLLM's map."""

    input_cost_per_token: Dec | None = None
    output_cost_per_token: Dec | None = None
    cache_read_input_token_cost: Dec | None = None
    cache_creation_input_token_cost: Dec | None = None
    output_cost_per_reasoning_token: Dec | None = None
    input_cost_per_image: Dec | None = None
    output_cost_per_image: Dec | None = None
    input_cost_per_second: Dec | None = None
    output_cost_per_second: Dec | None = None
    input_cost_per_character: Dec | None = None
    max_output_tokens: int | None = Field(None, gt=0)
    free: bool = False


class HoldConfig(_Strict):
    ttl_seconds: int = Field(900, ge=5, le=86_400)
    # what happens to a hold nobody settled: release it, or charge its estimate
    expiry_policy: Literal["void", "capture"] = "void"
    sweep_interval_seconds: float = Field(30.0, gt=0)
    sweep_batch: int = Field(500, gt=0)


class AlertsConfig(_Strict):
    """Alert webhooks (see ``webhooks.py``)."""

    # call endpoints on private and loopback addresses (link-local and metadata ones: never)
    allow_private_targets: bool = False
    # a failing delivery is retried, with doubling delays, for this long after its first attempt
    retry_hours: float = Field(24.0, gt=0)
    base_delay_seconds: float = Field(5.0, gt=0)
    max_delay_seconds: float = Field(3600.0, gt=0)
    timeout_seconds: float = Field(10.0, gt=0)
    # how often each proxy process looks at the outbox
    dispatch_interval_seconds: float = Field(2.0, gt=0)
    # grant.expiring is raised this many days before a grant with credit left expires
    expiring_notice_days: int = Field(7, ge=1, le=365)
    # after a rotation, the previous secret signs too for this long
    secret_overlap_hours: float = Field(24.0, ge=0)


class TopupConfig(_Strict):
    """Paid top-ups through Stripe Checkout (``topups.py``)."""

    currency: str = Field("usd", pattern=r"^[a-z]{3}$")
    # credits one currency unit buys (default: credits_per_usd)
    credits_per_unit: Dec | None = None
    minor_units: int = Field(100, ge=1, le=1000, description="cents in a unit")
    # in credits (at the default 1000 credits a dollar: 1 to 1000 dollars)
    min_amount: CreditsAmount = Decimal(1000)
    max_amount: CreditsAmount = Decimal(1_000_000)
    success_url: str = "http://127.0.0.1:4000/topups/done"
    cancel_url: str = "http://127.0.0.1:4000/topups/cancelled"
    # a webhook's Stripe-Signature older than this is a replay
    tolerance_seconds: int = Field(300, ge=1, le=3600)


class RateLimit(_Strict):
    """``requests`` per ``per_seconds`` for each account (a full window's worth may come at once)."""

    requests: int = Field(gt=0)
    per_seconds: float = Field(60.0, gt=0)


class RateLimitsConfig(_Strict):
    """Per-account limits on the credits API (admins are never limited).

    ``api`` counts every route a user calls for their account; ``api_charge``, stricter, counts
    the routes that move money (deduct, calculate-and-deduct: per account charged, whichever
    service calls) or guess codes (coupon redemption).
    """

    api: RateLimit | None = RateLimit(requests=120)
    api_charge: RateLimit | None = RateLimit(requests=60)


class CacheConfig(_Strict):
    ttl_seconds: float = Field(60.0, ge=0, description="0 turns the cache off")
    analytics_ttl_seconds: float = Field(30.0, ge=0)
    max_entries: int = Field(100_000, gt=0, description="entries kept in each process's memory")


class MetricsConfig(_Strict):
    """Prometheus metrics (``metrics.py``), served at ``GET /api/v1/admin/credits/metrics``."""

    # serve them without a key (a scraper on a private network); else only to admins
    public: bool = False
    # how often each process reads open holds and accounts from the database for the gauges;
    # 0: never (the gauges stay unset in this process)
    sample_seconds: float = Field(15.0, ge=0)

    @field_validator("sample_seconds")
    @classmethod
    def _at_least_a_second(cls, value: float) -> float:
        if 0 < value < 1:
            raise ValueError("sample_seconds is 0 (off) or at least 1")
        return value


def _default_power_levels() -> dict[PowerLevel, Decimal]:
    return {"eco": Decimal("0.5"), "balanced": Decimal(1), "precision": Decimal(2)}


class CreditsConfig(_Strict):
    """The contents of ``credits.yaml``."""

    # who pays: the key's user, its team, the end user a trusted backend names, the key itself,
    # or (team_member) the key's user out of the key's team's credits, within the user's caps
    subject: Literal["user", "team", "team_member", "end_user", "key"] = "user"
    credits_per_usd: Dec = Decimal(1000)
    default_tier: str = "free"
    tiers: dict[str, TierConfig] = Field(default_factory=lambda: {"free": TierConfig()})
    power_levels: dict[PowerLevel, Dec] = Field(default_factory=_default_power_levels)
    default_power_level: PowerLevel = "balanced"
    default_max_output_tokens: int = Field(4096, gt=0)
    # a clamped request keeps at least this many output tokens (per choice); below it: 402
    min_output_tokens: int = Field(256, gt=0)
    # a transcription whose audio header states no duration is held for this many seconds
    max_audio_seconds: int = Field(3600, gt=0)
    # credits held for a priced call whose cost nothing bounds up front (speech priced per
    # second of output, say); unset: such calls are refused with cost_not_bounded
    unbounded_hold: CreditsAmount | None = None
    models: dict[str, ModelPriceConfig] = Field(default_factory=dict)
    unknown_model_price: ModelPriceConfig | None = None
    free_model_suffixes: tuple[str, ...] = (":free",)
    # margin on paid openrouter/* models (0.1 = +10 %); free ones always cost 0
    openrouter_markup: Dec = Decimal("0.10")
    # share of the price charged when the account uses its own OpenRouter key (0 = metered only)
    openrouter_byok_fee: Dec = Decimal(0)
    # how often each proxy process re-caps provisioned OpenRouter keys at the accounts' balances
    openrouter_sync_interval_seconds: float = Field(300.0, gt=0)
    holds: HoldConfig = Field(default_factory=HoldConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    topups: TopupConfig = Field(default_factory=TopupConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    rate_limits: RateLimitsConfig = Field(default_factory=RateLimitsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    max_amount: CreditsAmount = Decimal(1_000_000_000)
    # other origins (scheme://host[:port]) whose pages may change credits with a browser session
    allowed_origins: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> CreditsConfig:
        if self.credits_per_usd <= 0:
            raise ValueError("credits_per_usd must be positive")
        if self.unbounded_hold is not None and self.unbounded_hold <= 0:
            raise ValueError("unbounded_hold must be positive (leave it out to refuse such calls)")
        if self.default_tier not in self.tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not in tiers")
        missing = [p for p in POWER_LEVELS if p not in self.power_levels]
        if missing:
            raise ValueError(f"power_levels is missing {missing}")
        eco, bal, pre = (self.power_levels[p] for p in POWER_LEVELS)
        if not (0 < eco < bal < pre):
            raise ValueError("power level multipliers must satisfy 0 < eco < balanced < precision")
        return self

    @classmethod
    def from_yaml(cls, path: Path | None) -> CreditsConfig:
        if path is None:
            return cls()
        data: Any = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return cls.model_validate(data.get("credits", data))


# where ``make serve`` keeps the embedded database, in the checkout (Makefile: CREDITS_DATA_DIR)
CHECKOUT_DATA_DIR = ".credits-data"


def _default_data_dir() -> Path:
    """The ``.credits-data`` of the checkout this runs in (the nearest directory, from here up,
    holding it and ``litellm_config.yaml``), so that the CLI finds the database ``make serve``
    made; else the user data directory."""
    user_dir = platformdirs.user_data_path("litellm-credits")
    try:
        here = Path.cwd()
    except OSError:  # a working directory deleted under us
        return user_dir
    for directory in (here, *here.parents):
        if (directory / CHECKOUT_DATA_DIR).is_dir() and (directory / "litellm_config.yaml").is_file():
            return directory / CHECKOUT_DATA_DIR
    return user_dir


class Settings(BaseSettings):
    """Process settings from ``CREDITS_*`` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix="CREDITS_", extra="ignore", frozen=True, populate_by_name=True
    )

    database_url: str | None = Field(None, description="PostgreSQL DSN; embedded server when unset")
    redis_url: str | None = Field(
        None, description="Redis for the cache and rate limits; in-process when unset"
    )
    redis_prefix: str = Field("credits", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    # a Redis call slower than this counts as a failure (then Redis is left alone for a moment)
    redis_timeout_seconds: float = Field(0.25, gt=0)
    redis_retry_seconds: float = Field(2.0, gt=0)
    # Fernet keys for secrets at rest, comma-separated, the current one first
    encryption_keys: SecretStr | None = None
    # Stripe, for paid top-ups: the secret API key, the webhook endpoint's signing secret (whsec_),
    # and the API's address (a local fake in tests)
    stripe_secret_key: SecretStr | None = None
    stripe_webhook_secret: SecretStr | None = None
    stripe_api_base: str | None = None
    openrouter_base_url: str = "https://openrouter.ai/api/v1"
    # the operator's OpenRouter provisioning (management) key
    openrouter_provisioning_key: SecretStr | None = None
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="embedded PostgreSQL data: the checkout's .credits-data if any, else the user data dir",
    )
    config_path: Path | None = Field(None, alias="CREDITS_CONFIG")
    auto_migrate: bool = True
    db_pool_min: int = Field(2, ge=1)
    db_pool_max: int = Field(20, ge=1)
    # holds (and settlements) issued concurrently go to PostgreSQL in batches of at most this many
    db_batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, le=10_000)
    # batches of each kind (holds; settlements) in flight at once, items spread by account
    db_batch_lanes: int = Field(DEFAULT_BATCH_LANES, ge=1, le=64)
    sweeper: bool = True
    # on the first LLM request, move what start-up left on the heap out of the garbage
    # collector's walk (heap.freeze_once): full collections of LiteLLM's heap stop the proxy for
    # 0.3 to 0.9 s each; frozen, 11 to 26 ms
    gc_freeze: bool = True
    credits: CreditsConfig = Field(default_factory=CreditsConfig, exclude=True)

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """``CREDITS_REDIS_URL=`` (set, but empty) means unset: the cache in process."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url", mode="before")
    @classmethod
    def _empty_is_a_mistake(cls, value: Any) -> Any:
        """An empty database URL is refused: a deployment whose secret did not render would
        otherwise run an embedded database of its own on each host (a ledger per host)."""
        if isinstance(value, str) and not value.strip():
            raise ValueError("CREDITS_DATABASE_URL is set but empty; unset it for the embedded database")
        return value

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        base = cls(**overrides)
        path = base.config_path
        if path is None and Path("config/credits.yaml").is_file():
            path = Path("config/credits.yaml")
        if "credits" in overrides:
            return base
        return base.model_copy(update={"credits": CreditsConfig.from_yaml(path), "config_path": path})


__all__ = [
    "POWER_LEVELS",
    "CacheConfig",
    "CreditsConfig",
    "HoldConfig",
    "MetricsConfig",
    "ModelPriceConfig",
    "PowerLevel",
    "RateLimit",
    "RateLimitsConfig",
    "Settings",
    "TierConfig",
    "WhenShort",
]
