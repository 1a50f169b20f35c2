"""End to end: the real LiteLLM proxy with the plugin, the official openai client, a fake upstream."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import httpx
import litellm
import openai
import pytest

from litellm_credits.ledger import Ledger
from litellm_credits.money import micro_ceil
from litellm_credits.money import parse_credits as c

from .conftest import Proxy

pytestmark = pytest.mark.proxy

CREDITS_PER_USD = Decimal(1000)
# gpt-4o-mini in LiteLLM's map, read exactly
GPT_IN = Decimal("1.5e-7")
GPT_OUT = Decimal("6e-7")
GPT_CACHED = Decimal("7.5e-8")


def client(proxy: Proxy, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=60)


def aclient(proxy: Proxy, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=120)


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


async def settled(ledger: Ledger, subject: str, requests: int, timeout: float = 30) -> None:
    """Wait until the proxy's background callbacks have resolved every hold of ``subject``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = await ledger.pool.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'open') AS open, count(*) AS total "
            "FROM credits.holds WHERE subject_id = $1",
            subject,
        )
        if row["open"] == 0 and row["total"] >= requests:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"holds of {subject} not resolved: {dict(row)}")


async def assert_balance_is_ledger_sum(ledger: Ledger, subject: str) -> None:
    account = await ledger.require_account(subject)
    total = await ledger.pool.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM credits.credit_transactions WHERE subject_id = $1", subject
    )
    assert account.balance == total
    assert account.held == 0


async def usage_rows(ledger: Ledger, subject: str) -> list[dict]:
    rows = await ledger.pool.fetch(
        "SELECT * FROM credits.usage_events WHERE subject_id = $1 ORDER BY id", subject
    )
    return [dict(r) for r in rows]


@pytest.mark.parametrize("stream", [False, True])
async def test_charge_is_the_price_table_applied_to_usage(proxy: Proxy, ledger: Ledger, stream: bool) -> None:
    user, key = proxy.create_account("10")
    messages = chat("usage=1234,567 cached=200")
    with client(proxy, key) as oa:
        if stream:
            chunks = list(oa.chat.completions.create(model="fake-gpt", messages=messages, stream=True))
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        else:
            reply = oa.chat.completions.create(model="fake-gpt", messages=messages)
            assert reply.usage is not None and reply.usage.prompt_tokens == 1234
    await settled(ledger, user, 1)
    expected_usd = (1234 - 200) * GPT_IN + 200 * GPT_CACHED + 567 * GPT_OUT
    expected = micro_ceil(expected_usd * CREDITS_PER_USD)
    account = await ledger.require_account(user)
    assert c("10") - account.balance == expected
    [event] = await usage_rows(ledger, user)
    assert (event["prompt_tokens"], event["completion_tokens"], event["cached_tokens"]) == (1234, 567, 200)
    assert (event["cost"], event["charged"], event["status"], event["service"]) == (
        expected,
        expected,
        "success",
        "chat",
    )
    # LiteLLM's own float estimate agrees to the micro-credit
    oracle = Decimal(event["metadata"]["litellm_response_cost"]) * CREDITS_PER_USD
    assert abs(oracle * 1_000_000 - expected) <= 1
    await assert_balance_is_ledger_sum(ledger, user)


async def test_deployment_prices_are_charged_exactly(proxy: Proxy, ledger: Ledger) -> None:
    user, key = proxy.create_account("10")
    with client(proxy, key) as oa:
        oa.chat.completions.create(model="fake-custom", messages=chat("usage=1000,1000"), max_tokens=1000)
    await settled(ledger, user, 1)
    # 1000 × 1.1e-6 + 1000 × 3.3e-6 = 0.0044 USD = exactly 4.4 credits
    assert (await ledger.require_account(user)).balance == c("10") - c("4.4")


async def test_free_model_costs_nothing(proxy: Proxy, ledger: Ledger) -> None:
    user, key = proxy.create_account("0.000001")
    with client(proxy, key) as oa:
        oa.chat.completions.create(model="fake-free", messages=chat("usage=5000,5000"))
    await settled(ledger, user, 1)
    assert (await ledger.require_account(user)).balance == c("0.000001")
    [event] = await usage_rows(ledger, user)
    assert (event["cost"], event["status"]) == (0, "success")


