"""The README's promises: `litellm-credits serve` on an embedded database, and its usage example."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import ROOT, STRIPE_WEBHOOK_SECRET, free_port, stop_proxy

README = ROOT / "README.md"


def readme_example(name: str = "usage") -> str:
    text = README.read_text()
    match = re.search(rf"<!-- readme-example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README has no {name} example"
    return match.group(1)


def run_example(served: tuple[str, str], name: str) -> list[str]:
    """The README's example ``name``, run as written against ``litellm-credits serve``: its lines."""
    url, master_key = served
    # (the top-ups example plays Stripe: it signs Stripe's event with the endpoint's secret)
    env = {
        **os.environ,
        "PROXY_URL": url,
        "LITELLM_MASTER_KEY": master_key,
        "STRIPE_WEBHOOK_SECRET": STRIPE_WEBHOOK_SECRET,
    }
    result = subprocess.run(
        [sys.executable, "-c", readme_example(name)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, fake_stripe: tuple[str, Path]
) -> Iterator[tuple[str, str]]:
    """`litellm-credits serve` as `make serve` runs it: demo config, embedded PostgreSQL."""
    data_dir = tmp_path_factory.mktemp("serve-data")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("CREDITS_DATABASE_URL", "LITELLM_MASTER_KEY")}
    env.update(CREDITS_DATA_DIR=str(data_dir), LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR")
    env.update(  # Stripe: the fake one, as the README's top-ups section configures the real one
        CREDITS_STRIPE_SECRET_KEY="sk_test_readme",
        CREDITS_STRIPE_WEBHOOK_SECRET=STRIPE_WEBHOOK_SECRET,
        CREDITS_STRIPE_API_BASE=fake_stripe[0],
    )
    log_path = data_dir / "serve.log"
    exe = Path(sys.executable).parent / "litellm-credits"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(exe), "serve", "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(url + "/health/liveliness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.3)
        printed = log_path.read_text()
        assert f"Web dashboard: {url}/credits/" in printed, printed[-2000:]
        key = re.search(r"export LITELLM_MASTER_KEY=(\S+)", printed)
        assert key, printed[-2000:]
        assert key.group(1) == (data_dir / "master_key").read_text().strip()
        yield url, key.group(1)
    finally:
        stop_proxy(proc)
        subprocess.run([str(exe), "stop-db"], env=env, timeout=60, check=False)


def test_readme_usage_example_runs(served: tuple[str, str]) -> None:
    lines = run_example(served, "usage")
    assert lines[0] == "Hello from the demo model."
    charged, balance = re.fullmatch(r"charged (-\S+) balance (\S+)", lines[-1]).groups()  # type: ignore[union-attr]
    # the demo model's mock usage (10 prompt, 20 completion tokens) at gpt-4o-mini's price, 1000 credits/USD
    assert charged == "-0.013500"
    assert balance == "9.986500"


def test_the_api_docs_are_where_the_readme_says(served: tuple[str, str]) -> None:
    """Regression: the README sent newcomers to /docs, which was a 404 (LiteLLM serves its
    Swagger UI at / unless DOCS_URL says otherwise)."""
    url, _ = served
    assert "`/docs`" in README.read_text()
    page = httpx.get(url + "/docs", timeout=30)
    assert page.status_code == 200 and "swagger" in page.text.lower()
    spec = httpx.get(url + "/openapi.json", timeout=30).json()
    assert "/api/v1/credits/balance" in spec["paths"]


def test_quickstart_commands_are_the_makefile_targets() -> None:
    makefile = (ROOT / "Makefile").read_text()
    quickstart = README.read_text().split("## Quickstart", 1)[1].split("##", 1)[0]
    assert re.findall(r"^make (\w+)", quickstart, re.M) == ["serve", "test"]
    assert "serve: install" in makefile and "test: install" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_when_short_example_runs(served: tuple[str, str]) -> None:
    clamped, refused = run_example(served, "when_short")
    tokens = int(re.fullmatch(r"clamped to (\d+) output tokens", clamped).group(1))  # type: ignore[union-attr]
    # 0.5 credits at gpt-4o-mini's 0.6 USD per million output tokens, less the prompt: about 830
    assert 800 < tokens < 834
    assert refused == f"402 insufficient_credits covers {tokens}"


def test_readme_stream_guard_example_runs(served: tuple[str, str]) -> None:
    [line] = run_example(served, "stream_guard")
    words = int(re.fullmatch(r"finish_reason length after (\d+) words", line).group(1))  # type: ignore[union-attr]
    assert 5 <= words <= 20  # 20 tokens' worth of a story the model would have gone on with


def test_readme_team_pools_example_runs(served: tuple[str, str]) -> None:
    refused, members, balance = run_example(served, "team_pools")
    assert refused == "refused 402 member_cap_exceeded daily"
    assert members == "members ['dana']"
    assert 19.9 < float(balance.removeprefix("team balance ")) <= 20  # (settled in the background)


def test_readme_grants_example_runs(served: tuple[str, str]) -> None:
    promotional, paid, made_of = run_example(served, "grants")
    # the demo model's call (0.0135 credits) burnt the promotion, which expires, before the paid credits
    assert promotional == "promotional 0.500000 left 0.486500"
    assert paid == "paid 10.000000 left 10.000000"
    assert made_of == "promotional 0.486500 expiring 0.486500"


def test_readme_alerts_example_runs(served: tuple[str, str]) -> None:
    [line] = run_example(served, "alerts")
    assert line == "balance.low below 0.990000 balance 0.986500 signed True"


def test_readme_topups_example_runs(served: tuple[str, str]) -> None:
    checkout, paid = run_example(served, "topups")
    assert checkout == "pay 1.50 usd at https://checkout.stripe.test"
    assert paid == "credited balance 1500.000000 paid 1500.000000"


def test_readme_metrics_example_runs(served: tuple[str, str]) -> None:
    lines = run_example(served, "metrics")
    counts = {name: int(value) for name, value in (line.split() for line in lines)}
    # at least the example's own request (an earlier example's settlement may land meanwhile)
    assert counts["holds_taken_total"] >= 1
    assert counts["settlements_total"] >= 1
    # the demo model's mock usage at gpt-4o-mini's price: 0.0135 credits
    assert counts["charged_microcredits_total"] >= 13500
