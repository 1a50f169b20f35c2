"""Prometheus metrics: label bounding, and a scrape of the real proxy running two workers in
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), parsed as Prometheus parses it."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, Counter
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from litellm_credits import metrics
from litellm_credits.api import build_router
from litellm_credits.metrics import COUNTERS, MAX_MODEL_GROUPS, OTHER, LabelBounds
from litellm_credits.metrics_sampler import read, sample
from litellm_credits.money import parse_credits
from litellm_credits.runtime import Runtime
from litellm_credits.settings import MetricsConfig, Settings

from .conftest import CREDITS_TEST_CONFIG, TESTS, Proxy, proxy_env, start_proxy, stop_proxy
from .fake_upstream import FakeUpstream

PATH = "/api/v1/admin/credits/metrics"

# -- bounded labels ----------------------------------------------------------------------------


def test_tiers_outside_the_config_are_other() -> None:
    bounds = LabelBounds(["free", "pro"], list)
    assert [bounds.tier(t) for t in ("free", "pro", "vip", "", None)] == ["free", "pro", OTHER, OTHER, OTHER]


def test_model_groups_outside_the_config_are_other() -> None:
    """A client names any model it likes, and a wildcard route passes it on: only listed names
    become label values."""
    bounds = LabelBounds(["free"], lambda: ["gpt-4o", "openai/*", "house"])
    assert bounds.model_group("gpt-4o") == "gpt-4o"
    assert bounds.model_group("house") == "house"
    assert bounds.model_group("openai/anything-a-client-sends") == OTHER
    assert bounds.model_group("openai/*") == OTHER
    assert bounds.model_group(None) == OTHER
    assert bounds.service("chat") == "chat"
    assert bounds.service("user-" + secrets.token_hex(4)) == OTHER


def test_model_groups_are_reread_and_capped() -> None:
    now = [0.0]
    names = ["a"]
    bounds = LabelBounds(["free"], lambda: list(names), refresh_seconds=30, clock=lambda: now[0])
    assert bounds.model_group("b") == OTHER
    names.append("b")  # a model added at run time
    now[0] = 10
    assert bounds.model_group("b") == OTHER  # not read again yet
    now[0] = 31
    assert bounds.model_group("b") == "b"
    names[:] = [f"m{i:05}" for i in range(MAX_MODEL_GROUPS * 2)]
    now[0] = 62
    known = [n for n in names if bounds.model_group(n) != OTHER]
    assert len(known) == MAX_MODEL_GROUPS


def test_charges_are_counted_under_bounded_labels() -> None:
    bounds = LabelBounds(["free"], lambda: ["fake-gpt"])
    tier = "t-" + secrets.token_hex(4)  # not configured: counts as other
    before = _local("litellm_credits_charged_microcredits_total", tier=OTHER, model_group=OTHER)
    metrics.count_charge(bounds, 1_234_567, tier=tier, model_group="made-up", service="chat")
    metrics.count_charge(bounds, 0, tier=tier, model_group="made-up", service="chat")
    after = _local("litellm_credits_charged_microcredits_total", tier=OTHER, model_group=OTHER)
    assert after - before == 1_234_567


@pytest.mark.parametrize(
    ("error_type", "reason"),
    [
        ("insufficient_credits", "insufficient"),
        ("team_insufficient_credits", "insufficient"),
        ("monthly_cap_exceeded", "cap"),
        ("daily_cap_exceeded", "cap"),
        ("member_cap_exceeded", "member_cap"),
        ("rate_limited", "rate_limited"),
        ("something_new", OTHER),
    ],
)
def test_refusal_reasons(error_type: str, reason: str) -> None:
    before = _local("litellm_credits_requests_refused_total", reason=reason)
    metrics.count_refusal(error_type)
    assert _local("litellm_credits_requests_refused_total", reason=reason) == before + 1


def test_no_account_label_anywhere() -> None:
    """One series per account would grow without end, and a scrape would publish who spends what.
    Every metric's declared label names, whether or not it has a sample yet."""
    ours = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    assert len(ours) >= 20
    allowed = {
        "kind",
        "reason",
        "policy",
        "tier",
        "model_group",
        "service",
        "type",
        "result",
        "deferred",
        "status",
        "generation",  # of Python's garbage collector: 0, 1, 2
    }
    for metric in ours:
        assert set(metric._labelnames) <= allowed, (metric._name, metric._labelnames)