async def test_embeddings_are_metered(proxy: Proxy, ledger: Ledger) -> None:
    user, key = proxy.create_account("1")
    with client(proxy, key) as oa:
        oa.embeddings.create(model="fake-embed", input="some text to embed")
    await settled(ledger, user, 1)
    [event] = await usage_rows(ledger, user)
    price = Decimal(repr(litellm.model_cost["text-embedding-3-small"]["input_cost_per_token"]))
    assert event["service"] == "embedding" and event["prompt_tokens"] == 9
    assert event["charged"] == micro_ceil(9 * price * CREDITS_PER_USD)


def test_unpriced_model_is_refused(proxy: Proxy, upstream) -> None:  # type: ignore[no-untyped-def]
    _, key = proxy.create_account("10")
    before = len(upstream.requests)
    with client(proxy, key) as oa, pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(model="fake-unpriced", messages=chat("hi"))
    assert err.value.status_code == 400
    assert err.value.body["type"] == "model_not_priced"  # type: ignore[index]
    assert len(upstream.requests) == before  # never reached the upstream


def test_unknown_model_is_a_404_model_not_found(proxy: Proxy, upstream) -> None:  # type: ignore[no-untyped-def]
    """Regression: a misspelt model name was refused `400 model_not_priced` ("set a price")."""
    _, key = proxy.create_account("10")
    before = len(upstream.requests)
    with client(proxy, key) as oa, pytest.raises(openai.NotFoundError) as err:
        oa.chat.completions.create(model="fake-gtp", messages=chat("hi"))
    assert err.value.status_code == 404
    assert err.value.body["type"] == "model_not_found"  # type: ignore[index]
    assert "'fake-gtp' does not exist" in err.value.body["message"]  # type: ignore[index]
    assert len(upstream.requests) == before


def test_a_refusal_is_logged_once_without_litellms_error(proxy: Proxy) -> None:
    """Regression: LiteLLM logged every 402/403/429 of the pre-call hook at ERROR
    (`_handle_llm_api_exception(): Exception occured ...`); now it is one WARNING line of ours."""
    _, key = proxy.create_account("0")
    with client(proxy, key) as oa, pytest.raises(openai.APIStatusError) as err:
        oa.chat.completions.create(model="fake-custom", messages=chat("hi"), max_tokens=10)
    assert err.value.status_code == 402
    call_id = err.value.response.headers["x-litellm-call-id"]
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in proxy.log_path.read_text().splitlines() if call_id in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    [line] = lines  # LiteLLM's line about it names the call too: it is gone
    assert " WARNING litellm-credits: refused 402 insufficient_credits (model 'fake-custom'" in line


def _messages(proxy: Proxy, key: str, model: str = "fake-custom", **extra: object) -> httpx.Response:
    """A call to Anthropic's /v1/messages (the anthropic client is not installed here)."""
    body = {"model": model, "max_tokens": 100, "messages": chat("hi"), **extra}
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    return httpx.post(proxy.url + "/v1/messages", json=body, headers=headers, timeout=60)


def test_refusals_on_v1_messages_have_anthropics_error_shape(proxy: Proxy) -> None:
    """Regression: on /v1/messages every refusal was `api_error`, 402 included."""
    user, key = proxy.create_account("0")
    for stream in (False, True):
        r = _messages(proxy, key, stream=stream)
        assert r.status_code == 402, r.text
        body = r.json()
        assert body["type"] == "error"
        assert (body["error"]["type"], body["error"]["credits_type"]) == (
            "billing_error",
            "insufficient_credits",
        )
        assert body["error"]["message"].startswith("insufficient credits")
        assert body["error"]["details"]["available"] == "0.000000"
    r = _messages(proxy, key, model="fake-gtp")
    assert r.status_code == 404, r.text
    assert (r.json()["error"]["type"], r.json()["error"]["credits_type"]) == (
        "not_found_error",
        "model_not_found",
    )
    with proxy.admin() as admin:
        assert admin.post(f"/api/v1/admin/credits/accounts/{user}/disable").status_code == 200
    r = _messages(proxy, key)
    assert r.status_code == 403, r.text
    assert (r.json()["error"]["type"], r.json()["error"]["credits_type"]) == (
        "permission_error",
        "account_disabled",
    )


