"""Fuzzing the credits API through the real proxy.

Schemathesis generates requests, valid and invalid, from the proxy's own OpenAPI for every route
under ``/api/v1/credits`` and ``/api/v1/admin/credits``, once with the master key and once with
a funded user key. No answer may be a 5xx, an error that is not the OpenAI-shaped JSON body, or
one that breaks the documented status codes, content types or response schemas; the proxy logs
no traceback, and afterwards ``litellm-credits verify`` finds the ledger sound.

Explicit cases pin the inputs that gave 500s before (malformed bodies, extreme dates) and the
shape of 404 and 405 under the credits prefixes. The runs are deterministic: schemathesis'
coverage cases involve no randomness, and Hypothesis is derandomized, with no example database.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from openai import OpenAI
from schemathesis import GenerationMode
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from litellm_credits.api.routes import SECURITY_HEADERS

from .conftest import (
    ENCRYPTION_KEY,
    REDIS_PREFIX,
    TESTS,
    Proxy,
    proxy_env,
    start_proxy,
    stop_proxy,
)
from .fake_openrouter import PROVISIONING_KEY, FakeOpenRouter
from .fake_upstream import FakeUpstream

pytestmark = pytest.mark.proxy

# per-account API limits far above what the fuzzer sends: a user key's requests reach the routes
FUZZ_CONFIG = TESTS / "fuzz_credits.yaml"
CREDITS_PATH = re.compile(r"^/api/v1/(admin/)?credits(/|$)")
# generated examples per operation and generation mode (valid, invalid), after the coverage
# cases: about 2,600 requests per key in all
EXAMPLES = 10
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # a failure is reported as found, not shrunk
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]
WRITE_METHODS = ("post", "put", "patch", "delete")


@dataclass
class FuzzProxy(Proxy):
    database_url: str = ""


@pytest.fixture(scope="module")
def fuzz_proxy(
    fresh_database: Callable[[], str],
    redis_url: str,
    upstream: FakeUpstream,
    openrouter: FakeOpenRouter,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FuzzProxy]:
    """A proxy of its own, on its own database (the fuzzer writes to it at random)."""
    database = fresh_database()
    master = "sk-master-" + secrets.token_urlsafe(24)
    log_path = tmp_path_factory.mktemp("fuzz-proxy") / "proxy.log"
    env = proxy_env(
        database,
        master,
        upstream.url,
        redis_url,
        CREDITS_CONFIG=str(FUZZ_CONFIG),
        CREDITS_REDIS_PREFIX=REDIS_PREFIX + "-fuzz",  # not the other proxy's cache
        CREDITS_OPENROUTER_BASE_URL=openrouter.url,
        CREDITS_OPENROUTER_PROVISIONING_KEY=PROVISIONING_KEY,
        CREDITS_ENCRYPTION_KEYS=ENCRYPTION_KEY,
    )
    proc, url = start_proxy(TESTS / "proxy_config.yaml", env, log_path)
    try:
        yield FuzzProxy(url=url, master_key=master, log_path=log_path, database_url=database)
    finally:
        stop_proxy(proc)


def credits_spec(proxy: Proxy) -> dict[str, Any]:
    """The proxy's OpenAPI with only the credits paths (LiteLLM's own hundreds left out)."""
    spec = httpx.get(proxy.url + "/openapi.json", timeout=120).json()  # built on first request
    spec["paths"] = {p: ops for p, ops in spec["paths"].items() if CREDITS_PATH.match(p)}
    return spec


def header(response: schemathesis.Response, name: str) -> str | None:
    values = response.headers.get(name.lower())  # schemathesis: lower-case names, lists of values
    return values[0] if values else None


def error_shape(response: schemathesis.Response) -> str | None:
    """What is wrong with a response, or None: no 5xx, errors in the OpenAI shape, headers set."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]}"
    missing = [h for h, value in SECURITY_HEADERS.items() if header(response, h) != value]
    if missing:
        return f"{response.status_code} without the {', '.join(missing)} header"
    if response.status_code < 400:
        return None
    if not (header(response, "content-type") or "").startswith("application/json"):
        return f"{response.status_code} error is not JSON: {response.text[:300]}"
    try:
        error = response.json()["error"]
        shaped = {"message", "type", "param", "code"} <= set(error) and isinstance(error["type"], str)
    except (ValueError, KeyError, TypeError):
        shaped = False
    if not shaped or error["code"] != str(response.status_code) or not error["type"]:
        return f"{response.status_code} error not in the OpenAI shape: {response.text[:300]}"
    return None


