"""The entry point the proxy config names.

    litellm_settings:
      callbacks: ["litellm_credits.proxy.handler"]

Importing this module takes the process's :class:`Runtime` and callback instance (one per
process, however often and however LiteLLM loads this file: see :mod:`litellm_credits.process`)
and mounts the credits API on the proxy app once.
"""

from __future__ import annotations

import logging

from .api import build_router
from .dashboard import mount_dashboard
from .heap import watch_pauses
from .process import process_handler, process_runtime


def _log_to_stderr() -> None:
    """Give the plugin's log lines a time and a level on stderr, as LiteLLM's own have, unless
    the operator configured logging (the root logger has handlers) or did it for the plugin."""
    logger = logging.getLogger("litellm_credits")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


_log_to_stderr()
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
    mount_dashboard(app)  # type: ignore[arg-type]  # /credits/: the web dashboard
    # first in line: the proxy has hundreds of routes, and matching a request against them in
    # order took a quarter of a credits request's time; no other route shares these paths
    ours = routes[before:]
    del routes[before:]
    routes[0:0] = ours
    app._litellm_credits_mounted = True  # type: ignore[attr-defined]


mount()
watch_pauses()  # litellm_credits_gc_pause_seconds: the proxy's garbage collections, timed
runtime.start_soon()

__all__ = ["handler", "mount", "runtime"]
