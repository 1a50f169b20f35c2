"""A local stand-in for OpenRouter's key-management API, for tests that run the real proxy
(a separate process, out of respx's reach). Keys live in memory."""

from __future__ import annotations

import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PROVISIONING_KEY = "sk-or-v1-fake-provisioning-key-000000000000000000000000000000"


class _Handler(BaseHTTPRequestHandler):
    server: FakeOpenRouter  # type: ignore[assignment]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _auth(self) -> str:
        return self.headers.get("authorization", "").removeprefix("Bearer ")

    def _body(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _route(self, method: str) -> None:
        path = self.path.split("?")[0].removeprefix("/api/v1")
        keys = self.server.keys
        if path == "/key" and method == "GET":
            key = self._auth()
            known = next((k for k in keys.values() if k["key"] == key), None)
            if known is None and not key.startswith("sk-or-v1-good"):
                return self._send(401, {"error": {"message": "Invalid API key", "code": 401}})
            known = known or {"usage": 0, "limit": None}
            remaining = None if known["limit"] is None else round(known["limit"] - known["usage"], 12)
            return self._send(200, {"data": {
                "usage": known["usage"], "limit": known["limit"], "limit_remaining": remaining,
                "is_free_tier": known["limit"] is None,
            }})  # fmt: skip
        if path == "/models" and method == "GET":
            return self._send(200, {"data": [
                {"id": "vendor/live-model", "pricing": {"prompt": "0.000003", "completion": "0.000004"}},
                {"id": "lab/zero-priced", "pricing": {"prompt": "0", "completion": "0"}},
            ]})  # fmt: skip
        if self._auth() != PROVISIONING_KEY:
            return self._send(401, {"error": {"message": "No auth credentials found", "code": 401}})
        if path == "/keys" and method == "POST":
            body = self._body()
            h = secrets.token_hex(32)
            keys[h] = {"hash": h, "name": body.get("name"), "limit": body.get("limit"), "usage": 0,
                       "disabled": False, "key": "sk-or-v1-" + secrets.token_hex(32)}  # fmt: skip
            data = {k: v for k, v in keys[h].items() if k != "key"}
            return self._send(201, {"data": data, "key": keys[h]["key"]})
        if path.startswith("/keys/"):
            h = path.removeprefix("/keys/")
            if h not in keys:
                return self._send(404, {"error": {"message": "Not found", "code": 404}})
            if method == "PATCH":
                keys[h].update({k: v for k, v in self._body().items() if k in ("limit", "disabled", "name")})
            if method == "DELETE":
                del keys[h]
                return self._send(200, {"data": {"success": True}})
            return self._send(200, {"data": {k: v for k, v in keys[h].items() if k != "key"}})
        return self._send(404, {"error": {"message": "Not found", "code": 404}})

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def do_DELETE(self) -> None:
        self._route("DELETE")


class FakeOpenRouter(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.keys: dict[str, dict[str, Any]] = {}
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api/v1"

    def __enter__(self) -> FakeOpenRouter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
