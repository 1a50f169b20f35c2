"""OpenRouter routes: admins provision keys per account; users may bring their own."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response

from ..errors import PermissionDenied
from ..runtime import Runtime
from . import schemas
from .routes import AdminDep, CallerDep, UserIdQuery, target

UserIdPath = Annotated[str, Path(min_length=1, max_length=256)]


def add_openrouter_routes(router: APIRouter, runtime: Runtime) -> None:
    @router.post(
        "/admin/credits/openrouter/accounts",
        status_code=201,
        response_model=schemas.OpenRouterStatus,
        summary="Provision an OpenRouter key",
    )
    async def provision(body: schemas.ProvisionOpenRouter, _: AdminDep) -> dict[str, Any]:
        """Provision an OpenRouter key for the account, capped at what it can pay."""
        return await (await runtime.openrouter_accounts()).provision(body.user_id)

    @router.get(
        "/admin/credits/openrouter/accounts/{user_id}",
        response_model=schemas.OpenRouterStatus,
        summary="An account's OpenRouter key",
    )
    async def status(user_id: UserIdPath, _: AdminDep) -> dict[str, Any]:
        """The account's OpenRouter key (last four characters only), whether it was brought, its cap
        and its usage."""
        return await (await runtime.openrouter_accounts()).status(user_id)

    @router.post(
        "/admin/credits/openrouter/accounts/{user_id}/sync",
        response_model=schemas.OpenRouterStatus,
        summary="Sync an OpenRouter key's limit",
    )
    async def sync(user_id: UserIdPath, _: AdminDep) -> dict[str, Any]:
        """Set the key's OpenRouter limit to what the account can pay now."""
        return await (await runtime.openrouter_accounts()).sync(user_id)

    @router.delete(
        "/admin/credits/openrouter/accounts/{user_id}", status_code=204, summary="Remove an OpenRouter key"
    )
    async def remove(user_id: UserIdPath, _: AdminDep) -> Response:
        """Delete the account's key at OpenRouter (a brought key is only forgotten)."""
        await (await runtime.openrouter_accounts()).remove(user_id)
        return Response(status_code=204)

    @router.get(
        "/credits/openrouter/key", response_model=schemas.OpenRouterStatus, summary="Your OpenRouter key"
    )
    async def my_key(caller: CallerDep, user_id: UserIdQuery = None) -> dict[str, Any]:
        """Your account's OpenRouter key (last four characters only), its cap and its usage."""
        return await (await runtime.openrouter_accounts()).status(target(caller, user_id))

    @router.put(
        "/credits/openrouter/key",
        response_model=schemas.OpenRouterStatus,
        summary="Bring your OpenRouter key",
    )
    async def bring_key(
        body: schemas.BringOpenRouterKey, caller: CallerDep, user_id: UserIdQuery = None
    ) -> dict[str, Any]:
        """Use your own OpenRouter key for openrouter/* models (checked with OpenRouter first)."""
        return await (await runtime.openrouter_accounts()).bring_own_key(target(caller, user_id), body.key)

    @router.delete("/credits/openrouter/key", status_code=204, summary="Forget your OpenRouter key")
    async def forget_key(caller: CallerDep, user_id: UserIdQuery = None) -> Response:
        """Forget the key you brought."""
        accounts = await runtime.openrouter_accounts()
        subject = target(caller, user_id)
        if not (await accounts.status(subject))["byok"] and not caller.is_admin:
            raise PermissionDenied("this key was provisioned by the operator; ask them to remove it")
        await accounts.remove(subject)
        return Response(status_code=204)


__all__ = ["add_openrouter_routes"]
