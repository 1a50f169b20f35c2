"""A fake of the few Stripe API calls the plugin makes, run as its own process:

    python -m tests.fake_stripe PORT LOG

POST /v1/checkout/sessions (form-encoded, as Stripe takes it) answers a Checkout Session, and POST
/v1/payment_intents a succeeded PaymentIntent (a card_error for pm_card_chargeDeclined); each
request is appended to LOG as one JSON line (its path, parsed form and headers), so tests can see
what Stripe was asked for.
"""

from __future__ import annotations

import json
import secrets
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl


def main() -> None:
    port, log_path = int(sys.argv[1]), sys.argv[2]
    sessions: dict[str, dict[str, object]] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
            form = dict(parse_qsl(body))
            with open(log_path, "a") as log:
                log.write(json.dumps({"path": self.path, "form": form, "headers": dict(self.headers)}) + "\n")
            if not self.headers.get("authorization", "").startswith("Bearer sk_test_"):
                return self._send(401, {"error": {"type": "invalid_request_error", "message": "bad key"}})
            key = self.headers.get("idempotency-key", "")
            if key in sessions:  # Stripe answers a repeated idempotency key with the first result
                return self._send(200, sessions[key])
            if self.path == "/v1/payment_intents":
                if form.get("payment_method") == "pm_card_chargeDeclined":
                    declined = {
                        "type": "card_error",
                        "code": "card_declined",
                        "message": "Your card was declined.",
                    }
                    return self._send(402, {"error": declined})
                intent = {
                    "id": "pi_" + secrets.token_hex(12),
                    "object": "payment_intent",
                    "status": "succeeded",
                    "amount": int(form.get("amount", "0")),
                    "currency": form.get("currency"),
                    "customer": form.get("customer"),
                    "metadata": {k[9:-1]: v for k, v in form.items() if k.startswith("metadata[")},
                }
                sessions[key] = intent
                return self._send(200, intent)
            if self.path != "/v1/checkout/sessions":
                return self._send(
                    404, {"error": {"type": "invalid_request_error", "message": "no such route"}}
                )
            session_id = "cs_test_" + secrets.token_hex(12)
            session = {
                "id": session_id,
                "object": "checkout.session",
                "url": f"https://checkout.stripe.test/c/pay/{session_id}",
                "status": "open",
                "payment_status": "unpaid",
                "mode": form.get("mode"),
                "currency": form.get("line_items[0][price_data][currency]"),
                "amount_total": int(form.get("line_items[0][price_data][unit_amount]", "0")),
                "client_reference_id": form.get("client_reference_id"),
                "metadata": {k[9:-1]: v for k, v in form.items() if k.startswith("metadata[")},
            }
            sessions[key] = session
            self._send(200, session)

        def _send(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
