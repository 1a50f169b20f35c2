"""Admin routes: accounts, allocations (single and bulk), refunds, keys."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query

from .. import auth as keys
from ..accounts import Accounts
from ..analytics import Analytics, whole_days
from ..cache import JSON_CODEC
from ..errors import AccountNotFound, InvalidRequest, NotFound
from ..history import Period
from ..metrics import metrics
from ..money import format_credits, micro_ceil
from ..records import Transaction
from ..runtime import Runtime
from . import schemas
from .routes import AdminDep, Limit, Offset
from .user import Days, EndDate, StartDate

KeyId = Annotated[int, Path(ge=1, le=2**63 - 1)]
UserIdPath = Annotated[str, Path(min_length=1, max_length=256)]


def _credited(tx: Transaction) -> dict[str, Any]:
    return {
        "user_id": tx.subject_id,
        "balance": format_credits(tx.balance_after),
        "transaction_id": tx.id,
        "transaction": tx.to_json(),
    }


def _issued(issued: keys.IssuedKey) -> dict[str, Any]:
    return {
        "id": issued.id,
        "user_id": issued.subject_id,
        "prefix": issued.prefix,
        "role": issued.role,
        "when_short": issued.when_short,
        "api_key": issued.key,
    }


def add_admin_routes(router: APIRouter, runtime: Runtime) -> None:
    @router.post("/admin/credits/accounts", status_code=201, response_model=schemas.AccountCreated)
    async def create_account(body: schemas.CreateAccount, _: AdminDep) -> dict[str, Any]:
        """Create a credit account and its first API key (shown once); with ``parent_id``, a member
        of that team, which pays for its requests within the caps set here."""
        cfg = runtime.settings.credits
        tier = body.tier or cfg.default_tier
        if tier not in cfg.tiers:
            raise InvalidRequest(f"unknown tier {tier!r}; configured: {', '.join(cfg.tiers)}", param="tier")
        ledger = await runtime.ledger()
        async with ledger.pool.acquire() as conn, conn.transaction():
            account = await ledger.create_account(
                body.user_id,
                tier=tier,
                monthly_cap=body.monthly_cap,
                display_name=body.display_name,
                parent_id=body.parent_id,
                daily_cap=body.daily_cap,
                request_cap=body.request_cap,
                conn=conn,
            )
            issued = await keys.issue_key(conn, body.user_id)
        return {**account.to_json(), "api_key": issued.key, "key_id": issued.id}

    @router.post("/admin/credits/allocate", response_model=schemas.Allocated)
    async def allocate(body: schemas.Allocate, _: AdminDep) -> dict[str, Any]:
        """Add credits to an account (idempotent with ``idempotency_key``)."""
        if body.amount > micro_ceil(runtime.settings.credits.max_amount):
            raise InvalidRequest(
                f"amount exceeds the maximum of {runtime.settings.credits.max_amount} credits", param="amount"
            )
        ledger = await runtime.ledger()
        tx = await ledger.credit(
            body.user_id,
            body.amount,
            type=body.type,
            idempotency_key=body.idempotency_key,
            description=body.reason,
            terms=body.terms(),
        )
        return _credited(tx)

    @router.post("/admin/credits/keys", status_code=201, response_model=schemas.KeyCreated)
    async def create_key(body: schemas.CreateKey, _: AdminDep) -> dict[str, Any]:
        """Issue another key for an account (shown once): a user, service or admin key."""
        ledger = await runtime.ledger()
        await ledger.require_account(body.user_id)
        issued = await keys.issue_key(
            ledger.pool, body.user_id, role=body.role, name=body.name, when_short=body.when_short
        )
        return _issued(issued)

    @router.get("/admin/credits/keys", response_model=list[schemas.KeyInfo])
    async def list_keys(_: AdminDep, user_id: Annotated[str, Query(max_length=256)]) -> list[dict[str, Any]]:
        """An account's keys, live and revoked (never the keys themselves)."""
        return await keys.list_keys((await runtime.ledger()).pool, user_id)

    @router.post("/admin/credits/keys/{key_id}/revoke", response_model=schemas.KeyInfo)
    async def revoke_key(key_id: KeyId, _: AdminDep) -> dict[str, Any]:
        """Revoke a key at once."""
        revoked = await keys.revoke_key((await runtime.ledger()).pool, key_id, on_revoked=runtime.key_revoked)
        if revoked is None:
            raise NotFound(f"no live key {key_id}", param="key_id")
        return revoked

    @router.post("/admin/credits/keys/{key_id}/rotate", status_code=201, response_model=schemas.KeyCreated)
    async def rotate_key(key_id: KeyId, _: AdminDep) -> dict[str, Any]:
        """Revoke a key and issue its successor in one transaction (the new key is shown once)."""
        async with (await runtime.ledger()).pool.acquire() as conn:
            issued = await keys.rotate_key(conn, key_id, on_revoked=runtime.key_revoked)
        if issued is None:
            raise NotFound(f"no live key {key_id}", param="key_id")
        return _issued(issued)

    async def accounts() -> Accounts:
        ledger = await runtime.ledger()
        return Accounts(ledger.pool, ledger.changed)

    def check_tier(tier: str) -> None:
        if tier not in runtime.settings.credits.tiers:
            configured = ", ".join(runtime.settings.credits.tiers)
            raise InvalidRequest(f"unknown tier {tier!r}; configured: {configured}", param="tier")

    @router.get("/admin/credits/accounts", response_model=schemas.AccountPage)
    async def list_accounts(
        _: AdminDep,
        search: Annotated[str | None, Query(max_length=256, description="part of the id or name")] = None,
        tier: Annotated[str | None, Query(max_length=64)] = None,
        status: Annotated[Literal["active", "disabled"] | None, Query()] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        """Accounts, newest first, filtered by text, tier and status."""
        items, total = await (await accounts()).search(
            text=search, tier=tier, status=status, limit=limit, offset=offset
        )
        return {"items": [a.to_json() for a in items], "total": total, "limit": limit, "offset": offset}

    @router.get("/admin/credits/accounts/{user_id}", response_model=schemas.Account)
    async def get_account(user_id: UserIdPath, _: AdminDep) -> dict[str, Any]:
        """One account: balance, held credits, tier, monthly cap and status."""
        account = await runtime.account(user_id)
        if account is None:
            raise AccountNotFound(f"no credit account {user_id!r}", param="user_id")
        return account.to_json()

    @router.patch("/admin/credits/accounts/{user_id}", response_model=schemas.Account)
    async def update_account(user_id: UserIdPath, body: schemas.UpdateAccount, _: AdminDep) -> dict[str, Any]:
        """Change tier, caps, status, display name or team; only the fields sent change.

        ``parent_id`` moves the account into that team (its later requests spend the team's
        credits), ``null`` takes it out; its open holds end where they began.
        """
        changes = {f: getattr(body, f) for f in body.model_fields_set}
        for field in ("tier", "status"):
            if field in changes and changes[field] is None:
                raise InvalidRequest(f"{field} cannot be null", param=field)
        if "tier" in changes:
            check_tier(changes["tier"])
        return (await (await accounts()).update(user_id, **changes)).to_json()

    @router.post("/admin/credits/accounts/{user_id}/disable", response_model=schemas.Account)
    async def disable_account(user_id: UserIdPath, _: AdminDep) -> dict[str, Any]:
        """Refuse the account's requests (open holds still settle); its keys stay valid."""
        return (await (await accounts()).update(user_id, status="disabled")).to_json()

    @router.post("/admin/credits/accounts/{user_id}/enable", response_model=schemas.Account)
    async def enable_account(user_id: UserIdPath, _: AdminDep) -> dict[str, Any]:
        """Accept the account's requests again."""
        return (await (await accounts()).update(user_id, status="active")).to_json()

    @router.post("/admin/credits/refund", response_model=schemas.Refunded)
    async def refund(body: schemas.Refund, _: AdminDep) -> dict[str, Any]:
        """Refund (part of) a usage charge, never more than is left of it."""
        ledger = await runtime.ledger()
        tx = await ledger.refund(
            body.user_id,
            body.transaction_id,
            body.amount,
            idempotency_key=body.idempotency_key,
            description=body.reason,
        )
        return _credited(tx)

    @router.post("/admin/credits/bulk-allocate", response_model=schemas.BulkAllocated)
    async def bulk_allocate(body: schemas.BulkAllocate, _: AdminDep) -> dict[str, Any]:
        """Credit many accounts in one transaction: all of them, or none (404 lists the missing)."""
        limit = micro_ceil(runtime.settings.credits.max_amount)
        too_big = [g.user_id for g in body.items if g.amount > limit]
        if too_big:
            raise InvalidRequest(
                f"amounts above the maximum of {runtime.settings.credits.max_amount} credits", param="items"
            )
        ledger = await runtime.ledger()
        txs = await ledger.credit_many(
            {g.user_id: g.amount for g in body.items},
            type=body.type,
            description=body.reason,
            idempotency_key=body.idempotency_key,
            terms=body.terms(),
        )
        return {
            "count": len(txs),
            "total": format_credits(sum(t.amount for t in txs)),
            "items": [
                {
                    "user_id": t.subject_id,
                    "amount": format_credits(t.amount),
                    "balance": format_credits(t.balance_after),
                    "transaction_id": t.id,
                }
                for t in txs
            ],
        }

    async def cached(name: str, period: Period | None, load: Callable[[Analytics], Awaitable[Any]]) -> Any:
        """An analytics answer, cached briefly (``cache.analytics_ttl_seconds``) by its question."""
        analytics = Analytics((await runtime.ledger()).pool)
        if period is not None:
            first, after = whole_days(period)
            name = f"{name}:{first}:{after}"
        return await runtime.cache.get(
            runtime.link.keys.analytics(name),
            lambda: load(analytics),
            JSON_CODEC,
            ttl=runtime.settings.credits.cache.analytics_ttl_seconds,
        )

    @router.get("/admin/credits/analytics/system", response_model=schemas.SystemAnalytics)
    async def system_analytics(
        _: AdminDep, days: Days = None, start_date: StartDate = None, end_date: EndDate = None
    ) -> dict[str, Any]:
        """Usage and credits across all accounts over a period (default the last 30 days)."""
        period = Period.of(days=days, start=start_date, end=end_date)
        return await cached("system", period, lambda a: a.system(period))

    @router.get("/admin/credits/analytics/top-spenders", response_model=schemas.TopSpenders)
    async def top_spenders(
        _: AdminDep,
        limit: Annotated[int, Query(ge=1, le=1000)] = 10,
        days: Days = None,
        start_date: StartDate = None,
        end_date: EndDate = None,
    ) -> dict[str, Any]:
        """The accounts that spent the most credits in the period."""
        period = Period.of(days=days, start=start_date, end=end_date)
        return await cached(f"top-spenders:{limit}", period, lambda a: a.top_spenders(period, limit))

    @router.get("/admin/credits/health", response_model=schemas.Health)
    async def health(_: AdminDep) -> dict[str, Any]:
        """This proxy process's view: the database, Redis, the cache and its counters."""
        try:
            ledger = await runtime.ledger()
            await ledger.pool.fetchval("SELECT 1", timeout=2)
            database = "ok"
        except Exception:  # reported, not raised: this is the route that says what is down
            database = "unavailable"
        return {
            "database": database,
            "redis": runtime.link.status(),
            "cache": runtime.cache.status(),
            "counters": metrics.snapshot(),
        }

    @router.get("/admin/credits/analytics/distribution", response_model=schemas.Distribution)
    async def distribution(_: AdminDep) -> dict[str, Any]:
        """Balances by tier, as a histogram."""
        return await cached("distribution", None, lambda a: a.distribution())


__all__ = ["add_admin_routes"]
