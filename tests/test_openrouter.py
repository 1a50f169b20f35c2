"""The OpenRouter client against OpenRouter's HTTP API faked by respx, with realistic bodies."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import httpx
import pytest
import respx

from litellm_credits.crypto import Secret
from litellm_credits.openrouter import (
    ModelCatalog,
    OpenRouterClient,
    OpenRouterError,
    OpenRouterUnavailable,
)

BASE = "https://openrouter.test/api/v1"
PROVISIONING = "sk-or-v1-provisioning-0000000000000000000000000000000000000000000000000000"
ACCOUNT_KEY = "sk-or-v1-account-1111111111111111111111111111111111111111111111111111111"


def models_body() -> dict[str, Any]:
    """45 models in OpenRouter's shape, 12 of them free (zero prices or a :free id)."""
    data = []
    for i in range(33):
        data.append({"id": f"vendor{i % 5}/model-{i}", "name": f"Model {i}", "context_length": 128000,
                     "pricing": {"prompt": f"0.00000{1 + i % 9}", "completion": f"0.0000{1 + i % 9}",
                                 "request": "0", "image": "0"}})  # fmt: skip
    for i in range(8):
        zero = {"prompt": "0", "completion": "0", "request": "0", "image": "0"}
        data.append({"id": f"vendor{i}/small-{i}:free", "name": f"Small {i} (free)", "pricing": zero})
    for i in range(4):
        data.append({"id": f"lab/open-{i}", "pricing": {"prompt": "0", "completion": "0"}})
    data.append({"id": "broken/no-pricing"})
    data.append({"id": "broken/negative", "pricing": {"prompt": "-1", "completion": "0"}})
    return {"data": data}


def key_body(limit: float | None = 10.0, usage: float = 0.0) -> dict[str, Any]:
    return {
        "name": "acct-1", "label": "sk-or-v1-acc...111", "limit": limit, "usage": usage,
        "disabled": False, "created_at": "2026-11-24T08:00:00Z", "updated_at": None,
        "hash": "f01d52606dc8f0a8303a7b5cc3fa07109c2e346cec7c0a16b40de462992ce943",
    }  # fmt: skip


@pytest.fixture
async def client() -> Any:
    c = OpenRouterClient(provisioning_key=Secret(PROVISIONING), base_url=BASE, retries=2, backoff=0.001)
    yield c
    await c.aclose()


@respx.mock
async def test_provision_update_delete(client: OpenRouterClient) -> None:
    created = respx.post(f"{BASE}/keys").respond(201, json={"data": key_body(), "key": ACCOUNT_KEY})
    key = await client.create_key("acct-1", limit=Decimal("10"))
    assert key.key is not None and key.key.reveal() == ACCOUNT_KEY and key.limit == Decimal("10")
    sent = created.calls.last.request
    assert sent.headers["authorization"] == f"Bearer {PROVISIONING}"
    assert b'"limit": 10.0' in sent.content or b'"limit":10.0' in sent.content
    patched = respx.patch(f"{BASE}/keys/{key.hash}").respond(
        200, json={"data": key_body(limit=2.5, usage=1.25)}
    )
    updated = await client.update_key(key.hash, limit=Decimal("2.5"))
    assert (updated.limit, updated.usage) == (Decimal("2.5"), Decimal("1.25"))
    assert b"2.5" in patched.calls.last.request.content
    respx.delete(f"{BASE}/keys/{key.hash}").respond(200, json={"data": {"success": True}})
    await client.delete_key(key.hash)


@respx.mock
async def test_key_usage_uses_the_accounts_own_key(client: OpenRouterClient) -> None:
    route = respx.get(f"{BASE}/key").respond(200, json={"data": {
        "label": "sk-or-v1-acc...111", "usage": 0.4321, "limit": 10, "limit_remaining": 9.5679,
        "is_free_tier": False, "rate_limit": {"requests": 100, "interval": "10s"}}})  # fmt: skip
    usage = await client.key_usage(Secret(ACCOUNT_KEY))
    assert (usage.usage, usage.limit_remaining) == (Decimal("0.4321"), Decimal("9.5679"))
    assert route.calls.last.request.headers["authorization"] == f"Bearer {ACCOUNT_KEY}"


