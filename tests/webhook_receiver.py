"""A webhook receiver for the tests, run as its own process: written from the Standard Webhooks
specification (https://www.standardwebhooks.com), not from the plugin's code.

    python -m tests.webhook_receiver PORT SECRET LOG [FAILURES]

It verifies every request's signature (HMAC-SHA256 over "{webhook-id}.{webhook-timestamp}.{body}"
with the base64-decoded secret after "whsec_"; any of the space-separated "v1," signatures may
match; the timestamp within five minutes), answers 500 to the first FAILURES requests of each
webhook-id, 401 to a bad signature and 204 otherwise, and appends one JSON line per request to LOG
(with its Host header).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def verified(secret: str, headers: dict[str, str], body: bytes, *, tolerance: int = 300) -> bool:
    msg_id, timestamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not msg_id or not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = base64.b64encode(
        hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    ).decode()
    for candidate in headers.get("webhook-signature", "").split(" "):
        version, _, signature = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(signature, expected):
            return True
    return False


def main() -> None:
    port, secret, log_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    failures = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    seen: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            ok = verified(secret, headers, body)
            msg_id = headers.get("webhook-id", "")
            seen[msg_id] = seen.get(msg_id, 0) + 1
            status = 401 if not ok else 500 if seen[msg_id] <= failures else 204
            with open(log_path, "a") as log:
                line = {
                    "id": msg_id,
                    "verified": ok,
                    "status": status,
                    "host": headers.get("host"),
                    "body": json.loads(body or b"null"),
                }
                log.write(json.dumps(line) + "\n")
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
