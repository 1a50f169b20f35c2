"""What the proxy's router knows about a model name: its deployments, and whether it routes it.

Read from LiteLLM's router (``litellm.proxy.proxy_server.llm_router``) when the proxy is loaded in
this process; without it nothing can be checked, so every name counts as routable.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

DeploymentLookup = Callable[[str], list[dict[str, Any]]]
RouteCheck = Callable[[str], bool]


def _router() -> Any:
    """The proxy's router; None outside the proxy (no proxy server loaded) or before it has one."""
    server = sys.modules.get("litellm.proxy.proxy_server")
    return getattr(server, "llm_router", None)


def proxy_deployments(model_group: str) -> list[dict[str, Any]]:
    """The deployments a request for ``model_group`` may go to (empty when there is no router).

    A model group, alias, routing group or wildcard route (the router's ``get_model_list``), else a
    deployment named by its id or by its provider model, which LiteLLM also routes.
    """
    router = _router()
    if router is None:
        return []
    found = router.get_model_list(model_name=model_group) or []
    if not found and (router.has_model_id(model_group) or model_group in router.deployment_names):
        found = [
            d
            for d in router.model_list
            if (d.get("model_info") or {}).get("id") == model_group
            or (d.get("litellm_params") or {}).get("model") == model_group
        ]
    return [dict(d) for d in found]


def proxy_model_groups() -> list[str]:
    """The model names the proxy's model list configures (empty when there is no router)."""
    router = _router()
    if router is None:
        return []
    return [str(name) for name in getattr(router, "model_names", None) or ()]


def proxy_routes(model_group: str) -> bool:
    """Whether the router takes ``model_group`` although it lists no deployment for it: a name it
    recognises, a team's public model name, a default deployment, or every model passed through.
    True without a router (nothing to check against)."""
    router = _router()
    if router is None:
        return True
    return bool(
        router.is_recognized_model(model_group)
        or model_group in router.team_public_model_names
        or model_group in router.deployment_names
        or router.default_deployment is not None
        or router.router_general_settings.pass_through_all_models
    )


def is_openrouter(deployments: list[dict[str, Any]]) -> bool:
    return any(
        str((d.get("litellm_params") or {}).get("model", "")).startswith("openrouter/") for d in deployments
    )


def deployment_prices(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """Price keys set on a deployment, ``model_info`` first, ``litellm_params`` winning where it
    sets a value (the ``litellm_params`` a success event carries name every price key, None where
    unset: those must not hide the prices set in ``model_info``)."""
    merged: dict[str, Any] = {}
    merged.update(deployment.get("model_info") or {})
    merged.update((k, v) for k, v in (deployment.get("litellm_params") or {}).items() if v is not None)
    return merged


__all__ = [
    "DeploymentLookup",
    "RouteCheck",
    "deployment_prices",
    "is_openrouter",
    "proxy_deployments",
    "proxy_model_groups",
    "proxy_routes",
]