@respx.mock
async def test_models_and_free_detection(client: OpenRouterClient) -> None:
    respx.get(f"{BASE}/models").respond(200, json=models_body())
    models = await client.list_models()
    assert len(models) == 45  # the two entries that cannot be priced are left out
    free = {m.id for m in models if m.free}
    assert len(free) == 12 and "vendor0/small-0:free" in free and "lab/open-3" in free
    priced = next(m for m in models if m.id == "vendor1/model-1")
    assert (priced.prompt, priced.completion) == (Decimal("0.000002"), Decimal("0.00002"))


@respx.mock
async def test_catalog_refreshes_and_falls_back_to_the_last_good_list(client: OpenRouterClient) -> None:
    route = respx.get(f"{BASE}/models")
    route.side_effect = [httpx.Response(200, json=models_body()), httpx.Response(503), httpx.Response(503),
                         httpx.Response(503)]  # fmt: skip
    catalog = ModelCatalog(client, ttl=0.0)
    assert len(await catalog.free_ids()) == 12
    assert len(await catalog.models()) == 45  # refresh failed: the last good list serves
    empty = ModelCatalog(client, ttl=0.0)
    route.side_effect = [httpx.Response(503)] * 3
    with pytest.raises(OpenRouterUnavailable):
        await empty.models()  # nothing to fall back on


@respx.mock
@pytest.mark.parametrize(
    ("response", "error", "status"),
    [
        (httpx.Response(401, json={"error": {"message": "No auth credentials found", "code": 401}}),
         OpenRouterError, 502),
        (httpx.Response(402, json={"error": {"message": "Insufficient credits", "code": 402}}),
         OpenRouterError, 502),
        (httpx.Response(429, json={"error": {"message": "Rate limit exceeded"}}), OpenRouterUnavailable, 503),
        (httpx.Response(500, text="Internal Server Error"), OpenRouterUnavailable, 503),
        (httpx.Response(200, text="<html>maintenance</html>"), OpenRouterError, 502),
        (httpx.Response(200, json={"unexpected": True}), OpenRouterError, 502),
        (httpx.TimeoutException("timed out"), OpenRouterUnavailable, 503),
        (httpx.ConnectError("refused"), OpenRouterUnavailable, 503),
    ],
)  # fmt: skip
async def test_failures_are_clear_and_keyless(
    client: OpenRouterClient, response: Any, error: type, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    route = respx.get(f"{BASE}/keys/abc")
    route.side_effect = [response] * 3 if isinstance(response, Exception) else None
    if not isinstance(response, Exception):
        route.return_value = response
    with pytest.raises(error) as err:
        await client.get_key("abc")
    assert err.value.status == status
    text = repr(err.value) + str(err.value.to_body()) + caplog.text
    assert PROVISIONING not in text and ACCOUNT_KEY not in text
    retried = response.status_code in (429, 500) if isinstance(response, httpx.Response) else True
    assert route.call_count == (3 if retried else 1)


@respx.mock
async def test_retries_recover_and_honour_retry_after(client: OpenRouterClient) -> None:
    route = respx.get(f"{BASE}/keys/abc")
    route.side_effect = [httpx.Response(429, headers={"Retry-After": "0"}), httpx.Response(502),
                         httpx.Response(200, json={"data": key_body()})]  # fmt: skip
    assert (await client.get_key("abc")).limit == Decimal("10")
    assert route.call_count == 3


@respx.mock
async def test_creating_a_key_is_never_retried(client: OpenRouterClient) -> None:
    route = respx.post(f"{BASE}/keys").respond(502)
    with pytest.raises(OpenRouterUnavailable):
        await client.create_key("acct-1", limit=Decimal(1))
    assert route.call_count == 1  # a lost reply must not leave two keys behind
    respx.post(f"{BASE}/keys").respond(201, json={"data": key_body()})  # no key in the answer
    with pytest.raises(OpenRouterError):
        await client.create_key("acct-1", limit=Decimal(1))


async def test_no_provisioning_key_is_refused() -> None:
    c = OpenRouterClient(provisioning_key=None, base_url=BASE)
    try:
        with pytest.raises(OpenRouterError):
            await c.list_models()
    finally:
        await c.aclose()
    assert PROVISIONING not in repr(OpenRouterClient(provisioning_key=Secret(PROVISIONING), base_url=BASE))
