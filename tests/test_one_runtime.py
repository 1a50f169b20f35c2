"""One runtime per process, however LiteLLM loads the plugin.

Regression: under ``make serve`` a revoked key kept working for about 60 s. The repository's
``litellm_config.yaml`` sits next to ``litellm_credits/``, so LiteLLM's ``get_instance_fn`` ran
``proxy.py`` (callbacks) and ``auth.py`` (custom_auth) again from the config's directory as new
module objects: two runtimes, two pools, two caches in one process, and the copy that served the
key never heard of its revocation. The other tests use ``tests/proxy_config.yaml``, where no
package sits beside the config, and never saw it. Here the config is placed next to a
``litellm_credits/`` directory, as ``make serve`` has it, with no Redis.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import openai
import pytest

from .conftest import ROOT, TESTS, Proxy, proxy_env, start_proxy, stop_proxy
from .fake_upstream import FakeUpstream

pytestmark = pytest.mark.proxy


@pytest.fixture(scope="module")
def own_database(fresh_database: Callable[[], str]) -> str:
    """A database of its own: other proxies of the run keep pools on the shared one."""
    return fresh_database()


@pytest.fixture(scope="module")
def beside_the_package(
    own_database: str, upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    here = tmp_path_factory.mktemp("serve-layout")
    (here / "litellm_credits").symlink_to(ROOT / "litellm_credits", target_is_directory=True)
    config = here / "litellm_config.yaml"
    shutil.copy(TESTS / "proxy_config.yaml", config)
    master = "sk-master-" + secrets.token_urlsafe(24)
    env = proxy_env(own_database, master, upstream.url)  # no Redis, as under `make serve`
    log = here / "proxy.log"
    proc, url = start_proxy(config, env, log)
    try:
        yield Proxy(url=url, master_key=master, log_path=log)
    finally:
        stop_proxy(proc)


def _balance(proxy: Proxy, key: str) -> httpx.Response:
    return httpx.get(proxy.url + "/api/v1/credits/balance", headers={"Authorization": f"Bearer {key}"})


async def _pools_by_process(database_url: str) -> Counter[str]:
    """How many pools each other process has open on the test database."""
    conn = await asyncpg.connect(database_url)
    try:
        names = await conn.fetch(
            "SELECT DISTINCT application_name FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'litellm-credits pid %'"
        )
    finally:
        await conn.close()
    pids = [r["application_name"].split()[2] for r in names]
    return Counter(pid for pid in pids if pid != str(os.getpid()))


async def test_one_pool_in_the_process(beside_the_package: Proxy, own_database: str) -> None:
    _, key = beside_the_package.create_account("5")
    for _ in range(5):  # through custom_auth, the routes and the hook
        assert _balance(beside_the_package, key).status_code == 200
        with openai.OpenAI(base_url=beside_the_package.url + "/v1", api_key=key, max_retries=0) as oa:
            oa.chat.completions.create(
                model="fake-custom", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
    pools = await _pools_by_process(own_database)
    assert list(pools.values()) == [1], f"one process, one pool: {pools}"


def test_a_revoked_key_is_refused_on_the_next_request(beside_the_package: Proxy) -> None:
    user_id, key = beside_the_package.create_account("5")
    for _ in range(10):  # cached wherever a cache would keep it
        assert _balance(beside_the_package, key).status_code == 200
    with beside_the_package.admin() as admin:
        (issued,) = admin.get("/api/v1/admin/credits/keys", params={"user_id": user_id}).json()
        assert admin.post(f"/api/v1/admin/credits/keys/{issued['id']}/revoke").status_code == 200
    for _ in range(10):
        assert _balance(beside_the_package, key).status_code == 401
    with openai.OpenAI(base_url=beside_the_package.url + "/v1", api_key=key, max_retries=0) as oa:
        with pytest.raises(openai.AuthenticationError):
            oa.chat.completions.create(model="fake-custom", messages=[{"role": "user", "content": "hi"}])


def test_a_top_up_through_the_api_or_the_cli_is_seen_on_the_next_read(
    beside_the_package: Proxy, own_database: str
) -> None:
    user_id, key = beside_the_package.create_account("1")
    for _ in range(10):
        assert _balance(beside_the_package, key).json()["balance"] == "1.000000"
    with beside_the_package.admin() as admin:
        r = admin.post("/api/v1/admin/credits/allocate", json={"user_id": user_id, "amount": "2"})
        assert r.status_code == 200, r.text
    for _ in range(10):
        assert _balance(beside_the_package, key).json()["balance"] == "3.000000"
    cli = Path(sys.executable).parent / "litellm-credits"
    env = {**os.environ, "CREDITS_DATABASE_URL": own_database}
    env.pop("CREDITS_REDIS_URL", None)
    done = subprocess.run(
        [str(cli), "allocate", user_id, "4"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for _ in range(10):
        assert _balance(beside_the_package, key).json()["balance"] == "7.000000"
