"""A small OpenRouter client: provision per-account keys, read usage, list models.

Over httpx, with timeouts and bounded retries (exponential backoff, ``Retry-After`` honoured) on
429, 5xx and connection failures, but only where repeating is harmless: creating a key is never
retried, since a lost reply could otherwise leave two keys. Failures reach callers as a ``502
openrouter_error`` (OpenRouter refused or answered nonsense) or ``503 openrouter_unavailable``
(it could not be reached in time); neither ever carries a key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx

from .crypto import Secret
from .errors import CreditsError, ServiceUnavailable
from .money import AmountError, to_decimal

log = logging.getLogger("litellm_credits.openrouter")

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
RETRYABLE = frozenset({429, 500, 502, 503, 504})


class OpenRouterError(CreditsError):
    status = 502
    type = "openrouter_error"


class OpenRouterUnavailable(ServiceUnavailable):
    type = "openrouter_unavailable"


@dataclass(frozen=True)
class ProvisionedKey:
    hash: str
    name: str | None
    limit: Decimal | None  # USD
    usage: Decimal  # USD
    disabled: bool
    key: Secret | None = None  # only when just created


@dataclass(frozen=True)
class KeyUsage:
    usage: Decimal
    limit: Decimal | None
    limit_remaining: Decimal | None
    is_free_tier: bool


@dataclass(frozen=True)
class Model:
    id: str
    prompt: Decimal  # USD per token
    completion: Decimal

    @property
    def free(self) -> bool:
        return self.id.endswith(":free") or (self.prompt == 0 and self.completion == 0)


def _decimal(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        return to_decimal(value)
    except AmountError:
        raise OpenRouterError("OpenRouter answered with a malformed number") from None


def _key(data: Mapping[str, Any], key: str | None = None) -> ProvisionedKey:
    try:
        return ProvisionedKey(
            hash=str(data["hash"]),
            name=data.get("name"),
            limit=_decimal(data.get("limit")),
            usage=_decimal(data.get("usage")) or Decimal(0),
            disabled=bool(data.get("disabled", False)),
            key=Secret(key) if key else None,
        )
    except (KeyError, TypeError):
        raise OpenRouterError("OpenRouter answered without the key's details") from None


class OpenRouterClient:
    def __init__(
        self,
        *,
        provisioning_key: Secret | None,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._provisioning_key = provisioning_key
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport)
        self.retries = retries
        self.backoff = backoff

    async def aclose(self) -> None:
        await self._http.aclose()

    def __repr__(self) -> str:
        return f"OpenRouterClient({self._http.base_url})"

    async def _request(
        self, method: str, path: str, *, key: Secret | None, json: Any = None, retry: bool = True
    ) -> Any:
        if key is None:
            raise OpenRouterError("no OpenRouter provisioning key is configured")
        headers = {"Authorization": f"Bearer {key.reveal()}"}
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = await self._http.request(method, path, json=json, headers=headers)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                if last:
                    raise OpenRouterUnavailable(f"OpenRouter did not answer ({type(exc).__name__})") from None
                await asyncio.sleep(self.backoff * 2**attempt)
                continue
            if response.status_code in RETRYABLE and not last:
                await asyncio.sleep(self._delay(response, attempt))
                continue
            return self._body(response)
        raise AssertionError("unreachable")

    def _delay(self, response: httpx.Response, attempt: int) -> float:
        retry_after = response.headers.get("retry-after", "")
        if retry_after.replace(".", "", 1).isdigit():
            return min(float(retry_after), 30.0)
        return float(self.backoff * 2**attempt)

    @staticmethod
    def _body(response: httpx.Response) -> Any:
        status = response.status_code
        if status in RETRYABLE:
            raise OpenRouterUnavailable(f"OpenRouter is unavailable (HTTP {status})", upstream_status=status)
        if status in (401, 403):
            raise OpenRouterError(
                "OpenRouter refused the key (check the provisioning key)", upstream_status=status
            )
        if status == 402:
            raise OpenRouterError("OpenRouter reports insufficient credits on the operator's account",
                                  upstream_status=status)  # fmt: skip
        if status == 404:
            raise OpenRouterError("OpenRouter does not know this key", upstream_status=status)
        if status >= 400:
            raise OpenRouterError(f"OpenRouter refused the request (HTTP {status})", upstream_status=status)
        try:
            return response.json()
        except ValueError:
            raise OpenRouterError("OpenRouter answered with malformed JSON") from None

    @staticmethod
    def _data(body: Any) -> Any:
        if not isinstance(body, Mapping) or "data" not in body:
            raise OpenRouterError("OpenRouter answered without data")
        return body["data"]

    # key provisioning (with the operator's provisioning key) ---------------------------

    async def create_key(self, name: str, *, limit: Decimal | None) -> ProvisionedKey:
        """A new key with a USD credit limit; its secret is only in this answer."""
        # OpenRouter takes the limit as a JSON number of USD; the ledger's figure is exact, and a
        # limit is a ceiling at the provider, not a charge
        body = {"name": name, "limit": float(limit) if limit is not None else None}
        answer = await self._request("POST", "/keys", key=self._provisioning_key, json=body, retry=False)
        key = answer.get("key") if isinstance(answer, Mapping) else None
        if not isinstance(key, str) or not key:
            raise OpenRouterError("OpenRouter created a key but did not return it")
        return _key(self._data(answer), key)

    async def get_key(self, key_hash: str) -> ProvisionedKey:
        return _key(self._data(await self._request("GET", f"/keys/{key_hash}", key=self._provisioning_key)))

    async def update_key(
        self, key_hash: str, *, limit: Decimal | None = None, disabled: bool | None = None
    ) -> ProvisionedKey:
        body: dict[str, Any] = {}
        if limit is not None:
            body["limit"] = float(limit)
        if disabled is not None:
            body["disabled"] = disabled
        answer = await self._request("PATCH", f"/keys/{key_hash}", key=self._provisioning_key, json=body)
        return _key(self._data(answer))

    async def delete_key(self, key_hash: str) -> None:
        await self._request("DELETE", f"/keys/{key_hash}", key=self._provisioning_key)

    # with an account's own key ---------------------------------------------------------

    async def key_usage(self, key: Secret) -> KeyUsage:
        data = self._data(await self._request("GET", "/key", key=key))
        if not isinstance(data, Mapping):
            raise OpenRouterError("OpenRouter answered without the key's usage")
        return KeyUsage(
            usage=_decimal(data.get("usage")) or Decimal(0),
            limit=_decimal(data.get("limit")),
            limit_remaining=_decimal(data.get("limit_remaining")),
            is_free_tier=bool(data.get("is_free_tier", False)),
        )

    async def list_models(self) -> list[Model]:
        data = self._data(await self._request("GET", "/models", key=self._provisioning_key))
        if not isinstance(data, list):
            raise OpenRouterError("OpenRouter answered without a model list")
        models = []
        for item in data:
            pricing = item.get("pricing") if isinstance(item, Mapping) else None
            if not isinstance(pricing, Mapping) or not isinstance(item.get("id"), str):
                continue  # an entry we cannot price is left out, not guessed
            prompt, completion = _decimal(pricing.get("prompt")), _decimal(pricing.get("completion"))
            if prompt is None or completion is None or prompt < 0 or completion < 0:
                continue
            models.append(Model(item["id"], prompt, completion))
        return models


class ModelCatalog:
    """OpenRouter's models, refreshed every ``ttl`` seconds, falling back to the last good list."""

    def __init__(self, client: OpenRouterClient, *, ttl: float = 3600.0) -> None:
        self.client = client
        self.ttl = ttl
        self._models: dict[str, Model] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()

    async def models(self) -> dict[str, Model]:
        fresh = self._fetched_at is not None and time.monotonic() - self._fetched_at < self.ttl
        if fresh:
            return self._models
        async with self._lock:
            if self._fetched_at is not None and time.monotonic() - self._fetched_at < self.ttl:
                return self._models
            try:
                self._models = {m.id: m for m in await self.client.list_models()}
                self._fetched_at = time.monotonic()
            except (OpenRouterError, OpenRouterUnavailable) as exc:
                if not self._models:
                    raise
                log.warning("OpenRouter model list not refreshed (%s); using the last one", exc.type)
                # try again in a minute, not on every request
                self._fetched_at = time.monotonic() - self.ttl + min(60.0, self.ttl)
        return self._models

    async def free_ids(self) -> set[str]:
        return {m.id for m in (await self.models()).values() if m.free}


__all__ = [
    "KeyUsage",
    "Model",
    "ModelCatalog",
    "OpenRouterClient",
    "OpenRouterError",
    "OpenRouterUnavailable",
    "ProvisionedKey",
]
