"""Grant routes: the credit grants an account's balance is made of (its own, or any for an admin)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from ..errors import AccountNotFound
from ..grants import Grants, GrantStatus
from ..runtime import Runtime
from . import grant_schemas
from .routes import AdminDep, CallerDep, Limit, Offset, UserIdQuery, target

StatusQuery = Annotated[GrantStatus | None, Query(description="only grants in this state")]


def add_grant_routes(router: APIRouter, runtime: Runtime) -> None:
    async def page(subject: str, status: GrantStatus | None, limit: int, offset: int) -> dict[str, Any]:
        ledger = await runtime.ledger()
        items, total = await Grants(ledger.pool).list(subject, status=status, limit=limit, offset=offset)
        if not items and await runtime.account(subject) is None:
            raise AccountNotFound(f"no credit account {subject!r}", param="user_id")
        return {"items": [g.to_json() for g in items], "total": total, "limit": limit, "offset": offset}

    @router.get("/credits/grants", response_model=grant_schemas.GrantPage)
    async def own_grants(
        caller: CallerDep,
        status: StatusQuery = None,
        limit: Limit = 50,
        offset: Offset = 0,
        user_id: UserIdQuery = None,
    ) -> dict[str, Any]:
        """The caller's credit grants, newest first: what each was, what is left, and when it
        expires. Usage burns the live ones by priority, then the earliest expiry, then the oldest."""
        return await page(target(caller, user_id), status, limit, offset)

    @router.get("/admin/credits/accounts/{user_id}/grants", response_model=grant_schemas.GrantPage)
    async def account_grants(
        user_id: Annotated[str, Path(min_length=1, max_length=256)],
        _: AdminDep,
        status: StatusQuery = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        """An account's credit grants, newest first."""
        return await page(user_id, status, limit, offset)


__all__ = ["add_grant_routes"]
