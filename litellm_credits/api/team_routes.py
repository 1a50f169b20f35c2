"""Team routes: a team's admin (the team account's own key, or an admin key naming the team)
lists its members and sets their caps. Usage by member is ``/credits/usage/by-member``, a team's
ledger rows by member ``/credits/transactions?member_id=``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from ..accounts import Accounts
from ..runtime import Runtime
from . import schemas
from .routes import CallerDep, Limit, Offset, UserIdQuery, target

MemberPath = Annotated[str, Path(min_length=1, max_length=256)]


def add_team_routes(router: APIRouter, runtime: Runtime) -> None:
    async def accounts() -> Accounts:
        ledger = await runtime.ledger()
        return Accounts(ledger.pool, ledger.changed)

    @router.get("/credits/team/members", response_model=schemas.MemberPage)
    async def members(
        caller: CallerDep, limit: Limit = 50, offset: Offset = 0, user_id: UserIdQuery = None
    ) -> dict[str, Any]:
        """The members of the caller's team: what each spent today and this month, holds and
        caps (empty for an account that is no team)."""
        team = target(caller, user_id)
        items, total = await (await accounts()).members(team, limit=limit, offset=offset)
        return {
            "team_id": team,
            "items": [a.to_json() for a in items],
            "total": total,
            "limit": limit,
            "offset": offset,
        }

    @router.patch("/credits/team/members/{member_id}", response_model=schemas.Account)
    async def set_member_caps(
        member_id: MemberPath, body: schemas.MemberCaps, caller: CallerDep, user_id: UserIdQuery = None
    ) -> dict[str, Any]:
        """Set a member's monthly, daily and per-request caps (null removes one; only the fields
        sent change). They apply to its next request."""
        team = target(caller, user_id)
        changes = {f: getattr(body, f) for f in body.model_fields_set}
        # one statement: only while it is this team's member (a concurrent move cannot slip in)
        return (await (await accounts()).update(member_id, member_of=team, **changes)).to_json()


__all__ = ["add_team_routes"]
