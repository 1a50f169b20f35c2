"""The credits API through the real proxy: history filters, export, usage, caps, price quotes."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from datetime import date, datetime, timedelta, timezone
from typing import Any

import httpx
import openai
import pytest

from litellm_credits.api.user import csv_cell
from litellm_credits.ledger import Ledger
from litellm_credits.money import parse_credits as c

from .conftest import Proxy

pytestmark = pytest.mark.proxy


def user_client(proxy: Proxy, key: str) -> httpx.Client:
    return httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def call(proxy: Proxy, key: str, content: str, **extra: object) -> None:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0) as oa:
        oa.chat.completions.create(
            model="fake-custom",
            messages=[{"role": "user", "content": content}],
            **{"max_tokens": 1000, **extra},
        )


def wait_for_usage(client: httpx.Client, count: int) -> None:
    deadline = time.monotonic() + 20
    while client.get("/api/v1/credits/transactions", params={"type": "usage"}).json()["total"] < count:
        assert time.monotonic() < deadline, "usage was not settled"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def busy_account(proxy: Proxy) -> tuple[str, str]:
    """An account with two grants (one with a formula-like reason) and two settled requests."""
    user, key = proxy.create_account("10")
    with proxy.admin() as admin:
        admin.post(
            "/api/v1/admin/credits/allocate",
            json={"user_id": user, "amount": "5", "type": "bonus", "reason": '=HYPERLINK("http://x","y")'},
        ).raise_for_status()
    call(proxy, key, "usage=1000,1000")  # 4.4 credits at balanced
    call(proxy, key, "usage=1000,1000", extra_body={"metadata": {"power_level": "eco"}})  # 2.2
    with user_client(proxy, key) as c:
        wait_for_usage(c, 2)
    return user, key


def test_transaction_filters(proxy: Proxy, busy_account: tuple[str, str]) -> None:
    _, key = busy_account
    with user_client(proxy, key) as c:

        def total(**params: object) -> int:
            r = c.get("/api/v1/credits/transactions", params=params)
            assert r.status_code == 200, r.text
            return int(r.json()["total"])

        assert total() == 4
        assert total(type="usage") == 2
        assert total(type="bonus") == 1
        today = date.today()
        assert total(start_date=today.isoformat()) == 4
        assert total(start_date=(today + timedelta(days=1)).isoformat()) == 0
        assert total(end_date=(today - timedelta(days=1)).isoformat()) == 0
        assert total(end_date=today.isoformat(), type="allocation") == 1
        bad = c.get("/api/v1/credits/transactions", params={"type": "theft"})
        assert bad.status_code == 422 and bad.json()["error"]["type"] == "validation_error"


def test_one_transaction_and_other_accounts(proxy: Proxy, busy_account: tuple[str, str]) -> None:
    _, key = busy_account
    _, other_key = proxy.create_account("1")
    with user_client(proxy, key) as c, user_client(proxy, other_key) as other:
        first = c.get("/api/v1/credits/transactions", params={"limit": 1}).json()["items"][0]
        one = c.get(f"/api/v1/credits/transactions/{first['id']}")
        assert one.status_code == 200 and one.json() == first
        # another account's transaction id is not found, not forbidden: nothing is disclosed
        r = other.get(f"/api/v1/credits/transactions/{first['id']}")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
        assert c.get("/api/v1/credits/transactions/abc").status_code == 422


def test_csv_export_streams_the_ledger_safely(proxy: Proxy, busy_account: tuple[str, str]) -> None:
    _, key = busy_account
    with user_client(proxy, key) as c:
        r = c.get("/api/v1/credits/transactions/export", params={"format": "csv"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/csv")
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "attachment" in r.headers["content-disposition"]
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert [row["type"] for row in rows] == ["allocation", "bonus", "usage", "usage"]
        assert [row["amount"] for row in rows] == ["10.000000", "5.000000", "-4.400000", "-2.200000"]
        assert rows[1]["description"] == '\'=HYPERLINK("http://x","y")'
        assert rows[-1]["balance_after"] == "8.400000"
        only_usage = c.get("/api/v1/credits/transactions/export", params={"type": "usage"})
        assert len(list(csv.DictReader(io.StringIO(only_usage.text)))) == 2
        assert c.get("/api/v1/credits/transactions/export", params={"format": "xlsx"}).status_code == 422


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ("=1+1", "'=1+1"),
        ("+cmd", "'+cmd"),
        ("-x", "'-x"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("-4.400000", "-4.400000"),
        ("plain", "plain"),
        (None, ""),
    ],
)
def test_csv_cells_never_start_a_formula(value: object, cell: str) -> None:
    assert csv_cell(value) == cell


def test_usage_statistics(proxy: Proxy, busy_account: tuple[str, str]) -> None:
    _, key = busy_account
    with user_client(proxy, key) as c:
        stats = c.get("/api/v1/credits/usage/stats", params={"days": 7}).json()
        assert (stats["requests"], stats["succeeded"], stats["failed"]) == (2, 2, 0)
        assert (stats["prompt_tokens"], stats["completion_tokens"]) == (2000, 2000)
        assert (stats["cost"], stats["charged"]) == ("6.600000", "6.600000")
        assert [d["date"] for d in stats["daily"]] == [date.today().isoformat()]
        by_level = c.get("/api/v1/credits/usage/by-power-level").json()["items"]
        assert {i["power_level"]: i["charged"] for i in by_level} == {
            "balanced": "4.400000",
            "eco": "2.200000",
        }
        by_model = c.get("/api/v1/credits/usage/by-model").json()["items"]
        assert [(i["model"], i["requests"]) for i in by_model] == [("fake-custom", 2)]
        by_service = c.get("/api/v1/credits/usage/by-service").json()["items"]
        assert [(i["service"], i["charged"]) for i in by_service] == [("chat", "6.600000")]
        empty = c.get(
            "/api/v1/credits/usage/stats", params={"start_date": "2020-01-01", "end_date": "2020-01-31"}
        )
        assert empty.json()["requests"] == 0 and empty.json()["charged"] == "0.000000"
        assert c.get("/api/v1/credits/usage/stats", params={"days": 0}).status_code == 422


def test_balance_with_history(proxy: Proxy, busy_account: tuple[str, str]) -> None:
    _, key = busy_account
    with user_client(proxy, key) as c:
        plain = c.get("/api/v1/credits/balance").json()
        assert "recent_transactions" not in plain
        full = c.get("/api/v1/credits/balance", params={"include_history": "true"}).json()
        assert full["balance"] == "8.400000"
        assert [t["type"] for t in full["recent_transactions"]] == ["usage", "usage", "bonus", "allocation"]


def test_monthly_cap_routes(proxy: Proxy) -> None:
    user, key = proxy.create_account("100")
    other, _ = proxy.create_account("1")
    with user_client(proxy, key) as c:
        assert c.get("/api/v1/credits/monthly-cap").json()["monthly_cap"] is None
        r = c.post("/api/v1/credits/monthly-cap", json={"monthly_cap": "5"})
        assert r.status_code == 200, r.text
        assert (r.json()["monthly_cap"], r.json()["remaining"]) == ("5.000000", "5.000000")
        call(proxy, key, "usage=1000,1000", max_tokens=100)  # 4.4
        wait_for_usage(c, 1)
        cap = c.get("/api/v1/credits/monthly-cap").json()
        assert (cap["month_spend"], cap["remaining"]) == ("4.400000", "0.600000")
        assert cap["resets_at"].endswith("T00:00:00+00:00")
        with pytest.raises(openai.APIStatusError) as err:
            call(proxy, key, "hi")
        assert err.value.body["type"] == "monthly_cap_exceeded"  # type: ignore[index]
        assert c.post("/api/v1/credits/monthly-cap", json={"monthly_cap": None}).json()["monthly_cap"] is None
        for bad in ("-1", "1.0000001", "lots"):
            assert c.post("/api/v1/credits/monthly-cap", json={"monthly_cap": bad}).status_code == 422
        assert c.post("/api/v1/credits/monthly-cap", json={}).status_code == 422
        forbidden = c.post(
            "/api/v1/credits/monthly-cap", params={"user_id": other}, json={"monthly_cap": "0"}
        )
        assert forbidden.status_code == 403
    assert user


def test_calculate_cost_quotes_without_charging(proxy: Proxy) -> None:
    _, key = proxy.create_account("1")
    with user_client(proxy, key) as c:

        def quote(**body: object) -> httpx.Response:
            return c.post("/api/v1/credits/calculate-cost", json=body)

        r = quote(model="fake-custom", prompt_tokens=1000, completion_tokens=1000)
        assert r.status_code == 200, r.text
        assert (r.json()["cost"], r.json()["usd"], r.json()["tier"]) == ("4.400000", "0.0044", "free")
        costs = [
            quote(model="fake-custom", prompt_tokens=1000, completion_tokens=1000, power_level=level).json()[
                "cost"
            ]
            for level in ("eco", "balanced", "precision")
        ]
        assert costs == ["2.200000", "4.400000", "8.800000"]
        assert (
            quote(model="fake-free", prompt_tokens=10**6, completion_tokens=10**6).json()["cost"]
            == "0.000000"
        )
        unpriced = quote(model="fake-unpriced", prompt_tokens=1)
        assert unpriced.status_code == 400 and unpriced.json()["error"]["type"] == "model_not_priced"
        assert quote(model="fake-custom", prompt_tokens=-1).status_code == 422
        assert quote(model="fake-custom", power_level="turbo").status_code == 422
        assert c.get("/api/v1/credits/balance").json()["balance"] == "1.000000"


def test_every_route_is_documented(proxy: Proxy) -> None:
    spec = httpx.get(proxy.url + "/openapi.json", timeout=30).json()
    ours = {path for path in spec["paths"] if path.startswith("/api/v1/")}
    assert {
        "/api/v1/admin/credits/accounts",
        "/api/v1/admin/credits/allocate",
        "/api/v1/credits/balance",
        "/api/v1/credits/transactions",
        "/api/v1/credits/transactions/export",
        "/api/v1/credits/transactions/{transaction_id}",
        "/api/v1/credits/usage/stats",
        "/api/v1/credits/usage/by-model",
        "/api/v1/credits/usage/by-power-level",
        "/api/v1/credits/usage/by-service",
        "/api/v1/credits/monthly-cap",
        "/api/v1/credits/calculate-cost",
    } <= ours
    allocate = spec["paths"]["/api/v1/admin/credits/allocate"]["post"]
    assert "requestBody" in allocate and "200" in allocate["responses"]


def service_key(proxy: Proxy) -> str:
    owner, _ = proxy.create_account("0")
    with proxy.admin() as admin:
        r = admin.post(
            "/api/v1/admin/credits/keys", json={"user_id": owner, "role": "service", "name": "search"}
        )
        assert r.status_code == 201, r.text
        return str(r.json()["api_key"])


def test_services_outside_the_proxy_are_charged_once(proxy: Proxy) -> None:
    user, key = proxy.create_account("10")
    with user_client(proxy, service_key(proxy)) as svc, user_client(proxy, key) as me:
        charge = {"user_id": user, "amount": "1.5", "idempotency_key": "search-0001", "service": "search"}
        assert me.post("/api/v1/credits/deduct", json=charge).status_code == 403  # users cannot charge
        first = svc.post("/api/v1/credits/deduct", json=charge)
        assert first.status_code == 200, first.text
        assert (first.json()["charged"], first.json()["balance"], first.json()["replayed"]) == (
            "1.500000", "8.500000", False)  # fmt: skip
        again = svc.post("/api/v1/credits/deduct", json=charge).json()
        assert (again["charged"], again["balance"], again["replayed"]) == ("0.000000", "8.500000", True)
        assert again["transaction_id"] == first.json()["transaction_id"]
        other_amount = svc.post("/api/v1/credits/deduct", json={**charge, "amount": "2"})
        assert other_amount.status_code == 409
        assert other_amount.json()["error"]["type"] == "idempotency_conflict"
        too_much = svc.post(
            "/api/v1/credits/deduct", json={**charge, "idempotency_key": "big", "amount": "100"}
        )
        assert too_much.status_code == 402 and too_much.json()["error"]["type"] == "insufficient_credits"
        usage = {"model": "fake-custom", "prompt_tokens": 1000, "completion_tokens": 1000}
        priced = svc.post(
            "/api/v1/credits/calculate-and-deduct",
            json={"user_id": user, "idempotency_key": "tts-1", "service": "audio_speech", **usage},
        )
        assert priced.status_code == 200, priced.text
        assert (priced.json()["cost"], priced.json()["charged"], priced.json()["balance"]) == (
            "4.400000", "4.400000", "4.100000")  # fmt: skip
        by_service = {
            i["service"]: i["charged"] for i in me.get("/api/v1/credits/usage/by-service").json()["items"]
        }
        assert by_service == {"search": "1.500000", "audio_speech": "4.400000"}
        history = me.get("/api/v1/credits/transactions", params={"type": "usage"}).json()
        assert [t["amount"] for t in history["items"]] == ["-4.400000", "-1.500000"]
        bad = svc.post("/api/v1/credits/deduct", json={**charge, "idempotency_key": "x", "amount": "-1"})
        assert bad.status_code == 422


def test_unlimited_accounts_are_metered_not_debited_by_services(proxy: Proxy) -> None:
    user, _ = proxy.create_account("0", tier="sponsored")
    with user_client(proxy, service_key(proxy)) as svc:
        r = svc.post(
            "/api/v1/credits/deduct",
            json={"user_id": user, "amount": "3", "idempotency_key": "s-1", "service": "search"},
        )
        assert r.status_code == 200, r.text
        assert (r.json()["cost"], r.json()["charged"], r.json()["balance"]) == (
            "3.000000",
            "0.000000",
            "0.000000",
        )


def test_key_lifecycle(proxy: Proxy) -> None:
    with proxy.admin() as admin:
        user = "keys-" + str(time.monotonic_ns())
        created = admin.post("/api/v1/admin/credits/accounts", json={"user_id": user}).json()
        first_key, first_id = created["api_key"], created["key_id"]
        listed = admin.get("/api/v1/admin/credits/keys", params={"user_id": user}).json()
        assert [(k["id"], k["role"], k["revoked_at"]) for k in listed] == [(first_id, "user", None)]
        assert "api_key" not in listed[0] and first_key not in str(listed)
        rotated = admin.post(f"/api/v1/admin/credits/keys/{first_id}/rotate")
        assert rotated.status_code == 201
        second_key, second_id = rotated.json()["api_key"], rotated.json()["id"]
        with user_client(proxy, first_key) as old, user_client(proxy, second_key) as new:
            assert old.get("/api/v1/credits/balance").status_code == 401
            assert new.get("/api/v1/credits/balance").json()["user_id"] == user
            assert new.post("/api/v1/admin/credits/keys", json={"user_id": user}).status_code == 403
            assert admin.post(f"/api/v1/admin/credits/keys/{second_id}/revoke").status_code == 200
            assert new.get("/api/v1/credits/balance").status_code == 401
        again = admin.post(f"/api/v1/admin/credits/keys/{second_id}/revoke")
        assert again.status_code == 404 and again.json()["error"]["type"] == "not_found"
        assert admin.post(f"/api/v1/admin/credits/keys/{first_id}/rotate").status_code == 404
        missing = admin.post("/api/v1/admin/credits/keys", json={"user_id": "nobody-here"})
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "account_not_found"


def test_account_administration(proxy: Proxy) -> None:
    tag = "adm" + str(time.monotonic_ns())
    ids = []
    with proxy.admin() as admin:
        for i in range(3):
            body = {
                "user_id": f"{tag}-{i}",
                "display_name": f"Team {tag} {i}",
                "tier": "pro" if i == 2 else "free",
            }
            assert admin.post("/api/v1/admin/credits/accounts", json=body).status_code == 201
            ids.append(body["user_id"])
        page = admin.get("/api/v1/admin/credits/accounts", params={"search": tag, "limit": 2}).json()
        assert page["total"] == 3 and len(page["items"]) == 2
        assert (
            admin.get("/api/v1/admin/credits/accounts", params={"search": tag, "tier": "pro"}).json()["total"]
            == 1
        )
        # LIKE wildcards in the search are literal
        assert admin.get("/api/v1/admin/credits/accounts", params={"search": tag + "%"}).json()["total"] == 0
        one = admin.get(f"/api/v1/admin/credits/accounts/{ids[0]}").json()
        assert (one["user_id"], one["tier"]) == (ids[0], "free")
        changed = admin.patch(
            f"/api/v1/admin/credits/accounts/{ids[0]}", json={"tier": "pro", "monthly_cap": "12"}
        )
        assert changed.status_code == 200, changed.text
        assert (changed.json()["tier"], changed.json()["monthly_cap"], changed.json()["display_name"]) == (
            "pro", "12.000000", f"Team {tag} 0")  # fmt: skip
        uncapped = admin.patch(f"/api/v1/admin/credits/accounts/{ids[0]}", json={"monthly_cap": None}).json()
        assert (uncapped["monthly_cap"], uncapped["tier"]) == (None, "pro")
        bad_tier = admin.patch(f"/api/v1/admin/credits/accounts/{ids[0]}", json={"tier": "platinum"})
        assert bad_tier.status_code == 400 and bad_tier.json()["error"]["param"] == "tier"
        assert admin.get("/api/v1/admin/credits/accounts/nobody-at-all").status_code == 404
        assert admin.post(f"/api/v1/admin/credits/accounts/{ids[1]}/disable").json()["status"] == "disabled"
        disabled = admin.get("/api/v1/admin/credits/accounts", params={"search": tag, "status": "disabled"})
        assert disabled.json()["total"] == 1
        assert admin.post(f"/api/v1/admin/credits/accounts/{ids[1]}/enable").json()["status"] == "active"


def test_disabled_accounts_cannot_spend(proxy: Proxy) -> None:
    user, key = proxy.create_account("10")
    with proxy.admin() as admin:
        admin.post(f"/api/v1/admin/credits/accounts/{user}/disable").raise_for_status()
        with pytest.raises(openai.PermissionDeniedError) as err:
            call(proxy, key, "hi")
        assert err.value.body["type"] == "account_disabled"  # type: ignore[index]
        admin.post(f"/api/v1/admin/credits/accounts/{user}/enable").raise_for_status()
    call(proxy, key, "hi")


def test_refund_through_the_api(proxy: Proxy) -> None:
    user, key = proxy.create_account("10")
    call(proxy, key, "usage=1000,1000")  # 4.4
    with user_client(proxy, key) as me, proxy.admin() as admin:
        wait_for_usage(me, 1)
        usage_id = me.get("/api/v1/credits/transactions", params={"type": "usage"}).json()["items"][0]["id"]
        assert (
            me.post(
                "/api/v1/admin/credits/refund", json={"user_id": user, "transaction_id": usage_id}
            ).status_code
            == 403
        )
        part = admin.post(
            "/api/v1/admin/credits/refund",
            json={"user_id": user, "transaction_id": usage_id, "amount": "1.4", "reason": "slow answer"},
        )
        assert part.status_code == 200, part.text
        assert (part.json()["balance"], part.json()["transaction"]["type"]) == ("7.000000", "refund")
        over = admin.post(
            "/api/v1/admin/credits/refund", json={"user_id": user, "transaction_id": usage_id, "amount": "5"}
        )
        assert over.status_code == 400 and over.json()["error"]["type"] == "refund_exceeds_charge"
        assert over.json()["error"]["details"]["refundable"] == "3.000000"
        rest = admin.post("/api/v1/admin/credits/refund", json={"user_id": user, "transaction_id": usage_id})
        assert rest.json()["balance"] == "10.000000"
        done = admin.post("/api/v1/admin/credits/refund", json={"user_id": user, "transaction_id": usage_id})
        assert done.status_code == 409


def test_bulk_allocate_all_or_nothing(proxy: Proxy) -> None:
    a, _ = proxy.create_account("0")
    b, _ = proxy.create_account("0")
    with proxy.admin() as admin:
        items = [{"user_id": a, "amount": "1.5"}, {"user_id": b, "amount": "2"}]
        missing = admin.post(
            "/api/v1/admin/credits/bulk-allocate",
            json={"items": [*items, {"user_id": "no-such-user-x", "amount": "1"}]},
        )
        assert missing.status_code == 404
        assert missing.json()["error"]["details"]["missing"] == ["no-such-user-x"]
        assert admin.get(f"/api/v1/admin/credits/accounts/{a}").json()["balance"] == "0.000000"
        ok = admin.post(
            "/api/v1/admin/credits/bulk-allocate",
            json={"items": items, "reason": "launch promo", "idempotency_key": "promo"},
        )
        assert ok.status_code == 200, ok.text
        assert (ok.json()["count"], ok.json()["total"]) == (2, "3.500000")
        replay = admin.post(
            "/api/v1/admin/credits/bulk-allocate", json={"items": items, "idempotency_key": "promo"}
        )
        assert {i["transaction_id"] for i in replay.json()["items"]} == {
            i["transaction_id"] for i in ok.json()["items"]
        }
        assert admin.get(f"/api/v1/admin/credits/accounts/{b}").json()["balance"] == "2.000000"
        dup = admin.post("/api/v1/admin/credits/bulk-allocate", json={"items": [items[0], items[0]]})
        assert dup.status_code == 422
        assert admin.post("/api/v1/admin/credits/bulk-allocate", json={"items": []}).status_code == 422


async def test_admin_analytics_match_hand_computed_values(proxy: Proxy, ledger: Ledger) -> None:
    """Seeded usage in a window of its own (March 2001) and accounts in a tier of their own."""
    tag = "an" + str(time.monotonic_ns())
    subjects = [f"{tag}-{i}" for i in range(3)]
    for s in subjects:
        await ledger.create_account(s, tier="free")
    # (subject index, day, charged, cost, status, prompt, completion)
    seeded = [
        (0, 1, 500_000, 500_000, "success", 100, 10),
        (0, 2, 1_500_000, 1_500_000, "success", 200, 20),
        (1, 2, 3_000_000, 3_000_000, "success", 300, 30),
        (2, 3, 0, 700_000, "success", 50, 5),  # an unlimited tier: cost recorded, nothing charged
        (1, 4, 0, 0, "failed", 0, 0),
    ]
    for n, (i, day, charged, cost, status, p, comp) in enumerate(seeded):
        await ledger.pool.execute(
            "INSERT INTO credits.usage_events (subject_id, request_id, model, cost, charged, status,"
            " prompt_tokens, completion_tokens, created_at) VALUES ($1, $2, 'm', $3, $4, $5, $6, $7, $8)",
            subjects[i], f"{tag}-{n}", cost, charged, status, p, comp,
            datetime(2001, 3, day, 12, tzinfo=timezone.utc),
        )  # fmt: skip
    window = {"start_date": "2001-03-01", "end_date": "2001-03-31"}
    with proxy.admin() as admin:
        system = admin.get("/api/v1/admin/credits/analytics/system", params=window).json()
        assert (system["requests"], system["succeeded"], system["failed"]) == (5, 4, 1)
        assert (system["prompt_tokens"], system["completion_tokens"]) == (650, 65)
        assert (system["cost"], system["charged"], system["active_accounts"]) == ("5.700000", "5.000000", 3)
        top = admin.get("/api/v1/admin/credits/analytics/top-spenders", params={**window, "limit": 2}).json()
        assert [(t["rank"], t["user_id"], t["charged"]) for t in top["items"]] == [
            (1, subjects[1], "3.000000"), (2, subjects[0], "2.000000")]  # fmt: skip
        march_2 = admin.get(
            "/api/v1/admin/credits/analytics/system",
            params={"start_date": "2001-03-02", "end_date": "2001-03-02"},
        ).json()
        assert (march_2["requests"], march_2["charged"]) == (2, "4.500000")

    tier = "dist-" + tag
    for balance in (-2_000_000, 0, 500_000, 5_000_000, 50_000_000, 50_000_000, 2_000_000_000):
        s = f"{tier}-{balance}-{time.monotonic_ns()}"
        await ledger.create_account(s, tier=tier)
        if balance > 0:
            await ledger.credit(s, balance)
        elif balance < 0:
            await ledger.credit(s, balance, type="adjustment")
    with proxy.admin() as admin:
        dist = admin.get("/api/v1/admin/credits/analytics/distribution").json()
        [ours] = [t for t in dist["tiers"] if t["tier"] == tier]
        assert (ours["accounts"], ours["balance"]) == (7, "2103.500000")
        assert [b["accounts"] for b in ours["histogram"]] == [1, 2, 1, 2, 0, 1]
        with user_client(proxy, proxy.create_account("1")[1]) as user:
            assert user.get("/api/v1/admin/credits/analytics/system").status_code == 403


def test_coupons_through_the_api(proxy: Proxy) -> None:
    tag = str(time.monotonic_ns())[-8:]
    user, key = proxy.create_account("0")
    with proxy.admin() as admin, user_client(proxy, key) as me:
        made = admin.post(
            "/api/v1/admin/credits/coupons",
            json={"code": f"WELCOME{tag}", "type": "fixed", "value": "5", "max_uses": 100},
        )
        assert made.status_code == 201, made.text
        admin.post(
            "/api/v1/admin/credits/coupons", json={"code": f"BOOST{tag}", "type": "percent", "value": "10"}
        ).raise_for_status()
        admin.post("/api/v1/admin/credits/coupons",
                   json={"code": f"OLD{tag}", "type": "fixed", "value": "1",
                         "expires_at": "2020-01-01T00:00:00Z"}).raise_for_status()  # fmt: skip
        dup = admin.post(
            "/api/v1/admin/credits/coupons", json={"code": f"welcome{tag}", "type": "fixed", "value": "1"}
        )
        assert dup.status_code == 409 and dup.json()["error"]["type"] == "coupon_exists"
        coupons_url = "/api/v1/admin/credits/coupons"
        too_short = {"code": "x", "type": "fixed", "value": "1"}
        assert admin.post(coupons_url, json=too_short).status_code == 422
        too_much = {"code": f"P{tag}", "type": "percent", "value": "5000"}
        assert admin.post(coupons_url, json=too_much).status_code == 422
        by_user = {"code": f"U{tag}", "type": "fixed", "value": "1"}
        assert me.post(coupons_url, json=by_user).status_code == 403

        def redeem(code: str) -> httpx.Response:
            return me.post("/api/v1/credits/coupons/redeem", json={"code": code})

        ok = redeem(f"welcome{tag}")
        assert ok.status_code == 200, ok.text
        assert (ok.json()["credited"], ok.json()["balance"]) == ("5.000000", "5.000000")
        for code, status, error in [
            (f"WELCOME{tag}", 409, "coupon_already_redeemed"),
            (f"OLD{tag}", 410, "coupon_expired"),
            (f"MISSING{tag}", 404, "coupon_not_found"),
        ]:
            r = redeem(code)
            assert (r.status_code, r.json()["error"]["type"]) == (status, error)
        assert redeem(f"BOOST{tag}").json()["credited"] == "0.000000"
        admin.post(
            "/api/v1/admin/credits/allocate", json={"user_id": user, "amount": "20"}
        ).raise_for_status()
        assert me.get("/api/v1/credits/balance").json()["balance"] == "27.000000"  # 5 + 20 + 10 % of 20
        gone = admin.post(f"/api/v1/admin/credits/coupons/WELCOME{tag}/deactivate")
        assert gone.json()["active"] is False and gone.json()["uses"] == 1
        listed = admin.get("/api/v1/admin/credits/coupons", params={"active": "false", "limit": 1000}).json()
        assert f"WELCOME{tag}" in {c["code"] for c in listed["items"]}


def test_keyset_paging_walks_the_whole_ledger(proxy: Proxy, busy_account: tuple[str, str]) -> None:
    _, key = busy_account
    with user_client(proxy, key) as c:
        by_offset = [
            t["id"] for t in c.get("/api/v1/credits/transactions", params={"limit": 100}).json()["items"]
        ]
        walked, before = [], None
        while True:
            params: dict[str, object] = {"limit": 1}
            if before is not None:
                params["before"] = before
            page = c.get("/api/v1/credits/transactions", params=params).json()
            walked += [t["id"] for t in page["items"]]
            before = page["next_before"]
            if before is None:
                break
        assert walked == by_offset and len(walked) == 4


def test_openrouter_accounts_through_the_proxy(proxy: Proxy, openrouter: Any) -> None:
    user, key = proxy.create_account("25")  # 25 credits = 0.025 USD: the key's cap, rounded down to cents
    with proxy.admin() as admin, user_client(proxy, key) as me:
        assert me.post("/api/v1/admin/credits/openrouter/accounts", json={"user_id": user}).status_code == 403
        r = admin.post("/api/v1/admin/credits/openrouter/accounts", json={"user_id": user})
        assert r.status_code == 201, r.text
        assert (r.json()["byok"], r.json()["credit_limit_usd"]) == (False, "0.020000")
        [stored] = [k for k in openrouter.keys.values() if k["name"] == f"credits:{user}"]
        assert stored["limit"] == 0.02
        assert stored["key"] not in r.text and r.json()["key"] == "…" + stored["key"][-4:]
        dup = admin.post("/api/v1/admin/credits/openrouter/accounts", json={"user_id": user})
        assert dup.status_code == 409
        admin.post(
            "/api/v1/admin/credits/allocate", json={"user_id": user, "amount": "100"}
        ).raise_for_status()
        stored["usage"] = 0.0123  # what OpenRouter has counted on the key so far
        synced = admin.post(f"/api/v1/admin/credits/openrouter/accounts/{user}/sync").json()
        assert synced["credit_limit_usd"] == "0.120000" and stored["limit"] == 0.12
        assert (synced["openrouter_usage_usd"], synced["openrouter_limit_remaining_usd"]) == (
            "0.0123",
            "0.1077",
        )
        assert synced["is_free_tier"] is False
        mine = me.get("/api/v1/credits/openrouter/key")
        assert mine.status_code == 200 and mine.json() == synced  # the user sees the same, masked
        assert me.delete("/api/v1/credits/openrouter/key").status_code == 403  # provisioned: the operator's
        assert admin.delete(f"/api/v1/admin/credits/openrouter/accounts/{user}").status_code == 204
        assert not [k for k in openrouter.keys.values() if k["name"] == f"credits:{user}"]
        bad = me.put("/api/v1/credits/openrouter/key", json={"key": "sk-or-v1-rejected-key-123456"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "key"
        own = me.put("/api/v1/credits/openrouter/key", json={"key": "sk-or-v1-good-users-own-key-9876"})
        assert own.status_code == 200 and own.json()["byok"] is True and own.json()["key"] == "…9876"
        assert "users-own" not in own.text
        assert me.delete("/api/v1/credits/openrouter/key").status_code == 204
        assert admin.get(f"/api/v1/admin/credits/openrouter/accounts/{user}").status_code == 404


async def test_openrouter_calls_use_the_accounts_own_key(
    proxy: Proxy, openrouter: Any, upstream: Any, ledger: Ledger
) -> None:
    plain, plain_key = proxy.create_account("10")
    provisioned, provisioned_key = proxy.create_account("10")
    byok, byok_key = proxy.create_account("0")  # pays OpenRouter itself: no credits needed
    with proxy.admin() as admin:
        admin.post(
            "/api/v1/admin/credits/openrouter/accounts", json={"user_id": provisioned}
        ).raise_for_status()
    [stored] = [k for k in openrouter.keys.values() if k["name"] == f"credits:{provisioned}"]
    own = "sk-or-v1-good-brought-by-the-user-0000"
    with user_client(proxy, byok_key) as me:
        me.put("/api/v1/credits/openrouter/key", json={"key": own}).raise_for_status()

    def call_or(key: str) -> str:
        with openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0) as oa:
            messages = [{"role": "user", "content": "usage=1000,1000"}]
            oa.chat.completions.create(model="or-paid", messages=messages, max_tokens=1000)  # type: ignore[arg-type]
        return str(upstream.authorizations[-1])

    assert call_or(plain_key) == "Bearer operator-openrouter-key"
    assert call_or(provisioned_key) == f"Bearer {stored['key']}"
    assert call_or(byok_key) == f"Bearer {own}"
    for subject in (plain, provisioned, byok):
        deadline = time.monotonic() + 20
        while await ledger.pool.fetchval(
            "SELECT count(*) FROM credits.holds WHERE subject_id = $1 AND status = 'open'", subject
        ):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    charged = {s: (await ledger.require_account(s)).balance for s in (plain, provisioned, byok)}
    # (1000 x 1e-6 + 1000 x 2e-6) USD = 0.003 USD, +10 % OpenRouter markup = 3.3 credits
    assert charged == {plain: c("10") - c("3.3"), provisioned: c("10") - c("3.3"), byok: 0}
    [event] = await ledger.pool.fetch(
        "SELECT cost, charged, metadata FROM credits.usage_events WHERE subject_id = $1", byok
    )
    # brought keys are metered at the full price even when nothing is charged
    assert (event["cost"], event["charged"]) == (c("3.3"), 0)
    assert event["metadata"]["byok"] is True and event["metadata"]["usd"] == "0.0033"


async def test_openrouter_models_priced_from_openrouters_list(proxy: Proxy, ledger: Ledger) -> None:
    user, key = proxy.create_account("10")
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0) as oa:
        for model in ("or-live", "or-zero"):
            oa.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "usage=1000,1000"}], max_tokens=1000
            )
    deadline = time.monotonic() + 20
    while (
        await ledger.pool.fetchval(
            "SELECT count(*) FROM credits.usage_events WHERE subject_id = $1 AND status = 'success'", user
        )
        < 2
    ):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    # (1000 x 0.000003 + 1000 x 0.000004) USD = 0.007 USD, +10 % = 7.7 credits; the zero-priced one is free
    assert (await ledger.require_account(user)).balance == c("10") - c("7.7")
