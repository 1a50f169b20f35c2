"""The LiteLLM callback: identity → pricing → ledger, and nothing else.

pre-call   refuse a model the proxy does not route (404), price the worst case, hold it (402
           when it does not fit), pass a signed hold token to the later hooks in
           ``data["metadata"]``; a refusal is logged once, in one line (``refusals.py``);
success    price the actual usage and settle the hold, exactly once;
failure    void the hold.

The hold token is signed with a per-process key, so an id that a client smuggles into its
own metadata is never acted on.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from litellm.integrations.custom_logger import CustomLogger

from .claims import HoldClaim, HoldSigner
from .crypto import EncryptionNotConfigured, Secret
from .deployments import (
    DeploymentLookup,
    RouteCheck,
    deployment_prices,
    is_openrouter,
    proxy_deployments,
    proxy_routes,
)
from .errors import (
    AccountNotFound,
    CreditsError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
)
from .ledger import INVALID_INPUT_ERRORS, UNAVAILABLE_ERRORS
from .pricing import ModelPrice, Usage, max_price, usd_cost, worst_case
from .ratelimit import Rate
from .records import Hold, Quote, Service, UsageRecord
from .refusals import quiet_litellm_logs, refuse
from .runtime import Runtime

log = logging.getLogger("litellm_credits.hooks")

HOLD_KEY = "credits_hold"
MAX_OUTPUT_TOKENS = 10_000_000
MAX_CHOICES = 128
_RETRYABLE: tuple[type[BaseException], ...] = (ServiceUnavailable, *UNAVAILABLE_ERRORS)
POWER_LEVEL_HEADER = "x-power-level"

_SERVICES: dict[str, Service] = {
    "completion": "chat",
    "acompletion": "chat",
    "text_completion": "chat",
    "atext_completion": "chat",
    "responses": "chat",
    "aresponses": "chat",
    "anthropic_messages": "chat",
    "embeddings": "embedding",
    "aembedding": "embedding",
    "image_generation": "image",
    "aimage_generation": "image",
    "speech": "audio_speech",
    "aspeech": "audio_speech",
    "transcription": "audio_transcription",
    "atranscription": "audio_transcription",
}

# how long the tier an account's hold reported is trusted for checking its limits before a hold
TIER_MEMORY_SECONDS = 10.0


def _metadata(data: dict) -> dict:
    """The request's own metadata dict: ``litellm_metadata`` on routes where ``metadata`` is the
    provider's parameter (Responses, Anthropic messages, batches), else ``metadata``."""
    key = "litellm_metadata" if "litellm_metadata" in data else "metadata"
    meta = data.get(key)
    if meta is None:
        meta = data[key] = {}
    if not isinstance(meta, dict):
        raise InvalidRequest(f"{key} must be an object", param=key)
    return meta


def _subject_id(value: Any, param: str) -> str:
    subject = str(value)
    if not 1 <= len(subject) <= 256 or any(ord(ch) < 32 or ord(ch) == 127 for ch in subject):
        raise InvalidRequest("the account id must be 1 to 256 printable characters", param=param)
    return subject


def _choices(data: Mapping[str, Any]) -> int:
    n = data.get("n")
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
        raise InvalidRequest(f"n must be an integer from 1 to {MAX_CHOICES}", param="n")
    return n


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def usage_from_response(response: Any, kwargs: Mapping[str, Any], service: Service) -> Usage:
    """Token and unit counts of a finished call, as the provider (or LiteLLM) reported them."""
    usage = _get(response, "usage")
    prompt_details = _get(usage, "prompt_tokens_details")
    completion_details = _get(usage, "completion_tokens_details")
    images = 0
    characters = 0
    seconds = Decimal(0)
    if service == "image":
        images = len(_get(response, "data") or [])
    elif service == "audio_speech":
        characters = len(str(kwargs.get("input") or ""))
    elif service == "audio_transcription":
        hidden = _get(response, "_hidden_params") or {}
        duration = _get(hidden, "audio_transcription_duration") or _get(response, "duration")
        seconds = Decimal(str(duration)) if duration else Decimal(0)
    return Usage(
        prompt_tokens=int(_get(usage, "prompt_tokens") or 0),
        completion_tokens=int(_get(usage, "completion_tokens") or 0),
        cached_tokens=int(_get(prompt_details, "cached_tokens") or 0),
        cache_creation_tokens=int(_get(usage, "cache_creation_input_tokens") or 0),
        reasoning_tokens=int(_get(completion_details, "reasoning_tokens") or 0),
        images=images,
        input_seconds=seconds,
        characters=characters,
    )