def test_the_route_shows_only_the_plugins_metrics() -> None:
    """LiteLLM's own metrics in the same process label keys, users and teams: not ours to publish."""
    foreign = Counter("litellm_spend_review_test", "LiteLLM-like", ["end_user", "hashed_api_key"])
    try:
        foreign.labels("alice@example.com", "88dc28d0").inc()
        text = metrics.render()[0].decode()
        assert "alice@example.com" not in text and "litellm_spend_review_test" not in text
        names = {f.name for f in text_string_to_metric_families(text)}
        assert names and all(name.startswith("litellm_credits_") for name in names)
        assert "litellm_credits_holds_taken" in names
    finally:
        REGISTRY.unregister(foreign)


async def test_held_gauge_counts_only_debiting_holds(
    settings: Settings, fresh_database: Callable[[], str]
) -> None:
    """An unlimited tier's hold takes nothing from a balance: the gauge agrees with the accounts.
    (A database of its own, and the figures as read: other runtimes in this process sample the
    same gauges from other databases.)"""
    credits = settings.credits.model_copy(update={"metrics": MetricsConfig(sample_seconds=0)})
    runtime = Runtime(settings.model_copy(update={"database_url": fresh_database(), "credits": credits}))
    try:
        ledger = await runtime.ledger()
        for subject, tier in (("paying", "free"), ("sponsored", "sponsored"), ("off", "free")):
            await ledger.create_account(subject, tier=tier)
        await ledger.credit("paying", parse_credits("10"))
        await ledger.pool.execute(
            "UPDATE credits.credit_accounts SET status = 'disabled' WHERE subject_id = 'off'"
        )
        await ledger.hold("paying", parse_credits("2"), ttl_seconds=60)
        await ledger.hold("sponsored", parse_credits("3"), ttl_seconds=60, debits=False)
        figures = await read(ledger.pool)
        held = await ledger.pool.fetchval("SELECT sum(held) FROM credits.credit_accounts")
        assert figures.held == held == parse_credits("2")
        assert figures.open_holds == 2
        assert figures.accounts == {"active": 2, "disabled": 1}
        before = time.time()
        await sample(ledger.pool)
        assert metrics.SAMPLED_AT._value.get() >= before
    finally:
        await runtime.close()


def test_health_counters_keep_their_names() -> None:
    assert set(metrics.metrics.snapshot()) == set(COUNTERS)
    before = metrics.metrics["cache_misses"]
    metrics.CACHE_MISS.inc()
    assert metrics.metrics["cache_misses"] == before + 1


def _local(name: str, **labels: str) -> float:
    """A sample's value in this process's registry, summed over the labels not given."""
    return _value(_parse(metrics.render()[0].decode()), name, **labels)


# -- the real proxy, two workers ---------------------------------------------------------------

Samples = list[tuple[str, dict[str, str], float]]


def _parse(text: str) -> Samples:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def _value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for n, lb, v in samples if n == name and all(lb.get(k) == x for k, x in labels.items()))


Workers = tuple[Proxy, Path, str]


async def _active_accounts(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM credits.credit_accounts WHERE status = 'active'")
        )
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def workers(
    fresh_database: Callable[[], str], upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workers]:
    """A proxy with two workers on a database of its own; gauges sampled every second."""
    here = tmp_path_factory.mktemp("metrics")
    config = yaml.safe_load(CREDITS_TEST_CONFIG.read_text())
    config["credits"]["metrics"] = {"sample_seconds": 1}
    (here / "credits.yaml").write_text(yaml.safe_dump(config))
    multiproc = here / "prometheus"
    master = "sk-master-" + secrets.token_urlsafe(24)
    dsn = fresh_database()
    env = proxy_env(
        dsn,
        master,
        upstream.url,
        CREDITS_CONFIG=str(here / "credits.yaml"),
        PROMETHEUS_MULTIPROC_DIR=str(multiproc),
    )
    log = here / "proxy.log"
    proc, url = start_proxy(TESTS / "proxy_config.yaml", env, log, workers=2)
    try:
        yield Proxy(url=url, master_key=master, log_path=log), multiproc, dsn
    finally:
        stop_proxy(proc)