def fuzz(proxy: Proxy, key: str) -> tuple[int, list[str]]:
    """Every credits operation: schemathesis' coverage cases (boundary values, missing and
    wrong-typed fields, other methods), then generated examples, valid and invalid.
    Returns (requests sent, failures)."""
    schema = schemathesis.openapi.from_dict(credits_spec(proxy))
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    failures: list[str] = []
    sent = 0

    with requests.Session() as session:

        def send(case: Any, label: str) -> None:
            nonlocal sent
            # the schema declares LiteLLM's x-litellm-api-key (which wins over Authorization),
            # and schemathesis fills it in: the key under test goes there
            case.headers = {**(case.headers or {}), "x-litellm-api-key": f"Bearer {key}"}
            response = case.call(base_url=proxy.url, session=session, timeout=60)
            sent += 1
            problem = error_shape(response)
            if problem is None:
                try:
                    case.validate_response(response, checks=CHECKS)
                except (FailureGroup, AssertionError) as exc:
                    problem = str(exc)[:1500]
            if problem is not None:
                failures.append(f"{label}: {problem}\n{case.as_curl_command()}")

        for result in schema.get_all_operations():
            operation = result.ok()
            generation = schema.config.generation_for(operation=operation)
            # deterministic by construction: no randomness in the coverage phase
            for case in schema.iter_coverage_cases(
                operation, generation_modes=modes, generation_config=generation
            ):
                send(case, f"{operation.label} (coverage)")
            for mode in modes:

                @FUZZ_SETTINGS
                @given(case=operation.as_strategy(generation_mode=mode))
                def run(case: Any) -> None:
                    send(case, f"{operation.label} ({mode.value})")

                run()
    return sent, failures


def log_offset(proxy: Proxy) -> int:
    return proxy.log_path.stat().st_size


def tracebacks_since(proxy: Proxy, offset: int) -> list[str]:
    with proxy.log_path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode("utf-8", "replace")
    return [line for line in text.splitlines() if "Traceback" in line or "unexpected error" in line]


