"""The LiteLLM callback: identity → estimate → hold → call → settle, and nothing else.

pre-call   refuse a model the proxy does not route (404), estimate what the request may cost
           (``estimate.py``), hold it (402 when not even a clamped hold fits; a clamped hold lowers
           the request's output limit to what it covers), pass a signed claim to the later
           hooks in ``data["metadata"]``; a refusal is logged once, in one line (``refusals.py``);
stream     end a chat or text completion stream cleanly at its hold (``stream_guard.py``);
success    price the actual usage and settle the hold, exactly once (``settlement.py``);
failure    void the hold.

The claim is signed with a per-process key, so an id that a client smuggles into its own metadata
is never acted on.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Mapping
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from litellm.integrations.custom_logger import CustomLogger

from . import heap, metrics, token_count
from .claims import HoldClaim, HoldSigner
from .crypto import EncryptionNotConfigured, Secret
from .deployments import (
    DeploymentLookup,
    RouteCheck,
    is_openrouter,
    proxy_deployments,
    proxy_routes,
)
from .errors import (
    AccountNotFound,
    CostNotBounded,
    CreditsError,
    InvalidRequest,
    ModelNotFound,
    PaymentRequired,
    ServiceUnavailable,
    TeamMismatch,
)
from .estimate import Estimate
from .identity import request_metadata, requested_power_level, subject_of, team_of, when_short_of
from .ledger import INVALID_INPUT_ERRORS, UNAVAILABLE_ERRORS, Ledger
from .pricing import ModelPrice
from .quoting import Quoter
from .records import Hold, Quote, Service, UsageRecord
from .refusals import quiet_litellm_logs, refuse
from .runtime import Runtime
from .settlement import Settler, usage_from_response
from .stream_guard import Delivered, StreamGuard
from .tier_limits import TierLimits

log = logging.getLogger("litellm_credits.hooks")

HOLD_KEY = "credits_hold"
MAX_TOKENS_HEADER = "x-credits-max-tokens"

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

# holds whose stream the guard ended (it settles them), remembered this many at most
MAX_CUT_STREAMS = 10_000


class CreditsHandler(CustomLogger):
    """Holds credits before each call, settles after it, voids on failure."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        deployments: DeploymentLookup = proxy_deployments,
        routes: RouteCheck = proxy_routes,
        signer: HoldSigner | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.runtime = runtime
        self.clock = clock  # when a request starts: the moment its prices apply (off-peak windows)
        self.deployments = deployments
        self.routes = routes
        self.signer = signer or HoldSigner()
        self.quoter = Quoter(runtime, deployments)
        self.settler = Settler(runtime, self.group_price)
        self._provider_models: object = None
        self.limits = TierLimits(runtime)
        self._cut: OrderedDict[uuid.UUID, None] = OrderedDict()
        quiet_litellm_logs()

    # identity ----------------------------------------------------------------------------

    def subject_of(self, auth: Any, data: Mapping[str, Any]) -> str | None:
        """The account a request is for; None for unmetered admin traffic."""
        return subject_of(auth, data, self.runtime.settings.credits.subject)

    # pricing -----------------------------------------------------------------------------

    def group_price(self, model_group: str, deployments: list[dict[str, Any]] | None = None) -> ModelPrice:
        """The worst price among the deployments a model group may route to."""
        return self.quoter.group_price(model_group, deployments)

    # hooks -------------------------------------------------------------------------------

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict, call_type: Any
    ) -> dict:
        call = str(call_type).rsplit(".", 1)[-1]
        if self.runtime.settings.gc_freeze:
            heap.freeze_once()  # the first request (the proxy has started); after it, one flag read
        heap.record_pauses()
        try:
            with metrics.PRE_CALL_SECONDS.time():
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
        """The exception that answers with ``err``, logged and counted once; Anthropic's error
        shape on ``/v1/messages``."""
        metrics.count_refusal(err.type)
        return refuse(
            err,
            anthropic=call == "anthropic_messages",
            model=data.get("model"),
            user=getattr(auth, "user_id", None),
            call_id=data.get("litellm_call_id"),
            cause=cause,
        )

    async def _pre_call(self, auth: Any, data: dict, call_type: str) -> dict:
        metadata = request_metadata(data)
        metadata.pop(HOLD_KEY, None)  # never carry a client's value forward
        if not data.get("model"):
            return data
        subject = self.subject_of(auth, data)
        if subject is None:
            return data
        model_group = str(data["model"])
        service = _SERVICES.get(call_type, "other")
        deployments = self._deployments(model_group, data)
        pricing = self.runtime.pricing
        power_level = pricing.power_level(requested_power_level(data))
        via_openrouter = is_openrouter(deployments)
        if via_openrouter:
            await self._load_provider_prices()
        started = self.clock()
        cfg = self.runtime.settings.credits
        estimate: Estimate | None
        try:
            moment = datetime.fromtimestamp(started, timezone.utc)
            scope = token_count.SCOPE.set(subject)  # the prompt's token counts kept for this account
            try:
                estimate = self.quoter.estimate(data, call_type, service, model_group, deployments, moment)
            finally:
                token_count.SCOPE.reset(scope)
        except CostNotBounded:
            if cfg.unbounded_hold is None:
                raise
            estimate = None  # the operator allows it with a fixed hold
        own_key = await self._openrouter_key(subject) if via_openrouter else None
        # a key the user brought pays the provider itself: only the configured fee is charged
        byok_fee = cfg.openrouter_byok_fee if own_key is not None and own_key[1] else None
        factor = Decimal(1) if byok_fee is None else byok_fee
        quotes = self.quoter.quotes(estimate, power_level, factor, when_short_of(auth))
        ledger = await self.runtime.ledger()
        team = team_of(auth, cfg.subject)
        hold = await self._hold(ledger, subject, team, quotes, estimate, model_group, power_level, factor)
        try:
            self._go_out(
                data, metadata, hold, estimate, own_key, subject, service, power_level, byok_fee, started
            )
        except BaseException:
            # nothing may leave a hold behind that no call will end: release it at once
            await ledger.void(hold.subject_id, hold.id, UsageRecord(model=model_group, cost=0))
            raise
        return data

    def _go_out(
        self,
        data: dict,
        metadata: dict,
        hold: Hold,
        estimate: Estimate | None,
        own_key: tuple[Secret, bool] | None,
        subject: str,
        service: Service,
        power_level: str,
        byok_fee: Decimal | None,
        started: float,
    ) -> None:
        """The request as it goes out after its hold: the account's OpenRouter key, the output
        limit a clamped hold covers, and the signed claim for the later hooks."""
        if own_key is not None:
            # the account's own OpenRouter key: a provisioned one is capped at what the account
            # can pay, a brought one is the user's
            data["api_key"] = own_key[0].reveal()
        rate = self.runtime.pricing.rate(hold.tier, power_level)  # type: ignore[arg-type]
        factor = Decimal(1) if byok_fee is None else byok_fee
        max_tokens = None
        if hold.clamped and estimate is not None and estimate.output_params:
            max_tokens = estimate.covered_output_tokens(hold.amount, rate * factor)
            for param in estimate.output_params:
                data[param] = max_tokens
        # the guard stops a stream at what the hold pays for, when the operator pays for it
        guarded = estimate is not None and hold.debits and byok_fee is None and hold.amount > 0
        tier = data.get("service_tier")
        metadata[HOLD_KEY] = self.signer.sign(
            HoldClaim(
                hold.id,
                hold.subject_id,
                rate,
                power_level,
                service,
                byok_fee,
                hold.tier,
                account_id=subject,
                held=hold.amount,
                prompt_tokens=estimate.prompt_tokens if estimate else 0,
                prompt_usd=estimate.prompt_usd if estimate else Decimal(0),
                output_usd=estimate.output_usd if estimate and guarded else Decimal(0),
                max_tokens=max_tokens,
                requested_max_tokens=estimate.requested if estimate else None,
                service_tier=tier if isinstance(tier, str) else None,
                started=started,
                audio_seconds=estimate.seconds if estimate else None,
            )
        )

    async def _hold(
        self,
        ledger: Ledger,
        subject: str,
        team: str | None,
        quotes: dict[str, Quote],
        estimate: Estimate | None,
        model_group: str,
        power_level: str,
        factor: Decimal,
    ) -> Hold:
        """Hold the quote (opening the account on a subject's first request), then check the
        account's rate limits; a refusal says how many output tokens the balance covers."""
        cfg = self.runtime.settings.credits
        take = functools.partial(
            ledger.hold_quoted,
            subject,
            quotes,
            default_tier=cfg.default_tier,
            ttl_seconds=cfg.holds.ttl_seconds,
            model=model_group,
            power_level=power_level,
        )
        known_tier = self.limits.known_tier(subject)
        if known_tier is not None:  # refused here, a throttled call costs the ledger nothing
            await self.limits.check(subject, known_tier)
        try:
            try:
                hold = await take()
            except AccountNotFound:
                # first request of a subject LiteLLM knows: an empty account in the default tier
                # (a key's team's member, when it has a team)
                await self._open_account(ledger, subject, team)
                hold = await take()
        except PaymentRequired as err:
            if estimate is not None and estimate.output_usd > 0 and err.room is not None:
                rate = self.runtime.pricing.rate(err.tier or cfg.default_tier, power_level) * factor  # type: ignore[arg-type]
                covered = estimate.covered_output_tokens(max(err.room, 0), rate)
                err.details.update(
                    covered_output_tokens=covered, min_output_tokens=estimate.min_output_tokens
                )
                err.message += f"; what is left covers {covered} output tokens of this request"
            raise
        if team is not None and hold.subject_id != team:
            await ledger.void(
                hold.subject_id, hold.id, UsageRecord(cost=0, metadata={"error": "team_mismatch"})
            )
            raise TeamMismatch(
                f"account {subject!r} is not a member of team {team!r}, whose key this is; an admin "
                "can move it there (PATCH /api/v1/admin/credits/accounts/{id} with parent_id)",
                param="team_id",
            )
        self.limits.learn_tier(subject, hold.tier)
        if hold.tier != known_tier:
            await self.limits.after_hold(subject, hold, model_group)
        return hold

    async def _open_account(self, ledger: Ledger, subject: str, team: str | None) -> None:
        cfg = self.runtime.settings.credits
        kind = "user" if cfg.subject == "team_member" else cfg.subject
        if team is not None:
            await ledger.create_account(team, tier=cfg.default_tier, subject_type="team", exist_ok=True)
        await ledger.create_account(
            subject, tier=cfg.default_tier, subject_type=kind, parent_id=team, exist_ok=True
        )

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
        self.runtime.pricing.set_provider_prices(
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

    async def async_post_call_response_headers_hook(
        self,
        data: dict,
        user_api_key_dict: Any,
        response: Any,
        request_headers: dict[str, str] | None = None,
        litellm_call_info: dict[str, object] | None = None,
    ) -> dict[str, str] | None:
        """``x-credits-max-tokens`` on a response whose output limit a clamped hold lowered."""
        claim = self._claim(data)
        if claim is None or claim.max_tokens is None:
            return None
        return {MAX_TOKENS_HEADER: str(claim.max_tokens)}

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: Any, response: Any, request_data: dict
    ) -> AsyncGenerator[Any, None]:
        claim = self._claim(request_data)
        if claim is None or claim.output_usd <= 0 or claim.service != "chat":
            async for chunk in response:
                yield chunk
            return
        options = request_data.get("stream_options") or {}
        guard = StreamGuard(
            claim,
            model=str(request_data.get("model") or ""),
            include_usage=bool(isinstance(options, Mapping) and options.get("include_usage")),
            counter=_token_counter(),
        )
        settling = False
        async for chunk in guard.guard(response):
            if guard.delivered.cut and not settling:
                # before the ending goes out: the guard settles what it delivered, and a success
                # event that may still come for this stream (a disconnect's, say) is ignored
                settling = True
                self._remember_cut(claim.hold_id)
                self.settler.spawn(self._settle_cut(claim, request_data, guard.delivered))
            yield chunk

    def _remember_cut(self, hold_id: uuid.UUID) -> None:
        if hold_id in self._cut:
            return
        self._cut[hold_id] = None
        while len(self._cut) > MAX_CUT_STREAMS:
            self._cut.popitem(last=False)

    async def _settle_cut(
        self, claim: HoldClaim, request_data: Mapping[str, Any], delivered: Delivered
    ) -> None:
        logging_obj = request_data.get("litellm_logging_obj")
        kwargs = dict(getattr(logging_obj, "model_call_details", None) or {})
        group = str(request_data.get("model") or "")

        try:
            await self.settler.settle_or_retry(
                claim, kwargs, None, start=None, end=None, model_group=group, delivered=delivered
            )
        except Exception:
            log.exception("litellm-credits: settling the cut stream of hold %s failed", claim.hold_id)

    async def async_log_success_event(
        self, kwargs: dict, response_obj: Any, start_time: datetime, end_time: datetime
    ) -> None:
        params = kwargs.get("litellm_params") or {}
        claim = self._claim(params)
        if claim is None or claim.hold_id in self._cut:
            return
        if kwargs.get("stream") and "async_complete_streaming_response" not in kwargs:
            return  # a chunk, not the end of the stream

        try:
            # (the upstream was paid for: while the ledger is unavailable, it keeps trying in the
            # background while the hold lives; settling is idempotent, it can never charge twice)
            await self.settler.settle_or_retry(claim, kwargs, response_obj, start=start_time, end=end_time)
        except Exception:
            # LiteLLM swallows callback errors; the hold stays open for the sweeper
            log.exception("litellm-credits: settling hold %s failed", claim.hold_id)

    async def async_post_call_failure_hook(
        self,
        request_data: dict,
        original_exception: Exception,
        user_api_key_dict: Any,
        traceback_str: Any = None,
    ) -> None:
        claim = self._claim(request_data)
        if claim is None or claim.hold_id in self._cut:
            return
        try:
            if self.subject_of(user_api_key_dict, request_data) != claim.requester:
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


def _token_counter() -> Any:
    from .token_count import token_counter

    return token_counter


__all__ = [
    "HOLD_KEY",
    "MAX_TOKENS_HEADER",
    "CreditsHandler",
    "HoldClaim",
    "HoldSigner",
    "usage_from_response",
]
