"""The process's one runtime and one callback handler, whichever module copy asks for them.

LiteLLM loads a module that its config names by file path when the file sits next to the config
(``get_instance_fn``): with ``litellm_config.yaml`` beside ``litellm_credits/``, as in this
repository, ``proxy.py`` (for ``callbacks``) and ``auth.py`` (for ``custom_auth``) each run again
as new module objects, so their module globals would exist twice in one process: two pools, two
caches, two rate limiters, and a revoked key still cached by the copy that did not revoke it.
This module is never named in a config; every copy reaches it through the package (relative
imports resolve through ``sys.modules``), so what it keeps exists once per process.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from .runtime import Runtime

if TYPE_CHECKING:
    from .hooks import CreditsHandler

_lock = threading.Lock()
_runtime: Runtime | None = None
_handler: CreditsHandler | None = None


def process_runtime() -> Runtime:
    """The runtime every hook, ``custom_auth`` and route of this process shares."""
    global _runtime
    if _runtime is not None:  # on every authenticated request: no lock once made
        return _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime()
        return _runtime


def process_handler() -> CreditsHandler:
    """The callback instance registered with LiteLLM, on the process's runtime."""
    global _handler
    from .hooks import CreditsHandler

    runtime = process_runtime()
    with _lock:
        if _handler is None:
            _handler = CreditsHandler(runtime)
        return _handler


__all__ = ["process_handler", "process_runtime"]