async def test_out_of_credits_is_a_402(proxy: Proxy, ledger: Ledger) -> None:
    user, key = proxy.create_account("0.001")
    with client(proxy, key) as oa, pytest.raises(openai.APIStatusError) as err:
        oa.chat.completions.create(model="fake-custom", messages=chat("hi"), max_tokens=1000)
    assert err.value.status_code == 402
    body = err.value.body
    assert body["type"] == "insufficient_credits"  # type: ignore[index]
    assert body["details"]["balance"] == "0.001000"  # type: ignore[index]
    assert c(body["details"]["required"]) > c("0.001")  # type: ignore[index]
    assert (await ledger.require_account(user)).held == 0


async def test_over_the_monthly_cap_is_a_402(proxy: Proxy, ledger: Ledger) -> None:
    user, key = proxy.create_account("100", monthly_cap="3")
    with client(proxy, key) as oa:
        oa.chat.completions.create(model="fake-custom", messages=chat("usage=1000,1000"), max_tokens=200)
        await settled(ledger, user, 1)
        with pytest.raises(openai.APIStatusError) as err:
            oa.chat.completions.create(model="fake-custom", messages=chat("hi"), max_tokens=1000)
    assert err.value.status_code == 402
    body = err.value.body
    assert body["type"] == "monthly_cap_exceeded"  # type: ignore[index]
    assert body["message"].startswith("monthly cap of 3.000000 credits reached")  # type: ignore[index]
    assert body["details"]["monthly_cap"] == "3.000000"  # type: ignore[index]
    assert body["details"]["month_spend"] == "4.400000"  # type: ignore[index]
    assert "resets_at" in body["details"]  # type: ignore[operator]


def test_a_request_the_cap_cannot_fit_would_exceed_it(proxy: Proxy) -> None:
    """Regression: a request over what was left of the monthly cap was told the cap was "reached"
    although nothing had been spent."""
    _, key = proxy.create_account("100", monthly_cap="3", tier="strict")
    with client(proxy, key) as oa, pytest.raises(openai.APIStatusError) as err:
        # 1000 output tokens at 3.3e-6 USD: 3.3 credits held, over the cap of 3
        oa.chat.completions.create(model="fake-custom", messages=chat("hi"), max_tokens=1000)
    assert err.value.status_code == 402
    body = err.value.body
    assert body["type"] == "monthly_cap_exceeded"  # type: ignore[index]
    assert body["message"].startswith(  # type: ignore[index]
        "this request would exceed the monthly cap of 3.000000 credits: "
    )
    assert "3.000000 left this month" in body["message"]  # type: ignore[index]
    assert body["details"]["month_spend"] == "0.000000"  # type: ignore[index]


def _estimate_request(max_tokens: int) -> tuple[list[dict[str, str]], int]:
    """A prompt whose upstream usage is its own worst case (+5 prompt tokens): (messages, tokens)."""
    counted = litellm.token_counter(model="fake-custom", messages=chat("usage=99999,99999"))
    return chat(f"usage={counted + 5},{max_tokens}"), counted


