"""``GET /api/v1/admin/credits/metrics``: the plugin's Prometheus metrics, in the text format.

Admins only, unless ``credits.metrics.public`` opens it to a scraper without a key. In
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) a scrape of any worker shows every worker's
samples. LiteLLM's own ``/metrics``, when its ``prometheus`` callback is on, shows them too.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response

from ..metrics import render
from ..runtime import Runtime
from .routes import AdminDep

PATH = "/admin/credits/metrics"
DESCRIPTION = "Prometheus text format; amounts in micro-credits"


async def _scrape() -> Response:
    body, content_type = await asyncio.to_thread(render)  # many workers' files: off the loop
    return Response(body, media_type=content_type)


def add_metrics_routes(router: APIRouter, runtime: Runtime) -> None:
    if runtime.settings.credits.metrics.public:

        @router.get(PATH, response_class=Response, description=DESCRIPTION)
        async def metrics_public() -> Response:
            return await _scrape()

    else:

        @router.get(PATH, response_class=Response, description=DESCRIPTION)
        async def metrics_admin(_: AdminDep) -> Response:
            return await _scrape()


__all__ = ["PATH", "add_metrics_routes"]