def _scrape(proxy: Proxy) -> Samples:
    # a new connection each time: any worker may answer, and each must see every worker's samples
    r = httpx.get(proxy.url + PATH, headers={"Authorization": f"Bearer {proxy.master_key}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return _parse(r.text)


def _until(proxy: Proxy, check: Callable[[Samples], bool], what: str) -> Samples:
    deadline = time.monotonic() + 60
    while True:
        samples = _scrape(proxy)
        if check(samples):
            return samples
        assert time.monotonic() < deadline, f"{what}: never seen in\n{samples}"
        time.sleep(0.3)


def _holds_by_worker(multiproc: Path) -> dict[str, float]:
    """Holds taken by each worker, from the files the workers write (one per process)."""
    taken: dict[str, float] = {}
    for path in multiproc.glob("counter_*.db"):
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[1] == "litellm_credits_holds_taken_total" and value:
                pid = path.stem.rsplit("_", 1)[-1]
                taken[pid] = taken.get(pid, 0) + value
    return taken


def _chat(proxy: Proxy, key: str) -> Any:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0) as client:
        return client.chat.completions.create(
            model="fake-gpt", messages=[{"role": "user", "content": "hi"}], max_tokens=50
        )


@pytest.mark.proxy
def test_a_scrape_sees_both_workers(workers: Workers) -> None:
    proxy, multiproc, dsn = workers
    user, key = proxy.create_account("10")
    _, broke = proxy.create_account("0")
    # each request on a new connection, until both workers have served some: a scrape answered by
    # either must then count the other's too
    requests, deadline = 0, time.monotonic() + 90  # (the second worker may still be starting)
    while requests < 6 or len(_holds_by_worker(multiproc)) < 2:
        assert time.monotonic() < deadline, _holds_by_worker(multiproc)
        _chat(proxy, key)
        requests += 1
    with pytest.raises(openai.APIStatusError) as refused:
        _chat(proxy, broke)
    assert refused.value.status_code == 402

    def settled(s: Samples) -> bool:
        return _value(s, "litellm_credits_settlements_total") == requests

    samples = _until(proxy, settled, "every request settled")

    assert _value(samples, "litellm_credits_holds_taken_total") == requests
    assert _value(samples, "litellm_credits_holds_taken_total", kind="clamped") == 0
    assert _value(samples, "litellm_credits_requests_refused_total", reason="insufficient") == 1
    assert _value(samples, "litellm_credits_requests_refused_total") == 1
    assert _value(samples, "litellm_credits_voids_total") == 0
    # the refused request's statement is timed too: refusing is the ledger's work as well
    assert _value(samples, "litellm_credits_hold_seconds_count") == requests + 1
    assert _value(samples, "litellm_credits_settle_seconds_count") == requests
    assert _value(samples, "litellm_credits_pre_call_seconds_count") == requests + 1
    # every micro-credit the account lost, under the configured labels, and nothing else
    with proxy.admin() as admin:
        r = admin.get(f"/api/v1/admin/credits/accounts/{user}")
        assert r.status_code == 200, r.text
        spent = parse_credits("10") - parse_credits(r.json()["balance"])
    assert spent > 0
    charged = _value(samples, "litellm_credits_charged_microcredits_total")
    assert charged == spent
    assert (
        _value(
            samples,
            "litellm_credits_charged_microcredits_total",
            tier="free",
            model_group="fake-gpt",
            service="chat",
        )
        == spent
    )
    # the same totals whichever worker answers
    for _ in range(4):
        assert _value(_scrape(proxy), "litellm_credits_holds_taken_total") == requests

    # the gauges: sampled from the database, one value (not one per worker, summed)
    accounts = asyncio.run(_active_accounts(dsn))
    assert accounts >= 2

    # (a worker's sample from before the last settlement may answer first: wait for a fresh one)
    def sampled(s: Samples) -> bool:
        return (
            _value(s, "litellm_credits_accounts", status="active") == accounts
            and _value(s, "litellm_credits_open_holds") == 0
            and _value(s, "litellm_credits_held_microcredits") == 0
        )

    samples = _until(proxy, sampled, f"{accounts} active accounts, no open holds")
    assert _value(samples, "litellm_credits_accounts", status="disabled") == 0


@pytest.mark.proxy
def test_metrics_are_for_admins(workers: Workers) -> None:
    proxy, _, _ = workers
    _, key = proxy.create_account("1")
    assert httpx.get(proxy.url + PATH).status_code == 401
    r = httpx.get(proxy.url + PATH, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "permission_denied"


@pytest.mark.proxy
def test_health_still_counts(workers: Workers) -> None:
    proxy, _, _ = workers
    with proxy.admin() as admin:
        r = admin.get("/api/v1/admin/credits/health")
    assert r.status_code == 200, r.text
    assert set(r.json()["counters"]) == set(COUNTERS)


def test_an_operator_may_open_the_route(settings: Settings) -> None:
    """``credits.metrics.public``: a scraper without a key (the route reads no database)."""
    credits = settings.credits.model_copy(update={"metrics": MetricsConfig(public=True)})
    app = FastAPI()
    app.include_router(build_router(Runtime(settings.model_copy(update={"credits": credits}))))
    with TestClient(app) as client:
        r = client.get(PATH)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    names = {name for name, _, _ in _parse(r.text)}
    assert "litellm_credits_holds_taken_total" in names


@pytest.mark.proxy
def test_litellm_prometheus_metrics_route_shows_ours(
    fresh_database: Callable[[], str], upstream: FakeUpstream, tmp_path: Path
) -> None:
    """With LiteLLM's ``prometheus`` callback on, its own ``/metrics`` carries our metrics too:
    one scrape config for both (one worker here, the default registry)."""
    config = yaml.safe_load((TESTS / "proxy_config.yaml").read_text())
    config["litellm_settings"]["callbacks"] = ["litellm_credits.proxy.handler", "prometheus"]
    (tmp_path / "proxy_config.yaml").write_text(yaml.safe_dump(config))
    master = "sk-master-" + secrets.token_urlsafe(24)
    env = proxy_env(fresh_database(), master, upstream.url)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc, url = start_proxy(tmp_path / "proxy_config.yaml", env, tmp_path / "proxy.log")
    try:
        proxy = Proxy(url=url, master_key=master, log_path=tmp_path / "proxy.log")
        _, key = proxy.create_account("5")
        _chat(proxy, key)
        deadline = time.monotonic() + 60
        while True:
            r = httpx.get(url + "/metrics/", headers={"Authorization": f"Bearer {master}"}, timeout=30)
            assert r.status_code == 200, r.text
            samples = _parse(r.text)
            if _value(samples, "litellm_credits_settlements_total") == 1:
                break
            assert time.monotonic() < deadline, r.text[-3000:]
            time.sleep(0.3)
        assert _value(samples, "litellm_credits_holds_taken_total") == 1
        # LiteLLM's own series are there beside ours
        assert any(name.startswith("litellm_") and "credits" not in name for name, _, _ in samples)
    finally:
        stop_proxy(proc)


def test_sampling_is_off_or_at_least_a_second() -> None:
    assert MetricsConfig(sample_seconds=0).sample_seconds == 0
    assert MetricsConfig(sample_seconds=1).sample_seconds == 1
    for wrong in (0.5, -1):
        with pytest.raises(ValueError):
            MetricsConfig(sample_seconds=wrong)
