"""The web dashboard: static HTML, CSS and JS served by the proxy at ``/credits/``.

The page signs in with an API key (kept in ``sessionStorage``, sent as a bearer header) and
reads the credits API; this module only serves files. It serves exactly the files shipped in
this package, looked up by name in a table built once, so no path can reach outside it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import RedirectResponse

ROOT = Path(__file__).resolve().parent
PREFIX = "/credits"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # no hashed file names: revalidate every time, a 304 when the ETag still matches
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets(root: Path = ROOT) -> dict[str, Asset]:
    """Every servable file under ``root`` by its URL path (``js/app.js``); nothing else is served."""
    assets = {}
    for path in sorted(root.rglob("*")):
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file():
            continue
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        assets[path.relative_to(root).as_posix()] = Asset(body, content_type, etag)
    return assets


def _not_found() -> Response:
    return Response("Not found\n", status_code=404, media_type="text/plain; charset=utf-8", headers=HEADERS)


def build_dashboard_router(assets: dict[str, Asset] | None = None) -> APIRouter:
    """GET ``/credits`` (a redirect), ``/credits/`` (the page) and ``/credits/<file>``."""
    files = load_assets() if assets is None else assets
    router = APIRouter(include_in_schema=False)

    def serve(request: Request, name: str) -> Response:
        asset = files.get(name)
        if asset is None:
            return _not_found()
        headers = {**HEADERS, "ETag": asset.etag}
        if asset.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.content_type, headers=headers)

    @router.api_route(PREFIX, methods=["GET", "HEAD"])
    async def redirect(request: Request) -> Response:
        return RedirectResponse(f"{request.scope.get('root_path', '')}{PREFIX}/", status_code=308)

    @router.api_route(PREFIX + "/", methods=["GET", "HEAD"])
    async def index(request: Request) -> Response:
        return serve(request, "index.html")

    @router.api_route(PREFIX + "/{name:path}", methods=["GET", "HEAD"])
    async def asset(request: Request, name: str) -> Response:
        return serve(request, name)

    return router


def mount_dashboard(app: FastAPI) -> None:
    """Add the dashboard's routes to the proxy app."""
    app.include_router(build_dashboard_router())


__all__ = ["CSP", "PREFIX", "build_dashboard_router", "load_assets", "mount_dashboard"]
