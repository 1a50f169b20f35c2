"""The credits API, mounted on the LiteLLM proxy under ``/api/v1``."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter

from ..pricing import ModelPrice
from ..runtime import Runtime
from .admin import add_admin_routes
from .alert_routes import add_alert_routes
from .charges import add_charge_routes
from .coupon_routes import add_coupon_routes
from .grant_routes import add_grant_routes
from .metrics_routes import add_metrics_routes
from .openrouter_routes import add_openrouter_routes
from .routes import ERROR_RESPONSES, SECURITY_HEADERS, CreditsRoute, add_fallback_routes
from .team_routes import add_team_routes
from .topup_routes import add_topup_routes
from .user import add_user_routes


def build_router(runtime: Runtime, price_of: Callable[[str], ModelPrice] | None = None) -> APIRouter:
    """Every credits route; ``price_of`` prices a model group (the proxy's deployments)."""
    router = APIRouter(
        prefix="/api/v1", tags=["credits"], route_class=CreditsRoute.bind(runtime), responses=ERROR_RESPONSES
    )
    add_admin_routes(router, runtime)
    price_of = price_of or runtime.pricing.price
    add_user_routes(router, runtime, price_of)
    add_charge_routes(router, runtime, price_of)
    add_coupon_routes(router, runtime)
    add_team_routes(router, runtime)
    add_grant_routes(router, runtime)
    add_alert_routes(router, runtime)
    add_topup_routes(router, runtime)
    add_openrouter_routes(router, runtime)
    add_metrics_routes(router, runtime)
    add_fallback_routes(router)  # last: only what no route above matched
    return router


__all__ = ["SECURITY_HEADERS", "CreditsRoute", "build_router"]