@pytest.mark.parametrize("limit", ["balance", "monthly_cap"])
async def test_a_hundred_concurrent_requests_cannot_overspend(
    proxy: Proxy, ledger: Ledger, limit: str
) -> None:
    max_tokens = 100
    messages, counted = _estimate_request(max_tokens)
    estimate = micro_ceil((counted * Decimal("1.1e-6") + max_tokens * Decimal("3.3e-6")) * CREDITS_PER_USD)
    actual = micro_ceil(
        ((counted + 5) * Decimal("1.1e-6") + max_tokens * Decimal("3.3e-6")) * CREDITS_PER_USD
    )
    if limit == "balance":
        user, key = proxy.create_account(str(Decimal(10 * estimate) / 1_000_000))
        refusal = "insufficient_credits"
    else:
        user, key = proxy.create_account("1000", monthly_cap=str(Decimal(10 * estimate) / 1_000_000))
        refusal = "monthly_cap_exceeded"

    async def one(oa: openai.AsyncOpenAI) -> str:
        try:
            await oa.chat.completions.create(model="fake-custom", messages=messages, max_tokens=max_tokens)
            return "ok"
        except openai.APIStatusError as exc:
            assert exc.status_code == 402, exc
            return exc.body["type"]  # type: ignore[index]

    async with aclient(proxy, key) as oa:
        results = await asyncio.gather(*(one(oa) for _ in range(100)))
    successes = results.count("ok")
    assert 1 <= successes <= 10
    assert set(results) <= {"ok", refusal}
    await settled(ledger, user, successes)
    account = await ledger.require_account(user)
    assert account.held == 0
    spent = successes * actual
    if limit == "balance":
        assert account.balance == 10 * estimate - spent
        assert account.balance >= -successes * (actual - estimate)  # only the overrun may go below zero
    else:
        assert account.month_spend == spent
        assert account.month_spend <= 10 * estimate + successes * (actual - estimate)
    await assert_balance_is_ledger_sum(ledger, user)


async def test_upstream_error_voids_the_hold(proxy: Proxy, ledger: Ledger) -> None:
    user, key = proxy.create_account("10")
    with client(proxy, key) as oa, pytest.raises(openai.APIStatusError):
        oa.chat.completions.create(model="fake-custom", messages=chat("error=500"), max_tokens=10)
    await settled(ledger, user, 1)
    account = await ledger.require_account(user)
    assert (account.balance, account.held) == (c("10"), 0)
    [event] = await usage_rows(ledger, user)
    assert (event["status"], event["charged"]) == ("failed", 0)