def assert_ledger_sound(proxy: FuzzProxy) -> None:
    """``litellm-credits verify`` on the proxy's database: every balance matches its ledger."""
    env = proxy_env(proxy.database_url, proxy.master_key, "http://unused", CREDITS_CONFIG=str(FUZZ_CONFIG))
    cli = Path(sys.executable).parent / "litellm-credits"
    done = subprocess.run(
        [str(cli), "verify", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    report = json.loads(done.stdout)
    assert report["discrepancies"] == [] and report["accounts"] > 0, report


def assert_fuzzed_clean(proxy: FuzzProxy, key: str) -> None:
    offset = log_offset(proxy)
    sent, failures = fuzz(proxy, key)
    assert sent > 1000, sent
    assert not failures, f"{len(failures)} failures of {sent} requests:\n\n" + "\n\n".join(failures[:20])
    assert tracebacks_since(proxy, offset) == []
    assert_ledger_sound(proxy)


def test_fuzz_with_a_funded_user_key(fuzz_proxy: FuzzProxy) -> None:
    # first: the admin run below may revoke keys, and this account is new so it cannot be its
    # target by chance
    _, key = fuzz_proxy.create_account("1000")
    assert_fuzzed_clean(fuzz_proxy, key)


def test_fuzz_with_the_master_key(fuzz_proxy: FuzzProxy) -> None:
    assert_fuzzed_clean(fuzz_proxy, fuzz_proxy.master_key)


# --- explicit cases ---------------------------------------------------------------------------

NESTED = b"[" * 5000 + b"]" * 5000
MALFORMED_BODIES = {
    "array": b"[]",
    "string": b'"x"',
    "null": b"null",
    "number": b"123",
    "boolean": b"true",
    "not UTF-8": b'{"amount": "\xff\xfe"}',
    "5,000 levels of nesting": NESTED,
    "broken JSON": b'{"user_id": "x",, "amount": "1"}',
    "NaN": b'{"amount": NaN}',
    "an integer of 5,000 digits": b'{"amount": ' + b"7" * 5000 + b"}",
}


def concrete(path: str) -> str:
    return re.sub(r"\{[a-z_]+\}", lambda m: "1" if m.group(0).endswith("id}") else "ABCDEF", path)


# the one route a signature authenticates instead of a key (Stripe's webhook: a bad signature is 400)
SIGNED_ROUTES = {"/api/v1/credits/stripe/webhook"}


def write_operations(spec: dict[str, Any], *, with_body: bool) -> list[tuple[str, str]]:
    return [
        (method.upper(), concrete(path))
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if method in WRITE_METHODS and ("requestBody" in op) == with_body and path not in SIGNED_ROUTES
    ]


def post_raw(proxy: Proxy, method: str, path: str, body: bytes, key: str | None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, proxy.url + path, content=body, headers=headers, timeout=30)


@pytest.mark.parametrize("body", MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
def test_malformed_bodies_get_422_naming_the_body_not_500(fuzz_proxy: FuzzProxy, body: bytes) -> None:
    """Regression: non-object JSON, non-UTF-8 bytes and deep nesting gave 500 internal_error on
    every write route (LiteLLM's auth assumed a dict body; the body parser's Starlette
    HTTPException was not caught)."""
    spec = credits_spec(fuzz_proxy)
    operations = write_operations(spec, with_body=True)
    assert len(operations) >= 12
    for method, path in operations:
        r = post_raw(fuzz_proxy, method, path, body, fuzz_proxy.master_key)
        assert r.status_code == 422, (method, path, r.status_code, r.text)
        error = r.json()["error"]
        assert (error["type"], error["param"], error["code"]) == ("validation_error", "body", "422"), error


def test_a_json_syntax_error_names_the_body_and_the_position(fuzz_proxy: FuzzProxy) -> None:
    """Regression: a JSON decode error said ``param: "21"`` (its offset) and not where it was."""
    with fuzz_proxy.admin() as admin:
        r = admin.post(
            "/api/v1/admin/credits/allocate",
            content=b'{"user_id": "x",, "amount": "1"}',
            headers={"content-type": "application/json"},
        )
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == "body"
    assert "line 1, column 17 (char 16)" in error["message"], error


@pytest.mark.parametrize("body", MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
def test_without_a_key_any_body_gets_401(fuzz_proxy: FuzzProxy, body: bytes) -> None:
    """Regression: the body was parsed (and crashed, or gave 422) before the key was checked."""
    spec = credits_spec(fuzz_proxy)
    operations = write_operations(spec, with_body=True) + write_operations(spec, with_body=False)
    for i, (method, path) in enumerate(operations):
        key = (None, "sk-cr-forged-forged-forged-forged-forged-forged-00")[i % 2]  # no key, a bad one
        r = post_raw(fuzz_proxy, method, path, body, key)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.json()["error"]["type"] == "authentication_error"


def test_a_body_that_is_not_json_is_refused_after_authentication(fuzz_proxy: FuzzProxy) -> None:
    _, key = fuzz_proxy.create_account("1")
    not_json = ("text/plain", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded")
    for content_type in not_json:
        headers = {"content-type": content_type, "Authorization": f"Bearer {key}"}
        r = httpx.post(
            fuzz_proxy.url + "/api/v1/credits/calculate-cost", content=b"--x\r\nbroken", headers=headers
        )
        assert r.status_code == 422, (content_type, r.text)
        assert r.json()["error"]["param"] == "body"
        anonymous = httpx.post(
            fuzz_proxy.url + "/api/v1/credits/calculate-cost",
            content=b"--x\r\nbroken",
            headers={"content-type": content_type},
        )
        assert anonymous.status_code == 401, (content_type, anonymous.text)


PERIOD_ROUTES = [
    "/api/v1/credits/usage/stats",
    "/api/v1/credits/usage/by-model",
    "/api/v1/credits/usage/by-power-level",
    "/api/v1/credits/usage/by-service",
    "/api/v1/admin/credits/analytics/system",
    "/api/v1/admin/credits/analytics/top-spenders",
]
FILTER_ROUTES = ["/api/v1/credits/transactions", "/api/v1/credits/transactions/export"]
# (query, the parameter named, whether only the routes with a period (a default of 30 days) fail)
EXTREME_DATES = [
    ({"days": "2095", "end_date": "0003-04-22"}, "days", True),
    ({"end_date": "0001-01-05"}, "end_date", True),  # the default 30 days start before year 1
    ({"end_date": "9999-12-31"}, "end_date", False),  # its whole day ends in year 10000
    ({"start_date": "0001-01-01T00:00:00+05:00"}, "start_date", False),  # year 0 in UTC
    ({"start_date": "9999-12-31T23:59:59-05:00"}, "start_date", False),  # year 10000 in UTC
    ({"start_date": "0001-01-01"}, "start_date", False),
]


@pytest.mark.parametrize(("params", "param", "periods_only"), EXTREME_DATES)
def test_extreme_dates_get_422_naming_the_parameter(
    fuzz_proxy: FuzzProxy, params: dict[str, str], param: str, periods_only: bool
) -> None:
    """Regression: ``days=2095&end_date=0003-04-22`` and ``end_date=9999-12-31`` raised
    OverflowError (500) on usage and analytics routes, and in the middle of a CSV export."""
    user, _ = fuzz_proxy.create_account("1")
    with fuzz_proxy.admin() as admin:
        for path in PERIOD_ROUTES + ([] if periods_only else FILTER_ROUTES):
            r = admin.get(path, params={**params, "user_id": user} if "/admin/" not in path else params)
            assert r.status_code == 422, (path, params, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/json"), path
            error = r.json()["error"]
            assert (error["type"], error["param"]) == ("validation_error", param), (path, error)


@pytest.mark.parametrize("expires_at", ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"])
def test_a_coupon_expiry_out_of_range_is_a_422_naming_it(fuzz_proxy: FuzzProxy, expires_at: str) -> None:
    """Regression: such dates reached PostgreSQL and came back as a generic 400 ("breaks a limit
    of the ledger") that named no field."""
    body = {"code": "EDGE" + secrets.token_hex(4), "type": "fixed", "value": "1", "expires_at": expires_at}
    with fuzz_proxy.admin() as admin:
        r = admin.post("/api/v1/admin/credits/coupons", json=body)
    assert r.status_code == 422, r.text
    assert (r.json()["error"]["type"], r.json()["error"]["param"]) == ("validation_error", "expires_at")


def test_the_widest_representable_period_is_answered(fuzz_proxy: FuzzProxy) -> None:
    user, _ = fuzz_proxy.create_account("1")
    widest = {"start_date": "0001-01-02", "end_date": "9999-12-29"}
    with fuzz_proxy.admin() as admin:
        for path in [*PERIOD_ROUTES, *FILTER_ROUTES]:
            r = admin.get(path, params={**widest, "user_id": user} if "/admin/" not in path else widest)
            assert r.status_code == 200, (path, r.text)
        export = admin.get("/api/v1/credits/transactions/export", params={**widest, "user_id": user})
        assert export.text.splitlines()[0].startswith("id,created_at,type,amount")
        assert len(export.text.splitlines()) == 2  # the header and the opening allocation


COUNTS = ("requests", "succeeded", "failed", "prompt_tokens", "completion_tokens")


def test_usage_breakdowns_count_tokens_as_integers(fuzz_proxy: FuzzProxy) -> None:
    """Regression: usage/by-model, by-power-level and by-service gave token counts as strings
    (PostgreSQL's sum of a bigint is a numeric) where usage/stats gave integers."""
    _, key = fuzz_proxy.create_account("10")
    with OpenAI(base_url=fuzz_proxy.url + "/v1", api_key=key, max_retries=0) as client:
        client.chat.completions.create(
            model="fake-custom", messages=[{"role": "user", "content": "usage=120,40"}], max_tokens=100
        )
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=fuzz_proxy.url, headers=headers, timeout=30) as me:
        for _ in range(200):
            stats = me.get("/api/v1/credits/usage/stats").json()
            if stats["requests"]:
                break
            time.sleep(0.1)
        assert (stats["prompt_tokens"], stats["completion_tokens"]) == (120, 40)
        for path in ("by-model", "by-power-level", "by-service"):
            (item,) = me.get(f"/api/v1/credits/usage/{path}").json()["items"]
            counts = [item[k] for k in COUNTS]
            assert counts == [1, 1, 0, 120, 40], (path, item)
            assert all(type(n) is int for n in counts), (path, item)


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/api/v1/credits/no-such-route", 404, None),
        ("GET", "/api/v1/credits", 404, None),
        ("POST", "/api/v1/admin/credits/nothing/here", 404, None),
        ("GET", "/api/v1/credits/balance/", 404, None),
        ("DELETE", "/api/v1/credits/balance", 405, "GET"),
        ("PUT", "/api/v1/admin/credits/accounts/someone", 405, "GET, PATCH"),
        ("GET", "/api/v1/admin/credits/allocate", 405, "POST"),
        ("QUERY", "/api/v1/credits/usage/stats", 405, "GET"),  # found by the fuzzer's coverage phase
        ("PROPFIND", "/api/v1/credits/nowhere", 404, None),
    ],
)
def test_unknown_routes_and_methods_answer_in_the_error_shape(
    fuzz_proxy: FuzzProxy, method: str, path: str, status: int, allow: str | None
) -> None:
    """Regression: 404 and 405 under the credits prefixes were FastAPI's ``{"detail": ...}``
    (and a method FastAPI does not list, such as QUERY, lacked the security headers)."""
    for headers in ({}, {"Authorization": f"Bearer {fuzz_proxy.master_key}"}):
        r = httpx.request(method, fuzz_proxy.url + path, headers=headers, timeout=30)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["type"] == ("not_found" if status == 404 else "method_not_allowed"), error
        assert error["code"] == str(status)
        assert r.headers.get("allow") == allow
        for name, value in SECURITY_HEADERS.items():
            assert r.headers.get(name) == value


def test_every_credits_route_has_a_summary_and_a_description(fuzz_proxy: FuzzProxy) -> None:
    """Regression: seven credits routes had no description in the OpenAPI (Swagger at /)."""
    spec = credits_spec(fuzz_proxy)
    undocumented = [
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if not op.get("summary") or not op.get("description")
    ]
    assert len(spec["paths"]) >= 30
    assert undocumented == []
    assert httpx.get(fuzz_proxy.url + "/", timeout=30).status_code == 200  # LiteLLM's Swagger UI
