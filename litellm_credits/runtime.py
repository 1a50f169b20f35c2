"""The plugin's running state: settings, pricing, and a ledger per event loop.

The proxy runs one event loop per worker process, but tests (and FastAPI's TestClient) may run
several loops one after another in a process; an asyncpg pool belongs to the loop that made it,
so pools are kept per loop. The DSN is resolved once per process (starting the embedded server
if no ``CREDITS_DATABASE_URL`` is set), and migrations run once per process under the
database's advisory lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from . import auth, db, heap, migrations, sweeper
from .alerts import Alerts, tier_alerts
from .cache import Cache, Codec
from .crypto import Secret, SecretBox
from .deployments import proxy_model_groups
from .ledger import Ledger
from .metrics import SWEEPER_RUNS, LabelBounds
from .metrics_sampler import sample_forever
from .money import format_credits, parse_credits
from .openrouter import ModelCatalog, OpenRouterClient
from .openrouter_accounts import OpenRouterAccounts
from .pricing import Pricing
from .ratelimit import RateLimiter
from .records import Account
from .redis_link import RedisLink
from .settings import Settings
from .topups import Pricing as TopupPricing
from .topups import Topups
from .webhooks import DISPATCH_BATCH, Dispatcher, Policy

log = logging.getLogger("litellm_credits")
# seconds after the plugin loads (the proxy's start-up, on its loop) that the heap is frozen
FREEZE_AFTER_SECONDS = 5.0


@dataclass
class _LoopState:
    ready: asyncio.Task[Ledger]
    sweeper: asyncio.Task[None] | None = None
    openrouter_sync: asyncio.Task[None] | None = None
    dispatcher: asyncio.Task[None] | None = None
    sampler: asyncio.Task[None] | None = None


@dataclass
class Runtime:
    """Everything the hook, the auth function and the routes share in one process."""

    settings: Settings = field(default_factory=Settings.load)
    _pricing: Pricing | None = None
    _dsn: str | None = None
    _migrated: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loops: dict[asyncio.AbstractEventLoop, _LoopState] = field(default_factory=dict)
    _openrouter_clients: dict[asyncio.AbstractEventLoop, OpenRouterClient] = field(default_factory=dict)
    _openrouter_catalogs: dict[asyncio.AbstractEventLoop, ModelCatalog] = field(default_factory=dict)
    _topups: dict[asyncio.AbstractEventLoop, Topups] = field(default_factory=dict)
    _box: SecretBox | None = None
    _link: RedisLink | None = None
    _cache: Cache | None = None
    _limiter: RateLimiter | None = None
    _labels: LabelBounds | None = None

    @property
    def link(self) -> RedisLink:
        """This process's link to Redis (``configured`` is false without CREDITS_REDIS_URL)."""
        if self._link is None:
            s = self.settings
            self._link = RedisLink(
                s.redis_url,
                prefix=s.redis_prefix,
                timeout=s.redis_timeout_seconds,
                retry_seconds=s.redis_retry_seconds,
            )
        return self._link

    @property
    def cache(self) -> Cache:
        if self._cache is None:
            cfg = self.settings.credits.cache
            self._cache = Cache(self.link, ttl=cfg.ttl_seconds, max_entries=cfg.max_entries)
        return self._cache

    @property
    def limiter(self) -> RateLimiter:
        if self._limiter is None:
            self._limiter = RateLimiter(self.link)
        return self._limiter

    @property
    def labels(self) -> LabelBounds:
        """The label values metrics may use: the configured tiers and model groups."""
        if self._labels is None:
            cfg = self.settings.credits
            self._labels = LabelBounds(cfg.tiers, lambda: [*proxy_model_groups(), *cfg.models])
        return self._labels

    async def account(self, subject_id: str) -> Account | None:
        """An account as the cache has it (never used to decide a hold)."""
        ledger = await self.ledger()
        return await self.cache.get(
            self.link.keys.account(subject_id),
            lambda: ledger.get_account(subject_id),
            ACCOUNT_CODEC,
            consistent=True,
        )

    async def lookup_key(self, key: str, digest: str) -> auth.KeyOwner | None:
        """Who a live plugin API key belongs to, cached; revocation invalidates it. ``digest``:
        the key's ``hash_key(key).hex()``."""
        ledger = await self.ledger()
        return await self.cache.get(
            self.link.keys.api_key(digest),
            lambda: auth.lookup_key(ledger.pool, key),
            KEY_CODEC,
            consistent=True,
        )

    async def key_revoked(self, key_hash: bytes) -> None:
        await self.cache.invalidate([self.link.keys.api_key(key_hash.hex())])

    async def accounts_changed(self, subjects: Sequence[str], wait: bool) -> None:
        """The ledger's change hook: forget these accounts in every instance's cache."""
        keys = [self.link.keys.account(s) for s in subjects]
        if wait:
            await self.cache.invalidate(keys)
        else:
            self.cache.invalidate_soon(keys)

    @property
    def pricing(self) -> Pricing:
        if self._pricing is None:
            self._pricing = Pricing(self.settings.credits)
        return self._pricing

    def secret_box(self) -> SecretBox | None:
        """The box for secrets at rest, or None while no encryption key is configured."""
        if self._box is None and self.settings.encryption_keys:  # derived once: not free
            self._box = SecretBox.from_env_value(self.settings.encryption_keys.get_secret_value())
        return self._box

    async def topups(self) -> Topups:
        """Paid top-ups for the running loop (one Stripe client each); their routes answer 404
        topups_not_configured without Stripe's keys."""
        loop = asyncio.get_running_loop()
        topups = self._topups.get(loop)
        if topups is None:
            s, cfg = self.settings, self.settings.credits.topups
            pricing = TopupPricing(
                currency=cfg.currency,
                credits_per_unit=cfg.credits_per_unit or s.credits.credits_per_usd,
                minor_units=cfg.minor_units,
                min_amount=parse_credits(cfg.min_amount),
                max_amount=parse_credits(cfg.max_amount),
            )
            topups = Topups(
                (await self.ledger()).pool,
                pricing,
                api_key=s.stripe_secret_key.get_secret_value() if s.stripe_secret_key else None,
                webhook_secret=s.stripe_webhook_secret.get_secret_value()
                if s.stripe_webhook_secret
                else None,
                api_base=s.stripe_api_base,
                success_url=cfg.success_url,
                cancel_url=cfg.cancel_url,
                tolerance_seconds=cfg.tolerance_seconds,
            )
            self._topups[loop] = topups
        return topups

    async def openrouter_accounts(self) -> OpenRouterAccounts:
        """The OpenRouter account service; refused (503) until encryption keys are configured."""
        s = self.settings
        box = self.secret_box() or SecretBox.from_env_value(None)  # (raises: not configured)
        client = await self.openrouter_client()
        return OpenRouterAccounts(await self.ledger(), box, client, s.credits.credits_per_usd)

    async def openrouter_catalog(self) -> ModelCatalog | None:
        """OpenRouter's model list (cached), or None without a provisioning key."""
        if self.settings.openrouter_provisioning_key is None:
            return None
        loop = asyncio.get_running_loop()
        catalog = self._openrouter_catalogs.get(loop)
        if catalog is None:
            client = await self.openrouter_client()
            catalog = self._openrouter_catalogs[loop] = ModelCatalog(client)
        return catalog

    async def openrouter_client(self) -> OpenRouterClient:
        loop = asyncio.get_running_loop()
        client = self._openrouter_clients.get(loop)
        if client is None:
            provisioning = self.settings.openrouter_provisioning_key
            client = OpenRouterClient(
                provisioning_key=Secret(provisioning.get_secret_value()) if provisioning else None,
                base_url=self.settings.openrouter_base_url,
            )
            self._openrouter_clients[loop] = client
        return client

    def _resolve_dsn(self) -> str:
        with self._lock:
            if self._dsn is None:
                self._dsn = self.settings.database_url or db.start_embedded(self.settings.data_dir)
            return self._dsn

    async def _start(self) -> Ledger:
        dsn = await asyncio.to_thread(self._resolve_dsn)
        s = self.settings
        pool = await db.create_pool(dsn, min_size=s.db_pool_min, max_size=max(s.db_pool_min, s.db_pool_max))
        if s.auto_migrate and not self._migrated:
            async with pool.acquire() as conn:
                applied = await migrations.migrate(conn)
            self._migrated = True
            if applied:
                log.info("litellm-credits: applied migrations %s", [m.version for m in applied])
        cfg = s.credits
        tiers = {name: tier_alerts(t.alerts) for name, t in cfg.tiers.items()}
        try:
            await Alerts(pool).sync_defaults(tiers, cfg.default_tier)
        except asyncpg.UndefinedTableError:  # not migrated yet (auto_migrate off)
            log.warning("litellm-credits: alert defaults not written: migration 0011 is not applied")
        return Ledger(
            pool,
            on_change=self.accounts_changed,
            labels=self.labels,
            batch_size=s.db_batch_size,
            batch_lanes=s.db_batch_lanes,
        )

    async def ledger(self) -> Ledger:
        """The ledger for the running loop, starting it on first use."""
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None or (state.ready.done() and state.ready.exception() is not None):
            state = _LoopState(ready=loop.create_task(self._start()))
            self._loops[loop] = state
        if state.ready.done():  # the common case: no shield (a future and callbacks per call)
            ledger = state.ready.result()
        else:
            ledger = await asyncio.shield(state.ready)
        interval = self.settings.credits.metrics.sample_seconds
        if interval > 0 and state.sampler is None:  # (whether or not this process sweeps)
            state.sampler = loop.create_task(sample_forever(ledger.pool, interval))
        if self.settings.sweeper and state.sweeper is None:
            state.sweeper = loop.create_task(self._sweep(ledger))
            state.dispatcher = loop.create_task(self._dispatch(ledger))
            if self.settings.openrouter_provisioning_key and self.settings.encryption_keys:
                state.openrouter_sync = loop.create_task(self._sync_openrouter())
        return ledger

    def start_soon(self) -> None:
        """Begin start-up on the running loop, if any, so the first request does not pay for it:
        the ledger's pool and migrations now, and the heap's freeze (``heap.freeze_once``: one
        full collection, 0.3 to 0.9 s with the loop stopped) a few seconds on, once the proxy has
        started and before most traffic; a request that comes first still does it then."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self.ledger())
        task.add_done_callback(_log_start_failure)
        if self.settings.gc_freeze:
            loop.call_later(FREEZE_AFTER_SECONDS, heap.freeze_once)

    async def _sweep(self, ledger: Ledger) -> None:
        cfg = self.settings.credits.holds
        while True:
            # (a tenth either way: the hosts started together do not all look at once)
            await asyncio.sleep(cfg.sweep_interval_seconds * random.uniform(0.9, 1.1))
            try:
                swept = await sweeper.sweep(
                    ledger,
                    self._resolve_dsn(),
                    policy=cfg.expiry_policy,
                    batch=cfg.sweep_batch,
                    hold_for=sweeper.claim_seconds(cfg.sweep_interval_seconds),
                )
                if swept is None:  # another process is sweeping
                    SWEEPER_RUNS.labels(result="skipped").inc()
                    continue
                if swept.holds:
                    log.warning(
                        "litellm-credits: resolved %d expired holds by policy %r",
                        swept.holds,
                        cfg.expiry_policy,
                    )
                if swept.grants.expired:
                    log.info(
                        "litellm-credits: expired %s credits of grants on %d accounts",
                        format_credits(swept.grants.expired),
                        swept.grants.accounts,
                    )
                SWEEPER_RUNS.labels(result="ok").inc()
            except asyncio.CancelledError:
                raise
            except Exception:
                SWEEPER_RUNS.labels(result="error").inc()
                log.exception("litellm-credits: hold sweeper failed; will retry")

    async def _dispatch(self, ledger: Ledger) -> None:
        """Deliver the outbox's alerts (and raise grant.expiring once a minute)."""
        cfg = self.settings.credits.alerts
        policy = Policy(
            retry_hours=cfg.retry_hours,
            base_delay_seconds=cfg.base_delay_seconds,
            max_delay_seconds=cfg.max_delay_seconds,
            timeout_seconds=cfg.timeout_seconds,
            allow_private=cfg.allow_private_targets,
        )
        dispatcher = Dispatcher(ledger.pool, self.secret_box(), policy)
        # auto-recharges start here too (below their threshold; credited by Stripe's webhook)
        topups = await self.topups() if self.settings.stripe_secret_key else None
        announced = 0.0
        try:
            while True:
                await asyncio.sleep(cfg.dispatch_interval_seconds)
                try:
                    if time.monotonic() - announced >= 60:
                        await Alerts(ledger.pool).announce_expiring(cfg.expiring_notice_days)
                        announced = time.monotonic()
                    if topups is not None:
                        await topups.recharge_due()
                    while await dispatcher.run_once() == DISPATCH_BATCH:
                        pass
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("litellm-credits: webhook dispatch failed; will retry")
        finally:
            await dispatcher.close()

    async def _sync_openrouter(self) -> None:
        """Keep every provisioned OpenRouter key's limit at what its account can pay."""
        interval = self.settings.credits.openrouter_sync_interval_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                results = await (await self.openrouter_accounts()).sync_all()
                failed = {k: v for k, v in results.items() if v != "ok"}
                if failed:
                    log.warning("litellm-credits: %d OpenRouter keys not synced: %s", len(failed), failed)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("litellm-credits: OpenRouter sync failed; will retry")

    async def close(self) -> None:
        """Stop the sweeper, close the pool and the Redis link of the running loop."""
        if self._cache is not None:
            await self._cache.close()
        if self._link is not None:
            await self._link.close()
        self._openrouter_catalogs.pop(asyncio.get_running_loop(), None)
        client = self._openrouter_clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()
        state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None:  # (its dispatcher uses them: stopped first, below)
            for task in (state.sweeper, state.openrouter_sync, state.dispatcher, state.sampler):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        topups = self._topups.pop(asyncio.get_running_loop(), None)
        if topups is not None:
            await topups.close()
        if state is None:
            return
        if state.ready.done() and state.ready.exception() is None:
            ledger = state.ready.result()
            await ledger.close()  # what is queued for the database goes first
            await ledger.pool.close()


ACCOUNT_CODEC: Codec[Account] = Codec(Account.to_cache, Account.from_cache)


def _key_owner(text: str) -> auth.KeyOwner:
    subject_id, role, when_short = json.loads(text)  # an entry of another version is a miss
    return auth.KeyOwner(subject_id, role, when_short)


KEY_CODEC: Codec[auth.KeyOwner] = Codec(
    lambda owner: json.dumps([owner.subject_id, owner.role, owner.when_short]), _key_owner
)


def _log_start_failure(task: asyncio.Task[Ledger]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("litellm-credits: start-up failed: %s", task.exception())


__all__ = ["Runtime"]