@pytest.mark.parametrize("how", ["clean", "chunked"])
async def test_upstream_dying_mid_stream_is_charged_at_most_what_was_delivered(
    proxy: Proxy, ledger: Ledger, how: str
) -> None:
    user, key = proxy.create_account("10")
    delivered: list[str] = []
    with client(proxy, key) as oa:
        try:
            stream = oa.chat.completions.create(
                model="fake-custom",
                messages=chat(f"die={how} words=6 usage=1000,1000"),
                stream=True,
                max_tokens=1000,
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    delivered.append(chunk.choices[0].delta.content)
        except (openai.APIError, httpx.HTTPError):
            pass  # the broken stream may surface as an error
    await settled(ledger, user, 1)
    account = await ledger.require_account(user)
    assert account.held == 0
    [event] = await usage_rows(ledger, user)
    charged = event["charged"]
    # never the usage the upstream would have claimed (1000 + 1000 tokens = 4.4 credits)
    assert charged < c("4.4")
    if event["status"] == "success":
        # tokens counted locally: the prompt plus at most the words that arrived (and a few for framing)
        assert event["completion_tokens"] <= 2 * 6 + 5
        price = event["prompt_tokens"] * Decimal("1.1e-6") + event["completion_tokens"] * Decimal("3.3e-6")
        assert charged == micro_ceil(price * CREDITS_PER_USD)
    else:
        assert (event["status"], charged) == ("failed", 0)
    await assert_balance_is_ledger_sum(ledger, user)


async def test_client_disconnect_mid_stream_charges_partial_usage(proxy: Proxy, ledger: Ledger) -> None:
    user, key = proxy.create_account("10")
    with client(proxy, key) as oa:
        stream = oa.chat.completions.create(
            model="fake-custom",
            messages=chat("words=40 chunkdelay=0.1 usage=1000,1000"),
            stream=True,
            max_tokens=1000,
        )
        for i, _chunk in enumerate(stream):
            if i == 3:
                stream.close()
                break
    await settled(ledger, user, 1, timeout=60)
    account = await ledger.require_account(user)
    assert account.held == 0
    [event] = await usage_rows(ledger, user)
    assert event["charged"] < c("4.4")  # not the full usage the upstream would have reported
    await assert_balance_is_ledger_sum(ledger, user)


def test_auth_errors(proxy: Proxy) -> None:
    _, key = proxy.create_account("1")
    with httpx.Client(base_url=proxy.url, timeout=30) as h:
        for headers in (
            {},
            {"Authorization": "Bearer sk-cr-not-a-real-key"},
            {"Authorization": "Bearer junk"},
        ):
            r = h.get("/api/v1/credits/balance", headers=headers)
            assert r.status_code == 401, r.text
            assert r.json()["error"]["type"] == "authentication_error"
        r = h.post(
            "/v1/chat/completions",
            headers={"Authorization": "Bearer sk-cr-nope"},
            json={"model": "fake-gpt", "messages": chat("hi")},
        )
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        user_headers = {"Authorization": f"Bearer {key}"}
        r = h.post(
            "/api/v1/admin/credits/allocate", headers=user_headers, json={"user_id": "x", "amount": "1"}
        )
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_denied"
        r = h.post("/api/v1/admin/credits/accounts", headers=user_headers, json={"user_id": "x"})
        assert r.status_code == 403
        other, _ = proxy.create_account("1")
        r = h.get("/api/v1/credits/balance", headers=user_headers, params={"user_id": other})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_denied"


def test_balance_and_transactions_routes(proxy: Proxy) -> None:
    user, key = proxy.create_account("0")
    with proxy.admin() as admin:
        for i in range(3):
            r = admin.post(
                "/api/v1/admin/credits/allocate",
                json={"user_id": user, "amount": f"1.00000{i + 1}", "reason": f"grant {i}"},
            )
            assert r.status_code == 200
        assert r.json()["balance"] == "3.000006"
        assert isinstance(r.json()["transaction_id"], int)
        dup = admin.post("/api/v1/admin/credits/accounts", json={"user_id": user})
        assert dup.status_code == 409 and dup.json()["error"]["type"] == "account_exists"
        missing = admin.post(
            "/api/v1/admin/credits/allocate", json={"user_id": "no-such-user", "amount": "1"}
        )
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "account_not_found"
        for bad in ("-1", "0", "1.0000001", "abc", True, None):
            r = admin.post("/api/v1/admin/credits/allocate", json={"user_id": user, "amount": bad})
            assert r.status_code == 422, (bad, r.text)
            assert r.json()["error"]["type"] == "validation_error"
        # an admin reads any account by user_id
        assert admin.get("/api/v1/credits/balance", params={"user_id": user}).json()["balance"] == "3.000006"
    with client(proxy, key) as oa:  # the upstream reports more than the estimate: an overrun
        oa.chat.completions.create(model="fake-custom", messages=chat("usage=1000,1000"), max_tokens=500)
    with httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as h:
        deadline = time.monotonic() + 20
        while True:
            page = h.get("/api/v1/credits/transactions", params={"limit": 500}).json()
            if page["total"] == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert page["total"] == 4
        first = page["items"][0]
        assert (first["type"], first["amount"], first["balance_after"]) == ("usage", "-4.400000", "-1.399994")
        assert [t["amount"] for t in page["items"][1:]] == ["1.000003", "1.000002", "1.000001"]
        assert (
            h.get("/api/v1/credits/transactions", params={"limit": 2, "offset": 3}).json()["items"][0][
                "amount"
            ]
            == "1.000001"
        )
        assert h.get("/api/v1/credits/transactions", params={"limit": 5000}).status_code == 422
        balance = h.get("/api/v1/credits/balance")
        assert balance.headers["x-content-type-options"] == "nosniff"
        assert balance.headers["cache-control"] == "no-store"
        body = balance.json()
        assert (body["user_id"], body["balance"], body["held"], body["tier"]) == (
            user,
            "-1.399994",
            "0.000000",
            "free",
        )
        assert {"monthly_cap", "month_spend"} <= body.keys()
