"""Alert routes: an account's thresholds (its own, or any for an admin), and the admin's webhook
endpoints and deliveries."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field, Strict

from ..alerts import Alerts
from ..runtime import Runtime
from ..webhooks import EVENT_TYPES, EventType
from .routes import AdminDep, CallerDep, Limit, Offset, UserIdQuery, target
from .schemas import PositiveAmount, Text, _In

EndpointId = Annotated[int, Path(ge=1, le=2**63 - 1)]
DeliveryId = Annotated[int, Path(ge=1, le=2**63 - 1)]
Percent = Annotated[int, Strict(), Field(ge=1, le=1000)]


class SetThresholds(_In):
    balance_below: Annotated[list[PositiveAmount], Field(max_length=10)] | None = Field(
        None, description="balance.low below each of these balances; null: the tier's defaults"
    )
    monthly_cap_percent: Annotated[list[Percent], Field(max_length=10)] | None = Field(
        None, description="monthly_cap.reached at each percentage of the monthly cap; null: the tier's"
    )


class Thresholds(BaseModel):
    balance_below: list[str]
    monthly_cap_percent: list[int]
    own: bool = Field(description="false: the tier's defaults apply")


class CreateEndpoint(_In):
    url: Annotated[str, Field(min_length=1, max_length=2000)]
    events: Annotated[list[EventType], Field(min_length=1, max_length=len(EVENT_TYPES))] | None = Field(
        None, description="the event types it takes; null: all"
    )
    format: Literal["standard", "slack"] = Field(
        "standard", description='standard: the event as JSON; slack: {"text"} for an incoming webhook'
    )
    description: Text | None = None


class Endpoint(BaseModel):
    id: int
    url: str
    events: list[str] | None
    format: str
    description: str | None
    active: bool
    created_at: str
    previous_secret_until: str | None


class EndpointCreated(Endpoint):
    secret: str = Field(description="whsec_...: verifies webhook-signature; shown once")


class Delivery(BaseModel):
    id: int
    endpoint_id: int
    event_id: str = Field(description="the webhook-id: the same on every attempt and replay")
    type: str
    user_id: str | None
    status: Literal["pending", "delivered", "dead"]
    attempts: int
    next_attempt_at: str | None
    last_status: int | None
    last_error: str | None
    delivered_at: str | None
    created_at: str


class DeliveryPage(BaseModel):
    items: list[Delivery]
    total: int
    limit: int
    offset: int


def add_alert_routes(router: APIRouter, runtime: Runtime) -> None:
    async def alerts() -> Alerts:
        ledger = await runtime.ledger()
        return Alerts(
            ledger.pool,
            runtime.secret_box(),
            allow_private=runtime.settings.credits.alerts.allow_private_targets,
        )

    @router.get("/credits/alerts", response_model=Thresholds)
    async def thresholds(caller: CallerDep, user_id: UserIdQuery = None) -> dict[str, Any]:
        """The balances and percentages of the monthly cap at which the account's alerts fire."""
        return await (await alerts()).thresholds(target(caller, user_id))

    @router.put("/credits/alerts", response_model=Thresholds)
    async def set_thresholds(
        body: SetThresholds, caller: CallerDep, user_id: UserIdQuery = None
    ) -> dict[str, Any]:
        """Set the account's own thresholds (null: its tier's). Each fires once when the balance
        (or the month's spend) crosses it, and again only after the balance rose above it."""
        return await (await alerts()).set_thresholds(
            target(caller, user_id), body.balance_below, body.monthly_cap_percent
        )

    @router.post("/admin/credits/webhooks", status_code=201, response_model=EndpointCreated)
    async def create_endpoint(body: CreateEndpoint, _: AdminDep) -> dict[str, Any]:
        """Register an endpoint for alert events; its signing secret is shown once."""
        return await (await alerts()).create_endpoint(
            body.url, events=body.events, format=body.format, description=body.description
        )

    @router.get("/admin/credits/webhooks", response_model=list[Endpoint])
    async def endpoints(_: AdminDep) -> list[dict[str, Any]]:
        """Every endpoint, active or not (never their secrets)."""
        return await (await alerts()).endpoints()

    @router.post("/admin/credits/webhooks/{endpoint_id}/deactivate", response_model=Endpoint)
    async def deactivate(endpoint_id: EndpointId, _: AdminDep) -> dict[str, Any]:
        """Stop sending new events to an endpoint (deliveries already made keep their history)."""
        return await (await alerts()).deactivate(endpoint_id)

    @router.post("/admin/credits/webhooks/{endpoint_id}/rotate-secret", response_model=EndpointCreated)
    async def rotate(endpoint_id: EndpointId, _: AdminDep) -> dict[str, Any]:
        """A new signing secret (shown once); the previous one signs too for
        ``alerts.secret_overlap_hours``, so receivers can switch without losing an event."""
        overlap = runtime.settings.credits.alerts.secret_overlap_hours * 3600
        return await (await alerts()).rotate_secret(endpoint_id, overlap_seconds=overlap)

    @router.get("/admin/credits/webhooks/deliveries", response_model=DeliveryPage)
    async def deliveries(
        _: AdminDep,
        status: Annotated[Literal["pending", "delivered", "dead"] | None, Query()] = None,
        endpoint_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        """Deliveries, newest first: dead ones (retried for ``alerts.retry_hours``) to replay."""
        items, total = await (await alerts()).deliveries(
            status=status, endpoint_id=endpoint_id, limit=limit, offset=offset
        )
        return {"items": items, "total": total, "limit": limit, "offset": offset}

    @router.post("/admin/credits/webhooks/deliveries/{delivery_id}/replay", status_code=202)
    async def replay(delivery_id: DeliveryId, _: AdminDep) -> dict[str, Any]:
        """Deliver again now, with the same event id, and a fresh retry window."""
        await (await alerts()).replay(delivery_id)
        return {"id": delivery_id, "status": "pending"}


__all__ = ["add_alert_routes"]
