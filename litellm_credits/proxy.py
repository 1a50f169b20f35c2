"""The entry point the proxy config names.

    litellm_settings:
      callbacks: ["litellm_credits.proxy.handler"]

Importing this module takes the process's :class:`Runtime` and callback instance (one per
process, however often and however LiteLLM loads this file: see :mod:`litellm_credits.process`)
and mounts the credits API on the proxy app once.
"""

from __future__ import annotations

from .api import build_router
from .process import process_handler, process_runtime

runtime = process_runtime()
handler = process_handler()


def mount(app: object | None = None) -> None:
    """Mount the credits API on the proxy app; a second call does nothing."""
    if app is None:
        from litellm.proxy.proxy_server import app as proxy_app

        app = proxy_app
    if getattr(app, "_litellm_credits_mounted", False):
        return
    routes = app.router.routes  # type: ignore[attr-defined]
    before = len(routes)
    app.include_router(build_router(runtime, handler.group_price))  # type: ignore[attr-defined]
    # first in line: the proxy has hundreds of routes, and matching a request against them in
    # order took a quarter of a credits request's time; no other route shares these paths
    ours = routes[before:]
    del routes[before:]
    routes[0:0] = ours
    app._litellm_credits_mounted = True  # type: ignore[attr-defined]


mount()
runtime.start_soon()

__all__ = ["handler", "mount", "runtime"]