class CreditsHandler(CustomLogger):
    """Holds credits before each call, settles after it, voids on failure."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        deployments: DeploymentLookup = proxy_deployments,
        routes: RouteCheck = proxy_routes,
        signer: HoldSigner | None = None,
    ) -> None:
        super().__init__()
        self.runtime = runtime
        self.deployments = deployments
        self.routes = routes
        self.signer = signer or HoldSigner()
        self._pending: set[asyncio.Task[None]] = set()
        self._provider_models: object = None
        # account -> tier of its last hold here: lets a throttled call be refused before its hold
        self._tiers: dict[str, tuple[str, float]] = {}
        quiet_litellm_logs()

    # identity ----------------------------------------------------------------------------

    def subject_of(self, auth: Any, data: Mapping[str, Any]) -> str | None:
        """The account a request spends from; None for unmetered admin traffic."""
        role = str(_get(auth, "user_role") or "")
        is_admin = role.endswith("proxy_admin") and _get(auth, "user_id") in (None, "default_user_id")
        if is_admin:
            # the master key acting for a customer (a trusted backend) names them in `user`
            user = data.get("user")
            return _subject_id(user, "user") if user else None
        mode = self.runtime.settings.credits.subject
        if mode == "end_user" and (_get(auth, "metadata") or {}).get("credits_role") not in (
            "service",
            "admin",
        ):
            # the end user is whatever the caller says it is: only a trusted backend may say it
            raise PermissionDenied(
                "billing by end user needs a service key (key metadata credits_role: service)"
            )
        subject = {
            "user": _get(auth, "user_id"),
            "team": _get(auth, "team_id"),
            "end_user": _get(auth, "end_user_id") or data.get("user"),
            "key": _get(auth, "token") or _get(auth, "api_key"),
        }[mode]
        if not subject:
            raise PermissionDenied(f"this key has no {mode} to charge credits to")
        return _subject_id(subject, "user")

    # pricing -----------------------------------------------------------------------------

    def _requested_power_level(self, data: dict) -> str | None:
        metadata = _metadata(data)
        if metadata.get("power_level"):
            return str(metadata["power_level"])
        headers = (data.get("proxy_server_request") or {}).get("headers") or {}
        value = headers.get(POWER_LEVEL_HEADER)
        return str(value) if value else None

    def group_price(self, model_group: str, deployments: list[dict[str, Any]] | None = None) -> ModelPrice:
        """The worst price among the deployments a model group may route to."""
        pricing = self.runtime.pricing
        if deployments is None:
            deployments = self.deployments(model_group)
        if not deployments:
            return pricing.price(model_group)
        return max_price(
            pricing.price(model_group, (d.get("litellm_params") or {}).get("model"), deployment_prices(d))
            for d in deployments
        )

    def _prompt_tokens(self, data: Mapping[str, Any], model: str, service: Service) -> int:
        import litellm

        try:
            if data.get("messages"):
                return int(litellm.token_counter(model=model, messages=data["messages"]))
            text = data.get("input") if service in ("embedding", "chat") else data.get("prompt")
            if isinstance(text, list):
                text = " ".join(str(t) for t in text)
            return int(litellm.token_counter(model=model, text=str(text or "")))
        except Exception:
            # a tokenizer failure must not let the request through unpriced
            return len(json.dumps(data.get("messages") or data.get("input") or "", default=str))

    @staticmethod
    def _requested_output(data: Mapping[str, Any]) -> int | None:
        for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            value = data.get(key)
            if value is not None:
                if (
                    not isinstance(value, int)
                    or isinstance(value, bool)
                    or not 0 <= value <= MAX_OUTPUT_TOKENS
                ):
                    raise InvalidRequest(f"{key} must be an integer from 0 to {MAX_OUTPUT_TOKENS}", param=key)
                return value
        return None

    # hooks -------------------------------------------------------------------------------

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict, call_type: Any
    ) -> dict:
        call = str(call_type).rsplit(".", 1)[-1]
        try:
            return await self._pre_call(user_api_key_dict, data, call)
        except CreditsError as err:
            raise self._refusal(err, user_api_key_dict, data, call) from None
        except INVALID_INPUT_ERRORS:
            invalid = InvalidRequest("the request breaks a limit of the credit ledger")
            raise self._refusal(invalid, user_api_key_dict, data, call) from None
        except UNAVAILABLE_ERRORS as exc:
            # fail closed: without the ledger nothing can be held, so nothing is served
            down = ServiceUnavailable("the credit ledger is unavailable; try again")
            cause = f"ledger unavailable: {type(exc).__name__}"
            raise self._refusal(down, user_api_key_dict, data, call, cause=cause) from None

    @staticmethod
    def _refusal(
        err: CreditsError, auth: Any, data: Mapping[str, Any], call: str, cause: str | None = None
    ) -> Exception:
        """The exception that answers with ``err``, logged once; Anthropic's error shape on
        ``/v1/messages``."""
        return refuse(
            err,
            anthropic=call == "anthropic_messages",
            model=data.get("model"),
            user=_get(auth, "user_id"),
            call_id=data.get("litellm_call_id"),
            cause=cause,
        )

    async def _pre_call(self, auth: Any, data: dict, call_type: str) -> dict:
        metadata = _metadata(data)
        metadata.pop(HOLD_KEY, None)  # never carry a client's value forward
        model_group = data.get("model")
        if not model_group:
            return data
        subject = self.subject_of(auth, data)
        if subject is None:
            return data
        service = _SERVICES.get(call_type, "other")
        deployments = self._deployments(str(model_group), data)
        pricing = self.runtime.pricing
        power_level = pricing.power_level(self._requested_power_level(data))
        via_openrouter = is_openrouter(deployments)
        if via_openrouter:
            await self._load_provider_prices()
        price = self.group_price(str(model_group), deployments)
        output = pricing.output_cap(price, self._requested_output(data))
        n = _choices(data)
        if service == "chat":
            output *= n  # every choice is billed
        estimate_usd = worst_case(
            price,
            self._prompt_tokens(data, str(model_group), service),
            output,
            images=n if service == "image" else 0,
            characters=len(str(data.get("input") or "")) if service == "audio_speech" else 0,
        )

        cfg = self.runtime.settings.credits
        own_key = await self._openrouter_key(subject) if via_openrouter else None
        # a key the user brought pays the provider itself: only the configured fee is charged
        byok_fee = cfg.openrouter_byok_fee if own_key is not None and own_key[1] else None
        factor = Decimal(1) if byok_fee is None else byok_fee
        quotes = {}
        for tier in cfg.tiers:
            amount = pricing.to_micro(estimate_usd, pricing.rate(tier, power_level) * factor)
            if amount == 0 and not price.free and factor:
                # a priced call whose cost cannot be bounded up front (audio by duration, say)
                # still needs a paying account: the smallest hold keeps an empty balance out
                amount = 1
            quotes[tier] = Quote(amount, debits=not pricing.is_unlimited(tier))
        ledger = await self.runtime.ledger()
        take = functools.partial(
            ledger.hold_quoted,
            subject,
            quotes,
            default_tier=cfg.default_tier,
            ttl_seconds=cfg.holds.ttl_seconds,
            model=str(model_group),
            power_level=power_level,
        )
        known_tier = self._known_tier(subject)
        if known_tier is not None:  # refused here, a throttled call costs the ledger nothing
            await self._check_limits(subject, known_tier)
        try:
            hold = await take()
        except AccountNotFound:
            # first request of a subject LiteLLM knows: an empty account in the default tier
            await ledger.create_account(
                subject, tier=cfg.default_tier, subject_type=cfg.subject, exist_ok=True
            )
            hold = await take()
        self._learn_tier(subject, hold.tier)
        if hold.tier != known_tier:
            await self._rate_limit(subject, hold, service, str(model_group))
        if own_key is not None:
            # the account's own OpenRouter key: a provisioned one is capped at what the account
            # can pay, a brought one is the user's
            data["api_key"] = own_key[0].reveal()
        rate = pricing.rate(hold.tier, power_level)
        metadata[HOLD_KEY] = self.signer.sign(
            HoldClaim(hold.id, subject, rate, power_level, service, byok_fee, hold.tier)
        )
        return data

    def _deployments(self, model_group: str, data: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The model group's deployments; 404 ``model_not_found`` for a name the proxy does not
        route (a misspelt one, say), which no price could make servable."""
        deployments = self.deployments(model_group)
        # a client sending its own api_key/api_base is routed whatever the model (LiteLLM's
        # route_request), so only the price decides
        if deployments or "api_key" in data or "api_base" in data or self.routes(model_group):
            return deployments
        raise ModelNotFound(
            f"model {model_group!r} does not exist on this proxy; GET /v1/models lists the models "
            "you can use",
            param="model",
            model=model_group,
        )

    def _learn_tier(self, subject: str, tier: str) -> None:
        """Remember the account's tier as its last hold reported it (for the next call's limits)."""
        if len(self._tiers) >= 100_000 and subject not in self._tiers:
            self._tiers.clear()
        self._tiers[subject] = (tier, time.monotonic())

    def _known_tier(self, subject: str) -> str | None:
        """The tier learned in the last few seconds: a changed tier is honoured that soon, and a
        throttled account costs at most one hold (then voided) per that many seconds."""
        known = self._tiers.get(subject)
        if known is None or time.monotonic() - known[1] > TIER_MEMORY_SECONDS:
            return None
        return known[0]

    async def _check_limits(self, subject: str, tier_name: str) -> None:
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

    async def _rate_limit(self, subject: str, hold: Hold, service: Service, model: str) -> None:
        """The limits of the tier the hold reported (first call of an account in this process, or
        its tier changed); a refusal releases the hold."""
        try:
            await self._check_limits(subject, hold.tier)
        except RateLimited:
            ledger = await self.runtime.ledger()
            usage = UsageRecord(service=service, model=model, cost=0, metadata={"error": "rate_limited"})
            await ledger.void(subject, hold.id, usage)
            raise

    async def _load_provider_prices(self) -> None:
        """Before pricing an OpenRouter model group: OpenRouter's own current prices, cached."""
        catalog = await self.runtime.openrouter_catalog()
        if catalog is None:
            return
        try:
            models = await catalog.models()
        except CreditsError as err:  # no list yet: price from the other sources
            log.warning("litellm-credits: OpenRouter prices unavailable (%s)", err.type)
            return
        if models is self._provider_models:
            return  # already loaded
        self._provider_models = models
        self.runtime.pricing.provider_prices.update(
            {
                f"openrouter/{m.id}": ModelPrice(
                    input_cost_per_token=m.prompt,
                    output_cost_per_token=m.completion,
                    free=m.free,
                    source="openrouter",
                )
                for m in models.values()
            }
        )

    async def _openrouter_key(self, subject: str) -> tuple[Secret, bool] | None:
        """The account's OpenRouter key and whether the user brought it; None without one (or
        without encryption configured, when no such keys can exist)."""
        try:
            accounts = await self.runtime.openrouter_accounts()
        except EncryptionNotConfigured:
            return None
        return await accounts.key_and_kind(subject)

    def _claim(self, container: Mapping[str, Any]) -> HoldClaim | None:
        """The signed hold claim in a request's metadata (either name LiteLLM uses for it)."""
        for key in ("metadata", "litellm_metadata"):
            meta = container.get(key)
            if isinstance(meta, Mapping) and HOLD_KEY in meta:
                return self.signer.verify(meta[HOLD_KEY])
        return None

    async def async_log_success_event(
        self, kwargs: dict, response_obj: Any, start_time: datetime, end_time: datetime
    ) -> None:
        params = kwargs.get("litellm_params") or {}
        claim = self._claim(params)
        if claim is None:
            return
        if kwargs.get("stream") and "async_complete_streaming_response" not in kwargs:
            return  # a chunk, not the end of the stream
        try:
            await self._settle(claim, kwargs, response_obj, start_time, end_time)
        except _RETRYABLE:
            # the upstream was paid for: keep trying while the hold lives, outside LiteLLM's
            # 20 s callback timeout (settling is idempotent, so a retry can never charge twice)
            log.warning("litellm-credits: ledger unavailable, will retry settling hold %s", claim.hold_id)
            task = asyncio.get_running_loop().create_task(
                self._settle_later(claim, kwargs, response_obj, start_time, end_time)
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        except Exception:
            # LiteLLM swallows callback errors; the hold stays open for the sweeper
            log.exception("litellm-credits: settling hold %s failed", claim.hold_id)

    async def _settle_later(
        self, claim: HoldClaim, kwargs: dict, response: Any, start: datetime, end: datetime
    ) -> None:
        deadline = time.monotonic() + self.runtime.settings.credits.holds.ttl_seconds
        delay = 0.5
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15.0)
            try:
                await self._settle(claim, kwargs, response, start, end)
            except _RETRYABLE:
                continue
            except Exception:
                log.exception("litellm-credits: settling hold %s failed", claim.hold_id)
                return
            log.info("litellm-credits: hold %s settled after the ledger came back", claim.hold_id)
            return
        log.error("litellm-credits: gave up settling hold %s; the sweeper resolves it", claim.hold_id)

    async def _settle(
        self, claim: HoldClaim, kwargs: dict, response: Any, start: datetime, end: datetime
    ) -> None:
        params = kwargs.get("litellm_params") or {}
        slo = kwargs.get("standard_logging_object") or {}
        model_group = slo.get("model_group") or kwargs.get("model") or ""
        provider = kwargs.get("custom_llm_provider") or slo.get("custom_llm_provider")
        model = (
            f"{provider}/{kwargs.get('model')}" if provider and kwargs.get("model") else kwargs.get("model")
        )
        usage = usage_from_response(response, kwargs, claim.service)
        ledger = await self.runtime.ledger()
        try:
            price = self.runtime.pricing.price(
                model_group,
                model,
                deployment_prices(
                    {
                        "model_info": params.get("model_info"),
                        "litellm_params": params,
                    }
                ),
            )
        except CreditsError:
            price = self.group_price(model_group)
        usd = usd_cost(price, usage)
        cost = self.runtime.pricing.to_micro(usd, claim.rate)
        charge = cost
        if claim.byok_fee is not None:  # the user's own key paid the provider: only the fee
            charge = self.runtime.pricing.to_micro(usd, claim.rate * claim.byok_fee)
        latency = int((end - start).total_seconds() * 1000) if start and end else None
        result = await ledger.settle(
            claim.subject_id,
            claim.hold_id,
            charge,
            UsageRecord(
                service=claim.service,
                model=model_group or model,
                provider=provider,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                reasoning_tokens=usage.reasoning_tokens,
                cost=cost,
                latency_ms=max(latency, 0) if latency is not None else None,
                metadata={
                    "deployment": model,
                    "call_id": kwargs.get("litellm_call_id"),
                    # LiteLLM's own float estimate, kept for audit; never used to charge
                    "litellm_response_cost": str(slo.get("response_cost")),
                    # the exact price in USD (markups included), for reconciling with providers
                    "usd": format(usd.normalize(), "f"),
                    **({"byok": True} if claim.byok_fee is not None else {}),
                },
            ),
        )
        if result is None:
            log.warning(
                "litellm-credits: hold %s was already resolved; usage not charged again", claim.hold_id
            )
            return
        tier = self.runtime.settings.credits.tiers.get(claim.tier)
        tokens = usage.prompt_tokens + usage.completion_tokens
        if tier is not None and tier.tpm is not None and tokens:
            # the call happened: its tokens count even past the limit (the next call waits)
            await self.runtime.limiter.hit(
                claim.subject_id, f"llm_tpm:{claim.tier}", Rate(tier.tpm, 60), tokens, force=True
            )

    async def async_post_call_failure_hook(
        self,
        request_data: dict,
        original_exception: Exception,
        user_api_key_dict: Any,
        traceback_str: Any = None,
    ) -> None:
        claim = self._claim(request_data)
        if claim is None:
            return
        try:
            if self.subject_of(user_api_key_dict, request_data) != claim.subject_id:
                return  # only the caller who took a hold may release it
        except CreditsError:
            return
        try:
            ledger = await self.runtime.ledger()
            await ledger.void(
                claim.subject_id,
                claim.hold_id,
                UsageRecord(
                    service=claim.service,
                    model=request_data.get("model"),
                    cost=0,
                    metadata={"error": type(original_exception).__name__},
                ),
            )
        except Exception:
            log.exception("litellm-credits: voiding hold %s failed", claim.hold_id)


__all__ = ["HOLD_KEY", "CreditsHandler", "HoldClaim", "HoldSigner", "usage_from_response"]
