"""Security of the credits API through the real proxy: authentication on every route, isolation
between accounts, validation, injection, headers, cross-site writes, error bodies."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from litellm_credits.api.routes import SECURITY_HEADERS
from litellm_credits.ledger import Ledger

from .conftest import Proxy

pytestmark = pytest.mark.proxy

SQL_PAYLOADS = [
    "' OR '1'='1",
    "'; DROP TABLE credits.credit_transactions; --",
    "x' UNION SELECT key_hash, subject_id FROM credits.api_keys --",
    "1; UPDATE credits.credit_accounts SET balance = 999999999999",
    '") OR 1=1 --',
    "%' OR subject_id LIKE '%",
]
# internals an error body must never show: drivers, stack traces, SQL, table names, keys
LEAKS = re.compile(
    r"asyncpg|psycopg|postgres|Traceback|File \"|SELECT |UPDATE |INSERT |sk-cr-"
    r"|credits\.(credit_|holds|usage_events|api_keys|coupon|schema_migrations)",
    re.I,
)


def routes(proxy: Proxy) -> list[tuple[str, str]]:
    spec = httpx.get(proxy.url + "/openapi.json", timeout=30).json()
    return [
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        if path.startswith("/api/v1/") and ("/credits/" in path or path.endswith("/credits"))
        for method in ops
    ]


def concrete(path: str) -> str:
    return (
        path.replace("{transaction_id}", "1").replace("{key_id}", "1").replace("{code}", "ABCDEF")
        .replace("{user_id}", "someone")
    )  # fmt: skip


def assert_clean(response: httpx.Response, echoed: str = "") -> None:
    """No 500 and no internals in the body (the caller's own input may be echoed back)."""
    assert response.status_code < 500, (response.status_code, response.text)
    text = response.text
    if echoed:
        text = text.replace(json.dumps(echoed)[1:-1], "")
    assert not LEAKS.search(text), response.text


# the one route a signature authenticates instead of a key
SIGNED_ROUTE = "/api/v1/credits/stripe/webhook"


def test_every_route_needs_a_key(proxy: Proxy) -> None:
    found = routes(proxy)
    assert len(found) >= 25
    with httpx.Client(base_url=proxy.url, timeout=30) as anonymous:
        for method, path in found:
            for headers in ({}, {"Authorization": "Bearer sk-cr-forged-key-forged-key-forged-key-123"}):
                r = anonymous.request(method, concrete(path), headers=headers, json={})
                if path == SIGNED_ROUTE:  # Stripe's webhook: its signature is its key
                    assert (r.status_code, r.json()["error"]["type"]) == (400, "invalid_signature"), r.text
                else:
                    assert r.status_code == 401, (method, path, r.status_code, r.text)
                    assert r.json()["error"]["type"] == "authentication_error"
                for name, value in SECURITY_HEADERS.items():
                    assert r.headers.get(name) == value, (method, path, name)


def test_admin_routes_refuse_user_keys(proxy: Proxy) -> None:
    _, key = proxy.create_account("1")
    with httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as user:
        for method, path in routes(proxy):
            if "/admin/" not in path:
                continue
            r = user.request(method, concrete(path), json={})
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["error"]["type"] == "permission_denied"


def test_accounts_are_isolated(proxy: Proxy) -> None:
    victim, victim_key = proxy.create_account("10")
    _, key = proxy.create_account("1")
    with httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {victim_key}"}, timeout=30) as v:
        victim_tx = v.get("/api/v1/credits/transactions").json()["items"][0]["id"]
    with httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as me:
        for path in ("/api/v1/credits/balance", "/api/v1/credits/transactions", "/api/v1/credits/usage/stats",
                     "/api/v1/credits/monthly-cap", "/api/v1/credits/transactions/export"):  # fmt: skip
            r = me.get(path, params={"user_id": victim})
            assert r.status_code == 403, (path, r.text)
            assert victim not in r.text
        assert me.get(f"/api/v1/credits/transactions/{victim_tx}").status_code == 404
        assert me.post("/api/v1/credits/monthly-cap", params={"user_id": victim}, json={"monthly_cap": "0"}
                       ).status_code == 403  # fmt: skip
        assert me.post("/api/v1/credits/coupons/redeem", params={"user_id": victim}, json={"code": "ABCDEF"}
                       ).status_code == 403  # fmt: skip
        # a user_id in a body is never taken as the caller's identity on user routes
        charge = {"user_id": victim, "amount": "1", "idempotency_key": "k"}
        assert me.post("/api/v1/credits/deduct", json=charge).status_code == 403


async def test_sql_injection_payloads_change_nothing(proxy: Proxy, ledger: Ledger) -> None:
    user, key = proxy.create_account("5")
    before = await ledger.pool.fetchval("SELECT count(*) FROM credits.credit_transactions")
    balances = await ledger.pool.fetchval("SELECT sum(balance) FROM credits.credit_accounts")
    with (
        proxy.admin() as admin,
        httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as me,
    ):
        for p in SQL_PAYLOADS:
            requests: list[tuple[httpx.Client, str, str, dict[str, Any]]] = [
                (admin, "GET", "/api/v1/credits/balance", {"params": {"user_id": p}}),
                (admin, "GET", "/api/v1/credits/transactions", {"params": {"user_id": p, "type": p}}),
                (admin, "GET", "/api/v1/admin/credits/accounts", {"params": {"search": p, "tier": p}}),
                (admin, "GET", f"/api/v1/admin/credits/accounts/{p}", {}),
                (admin, "GET", "/api/v1/admin/credits/keys", {"params": {"user_id": p}}),
                (admin, "POST", "/api/v1/admin/credits/allocate", {"json": {"user_id": p, "amount": "1"}}),
                (admin, "POST", "/api/v1/admin/credits/allocate",
                 {"json": {"user_id": user, "amount": "1", "reason": p, "idempotency_key": p}}),
                (admin, "POST", "/api/v1/admin/credits/accounts",
                 {"json": {"user_id": p, "display_name": p}}),
                (admin, "POST", "/api/v1/admin/credits/coupons",
                 {"json": {"code": p, "type": "fixed", "value": "1"}}),
                (me, "POST", "/api/v1/credits/coupons/redeem", {"json": {"code": p}}),
                (me, "POST", "/api/v1/credits/calculate-cost", {"json": {"model": p, "prompt_tokens": 1}}),
                (me, "GET", "/api/v1/credits/usage/stats", {"params": {"start_date": p}}),
            ]  # fmt: skip
            for client, method, path, kwargs in requests:
                r = client.request(method, path, **kwargs)
                assert_clean(r, echoed=p)
                assert r.status_code in (200, 400, 403, 404, 409, 422), (method, path, p, r.text)
    # the only writes are the legitimate allocations with odd reasons (stored as given)
    after = await ledger.pool.fetchval("SELECT count(*) FROM credits.credit_transactions")
    assert after == before + len(SQL_PAYLOADS)
    assert await ledger.pool.fetchval("SELECT sum(balance) FROM credits.credit_accounts") == balances + len(
        SQL_PAYLOADS) * 1_000_000  # fmt: skip
    assert await ledger.discrepancies() == []
    stored = await ledger.pool.fetch(
        "SELECT description FROM credits.credit_transactions WHERE subject_id = $1 AND type = 'allocation'",
        user,
    )
    assert {r["description"] for r in stored} >= set(SQL_PAYLOADS)


def test_markup_is_stored_as_given_and_only_returned_as_json(proxy: Proxy) -> None:
    user, key = proxy.create_account("0")
    script = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    with proxy.admin() as admin:
        r = admin.post(
            "/api/v1/admin/credits/allocate", json={"user_id": user, "amount": "1", "reason": script}
        )
        assert r.status_code == 200
    with httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as me:
        page = me.get("/api/v1/credits/transactions")
        assert page.headers["content-type"].startswith("application/json")
        assert page.json()["items"][0]["description"] == script
        assert "<script>" not in page.text or page.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "body",
    [
        {"amount": "1", "reason": "line\x00break"},
        {"amount": "1", "reason": "bell\x07"},
        {"amount": "1", "reason": "x" * 501},
        {"amount": "1000000001"},  # above max_amount
        {"amount": 10**30},
        {"amount": "1e999999999"},
        {"amount": "NaN"},
        {"amount": "0.0000001"},
        {"amount": ["1"]},
        {"amount": "1", "unexpected": "field"},
    ],
)
def test_validation_gives_4xx_with_field_errors(proxy: Proxy, body: dict[str, Any]) -> None:
    user, _ = proxy.create_account("0")
    with proxy.admin() as admin:
        r = admin.post("/api/v1/admin/credits/allocate", json={"user_id": user, **body})
        assert r.status_code in (400, 422), r.text
        assert r.json()["error"]["type"] in ("validation_error", "invalid_request")
        assert_clean(r)


def test_cross_site_writes_with_a_browser_session_are_refused(proxy: Proxy) -> None:
    user, _ = proxy.create_account("0")
    body = {"user_id": user, "amount": "1"}
    evil = {"Origin": "https://evil.example", "Cookie": f"token={proxy.master_key}"}
    with httpx.Client(base_url=proxy.url, timeout=30) as browser:
        r = browser.post("/api/v1/admin/credits/allocate", json=body, headers=evil)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_denied"
        assert "cross-origin" in r.json()["error"]["message"]
        # reads are not state changes
        assert (
            browser.get("/api/v1/credits/balance", headers=evil).json()["error"]["type"]
            != "permission_denied"
        )
        # an API key in a header is not ambient authority: not a CSRF vector
        ok = browser.post("/api/v1/admin/credits/allocate", json=body,
                          headers={**evil, "Authorization": f"Bearer {proxy.master_key}"})  # fmt: skip
        assert ok.status_code == 200, ok.text
        same_site = browser.post("/api/v1/admin/credits/allocate", json=body,
                                 headers={**evil, "Origin": proxy.url})  # fmt: skip
        assert same_site.json().get("error", {}).get("type") != "permission_denied"
