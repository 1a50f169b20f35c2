"""Balance alerts and their webhooks, on a real PostgreSQL, delivered to a receiver in its own
process that verifies signatures from the Standard Webhooks specification."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpcore
import httpx
import pytest
from pydantic import SecretStr

from litellm_credits import webhooks
from litellm_credits.alerts import Alerts
from litellm_credits.crypto import SecretBox
from litellm_credits.errors import InvalidRequest
from litellm_credits.ledger import Ledger, UsageRecord
from litellm_credits.money import parse_credits as c
from litellm_credits.runtime import Runtime
from litellm_credits.webhook_targets import VETTED, VettedBackend, vet_connections
from litellm_credits.webhooks import Dispatcher, Policy, WebhookTargetRefused, check_target, headers

from .conftest import ENCRYPTION_KEY, ROOT, AccountFactory, Proxy, free_port
from .webhook_receiver import verified

USAGE = UsageRecord(model="m", prompt_tokens=1, completion_tokens=1)
FAST = Policy(base_delay_seconds=0.05, max_delay_seconds=0.2, timeout_seconds=5, allow_private=True)


class Receiver:
    def __init__(self, tmp: Path, failures: int = 0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.log = tmp / f"received-{self.port}.jsonl"
        self.failures = failures
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, secret: str) -> None:
        args = [str(self.port), secret, str(self.log), str(self.failures)]
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.webhook_receiver", *args], cwd=ROOT)
        deadline = time.monotonic() + 10
        import socket

        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the receiver did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def received(self, subject: str | None = None) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        lines = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [
            x for x in lines if subject is None or (x["body"] or {}).get("data", {}).get("user_id") == subject
        ]


@pytest.fixture
async def alerts(ledger: Ledger) -> AsyncIterator[Alerts]:
    made = Alerts(ledger.pool, SecretBox([ENCRYPTION_KEY]), allow_private=True)
    yield made
    # endpoints are global: none of a test's may take the next test's events
    await ledger.pool.execute("UPDATE credits.webhook_endpoints SET active = false")


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path, failures=3)
    yield r
    r.stop()


async def events(ledger: Ledger, subject: str) -> list[tuple[str, dict[str, Any]]]:
    rows = await ledger.pool.fetch(
        "SELECT type, data FROM credits.outbox WHERE subject_id = $1 ORDER BY id", subject
    )
    return [(r["type"], r["data"]) for r in rows]


async def spend(ledger: Ledger, subject: str, amount: int) -> None:
    held = await ledger.hold(subject, amount, ttl_seconds=600)
    await ledger.settle(subject, held.id, amount, USAGE)


def test_the_signature_verifies_with_a_receiver_written_from_the_spec() -> None:
    secret, old = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_" + "c2VjcmV0LWtleS1vbmUtMTIzNDU2Nzg="
    body = b'{"type":"balance.low","data":{"user_id":"ann"}}'
    now = int(time.time())
    sent = headers([secret, old], "evt_1", now, body)
    assert verified(secret, sent, body) and verified(old, sent, body)
    assert not verified(secret, sent, body + b" ")
    assert not verified(secret, {**sent, "webhook-id": "evt_2"}, body)
    stale = headers([secret], "evt_1", now - 3600, body)
    assert not verified(secret, stale, body)  # (a replay of an old message is the receiver's to refuse)


async def test_balance_low_fires_once_per_crossing_and_rearms(
    ledger: Ledger, alerts: Alerts, account: AccountFactory
) -> None:
    subject = await account("10")
    await alerts.set_thresholds(subject, [c("5"), c("2")], None)
    await spend(ledger, subject, c("6"))  # 10 -> 4: below 5
    await spend(ledger, subject, c("1"))  # 4 -> 3: no new crossing
    assert [(t, d["threshold"]) for t, d in await events(ledger, subject)] == [("balance.low", "5.000000")]
    await ledger.credit(subject, c("10"))  # 13: armed again
    await spend(ledger, subject, c("12"))  # 13 -> 1: below 5 and 2, once each
    await spend(ledger, subject, c("1"))  # 1 -> 0: depleted
    got = [(t, d.get("threshold"), d["balance"]) for t, d in await events(ledger, subject)]
    assert got == [
        ("balance.low", "5.000000", "4.000000"),
        ("balance.low", "5.000000", "1.000000"),
        ("balance.low", "2.000000", "1.000000"),
        ("balance.depleted", None, "0.000000"),
    ]


async def test_monthly_cap_alerts_at_80_and_100_percent_by_default(
    ledger: Ledger, alerts: Alerts, account: AccountFactory
) -> None:
    subject = await account("100", monthly_cap="10")
    assert (await alerts.thresholds(subject))["monthly_cap_percent"] == [80, 100]
    await spend(ledger, subject, c("7"))
    await spend(ledger, subject, c("1"))  # 80 %
    await spend(ledger, subject, c("1"))
    await spend(ledger, subject, c("1"))  # 100 %
    assert [(t, d["percent"]) for t, d in await events(ledger, subject)] == [
        ("monthly_cap.reached", 80),
        ("monthly_cap.reached", 100),
    ]


async def balance_low_for(
    ledger: Ledger, alerts: Alerts, account: AccountFactory, receiver: Receiver, url: str | None = None
) -> tuple[dict[str, Any], str]:
    """An endpoint for balance.low at ``url`` (the receiver's), the receiver started with its
    secret, and an account just taken below its 5-credit threshold: (endpoint, account)."""
    endpoint = await alerts.create_endpoint(
        url or receiver.url, events=["balance.low"], format="standard", description=None
    )
    receiver.start(endpoint["secret"])
    subject = await account("10")
    await alerts.set_thresholds(subject, [c("5")], [])
    await spend(ledger, subject, c("6"))
    return endpoint, subject


async def test_a_failing_receiver_gets_the_event_again_with_the_same_id(
    ledger: Ledger, alerts: Alerts, account: AccountFactory, receiver: Receiver
) -> None:
    endpoint, subject = await balance_low_for(ledger, alerts, account, receiver)

    dispatcher = Dispatcher(ledger.pool, SecretBox([ENCRYPTION_KEY]), FAST)
    try:
        deadline = time.monotonic() + 30
        while not any(x["status"] == 204 for x in receiver.received(subject)):
            assert time.monotonic() < deadline, receiver.received(subject)
            await dispatcher.run_once()
            await asyncio.sleep(0.05)
    finally:
        await dispatcher.close()
    got = receiver.received(subject)
    assert [x["status"] for x in got] == [500, 500, 500, 204]
    assert len({x["id"] for x in got}) == 1 and all(x["verified"] for x in got)
    assert got[0]["body"]["type"] == "balance.low" and got[0]["body"]["data"]["threshold"] == "5.000000"
    [delivery] = [
        d
        for d in (await alerts.deliveries(status=None, endpoint_id=endpoint["id"], limit=100, offset=0))[0]
        if d["event_id"] == got[0]["id"]
    ]
    assert (delivery["status"], delivery["attempts"], delivery["event_id"]) == ("delivered", 4, got[0]["id"])


async def test_a_delivery_is_dead_after_its_retry_window_and_replays_with_its_id(
    ledger: Ledger, alerts: Alerts, account: AccountFactory, tmp_path: Path
) -> None:
    receiver = Receiver(tmp_path, failures=1_000_000)
    endpoint = await alerts.create_endpoint(receiver.url, events=None, format="standard", description=None)
    receiver.start(endpoint["secret"])
    subject = await account("1")
    try:
        await spend(ledger, subject, c("1"))  # depleted
        policy = Policy(
            retry_hours=0.3 / 3600, base_delay_seconds=0.05, max_delay_seconds=0.1, allow_private=True
        )
        dispatcher = Dispatcher(ledger.pool, SecretBox([ENCRYPTION_KEY]), policy)
        try:
            deadline = time.monotonic() + 30
            while not (
                await alerts.deliveries(status="dead", endpoint_id=endpoint["id"], limit=10, offset=0)
            )[0]:
                assert time.monotonic() < deadline
                await dispatcher.run_once()
                await asyncio.sleep(0.05)
            [dead] = (await alerts.deliveries(status="dead", endpoint_id=endpoint["id"], limit=10, offset=0))[
                0
            ]
            assert dead["attempts"] >= 2 and dead["last_status"] == 500
            # the receiver is fixed; an admin replays the dead delivery: the same id arrives
            receiver.stop()
            fixed = Receiver(tmp_path)
            fixed.port, fixed.url, fixed.log = receiver.port, receiver.url, tmp_path / "fixed.jsonl"
            fixed.start(endpoint["secret"])
            try:
                await alerts.replay(dead["id"])
                await dispatcher.run_once()
                [ok] = fixed.received(subject)
                assert (ok["id"], ok["status"], ok["verified"]) == (dead["event_id"], 204, True)
            finally:
                fixed.stop()
        finally:
            await dispatcher.close()
    finally:
        receiver.stop()


async def test_an_alert_committed_before_a_crash_is_delivered_by_the_next_process(
    ledger: Ledger, alerts: Alerts, account: AccountFactory, receiver: Receiver, settings: Any
) -> None:
    """The alert is written with the change that raised it: a process that dies before it
    delivered it leaves it in the outbox, and any process that starts later delivers it."""
    receiver.failures = 0
    endpoint = await alerts.create_endpoint(
        receiver.url, events=["balance.depleted"], format="slack", description="ops"
    )
    receiver.start(endpoint["secret"])
    subject = await account("2")
    await spend(ledger, subject, c("2"))  # committed; nothing delivered it
    assert receiver.received() == []

    cfg = settings.credits.model_copy(
        update={"alerts": settings.credits.alerts.model_copy(update={"dispatch_interval_seconds": 0.05})}
    )
    restarted = Runtime(
        settings.model_copy(
            update={"sweeper": True, "credits": cfg, "encryption_keys": SecretStr(ENCRYPTION_KEY)}
        )
    )
    try:
        await restarted.ledger()
        deadline = time.monotonic() + 20
        while not receiver.received():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        await restarted.close()
    [got] = [x for x in receiver.received() if subject in x["body"]["text"]]
    assert got["verified"] and got["body"] == {"text": f"Credits of {subject} are used up: balance 0.000000."}


async def test_targets_that_are_never_called() -> None:
    for url in (
        "ftp://example.com/x",
        "http://user:pw@example.com/",
        "not a url",
        "http://[::1",
        "http://a\x7f.b/",
    ):
        with pytest.raises(InvalidRequest):
            await check_target(url, allow_private=True)
    for url in (
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:169.254.169.254]/",  # the same address, IPv4-mapped
        "http://[fe80::1]/",
        "http://0.0.0.0/",
        "http://" + "a" * 64 + ".example/",  # a label too long to resolve (not a 500)
    ):
        with pytest.raises(WebhookTargetRefused):
            await check_target(url, allow_private=True)  # link-local and metadata: even then
    for url in ("http://127.0.0.1:9/", "http://10.0.0.1/", "http://localhost/"):
        with pytest.raises(WebhookTargetRefused):
            await check_target(url, allow_private=False)
        await check_target(url, allow_private=True)


async def test_a_delivery_connects_to_the_address_its_check_approved(
    ledger: Ledger, alerts: Alerts, account: AccountFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name resolves to the receiver for the check, to another address for
    any later lookup. The delivery reaches the receiver, by its name, after one lookup."""
    receiver = Receiver(tmp_path)
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    lookups: list[str] = []

    async def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host  # (anyio asks in bytes)
        if name != "rebind.invalid":
            return await real(host, port, *args, **kwargs)
        lookups.append(name)
        address = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"  # nothing listens there
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]

    monkeypatch.setattr(loop, "getaddrinfo", rebinding)
    url = f"http://rebind.invalid:{receiver.port}/hooks"
    _, subject = await balance_low_for(ledger, alerts, account, receiver, url)
    lookups.clear()  # (the registration's check)

    dispatcher = Dispatcher(ledger.pool, SecretBox([ENCRYPTION_KEY]), FAST)
    try:
        deadline = time.monotonic() + 30
        while not receiver.received(subject):
            assert time.monotonic() < deadline, lookups
            await dispatcher.run_once()
            await asyncio.sleep(0.05)
    finally:
        await dispatcher.close()
        receiver.stop()
    [got] = receiver.received(subject)
    assert (got["status"], got["verified"], got["host"]) == (204, True, f"rebind.invalid:{receiver.port}")
    assert lookups == ["rebind.invalid"]  # the check's; the connection used what it approved


async def test_without_pinned_connections_nothing_is_delivered(
    ledger: Ledger, alerts: Alerts, account: AccountFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An httpx whose transport this cannot reach into: deliveries fail (and retry) rather than
    connect wherever the name resolves by then."""
    receiver = Receiver(tmp_path)
    endpoint, subject = await balance_low_for(ledger, alerts, account, receiver)
    monkeypatch.setattr(webhooks, "vet_connections", lambda client: False)
    dispatcher = Dispatcher(ledger.pool, SecretBox([ENCRYPTION_KEY]), FAST)
    try:
        assert await dispatcher.run_once() >= 1
    finally:
        await dispatcher.close()
        receiver.stop()
    assert receiver.received(subject) == []
    rows = (await alerts.deliveries(status=None, endpoint_id=endpoint["id"], limit=10, offset=0))[0]
    assert [(d["status"], d["last_error"]) for d in rows] == [
        ("pending", "connections cannot be pinned to the checked addresses")
    ]


class Recording(httpcore.AsyncNetworkBackend):
    def __init__(self, refuse: set[str]) -> None:
        self.calls: list[str] = []
        self.timeouts: list[float | None] = []
        self.refuse = refuse

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, *args: Any, **kwargs: Any
    ) -> httpcore.AsyncNetworkStream:
        self.calls.append(host)
        self.timeouts.append(timeout)
        if host in self.refuse:
            raise httpcore.ConnectError(f"{host} refused")
        return cast(httpcore.AsyncNetworkStream, object())


async def test_vetted_addresses_are_tried_in_order_and_other_hosts_pass_through() -> None:
    inner = Recording(refuse={"192.0.2.1"})
    backend = VettedBackend(inner)
    token = VETTED.set(("hooks.example", ("192.0.2.1", "198.51.100.7")))
    try:
        await backend.connect_tcp("hooks.example", 443)
        with pytest.raises(httpcore.ConnectError, match="not the host that was checked"):
            await backend.connect_tcp("elsewhere.example", 443)  # a URL that was not checked
    finally:
        VETTED.reset(token)
    await backend.connect_tcp("hooks.example", 443)  # outside a delivery: resolved as usual
    assert inner.calls == ["192.0.2.1", "198.51.100.7", "hooks.example"]
    inner.refuse.add("198.51.100.7")
    token = VETTED.set(("hooks.example", ("192.0.2.1", "198.51.100.7")))
    try:
        with pytest.raises(httpcore.ConnectError, match=r"192\.0\.2\.1: .*198\.51\.100\.7: "):
            await backend.connect_tcp("hooks.example", 443, timeout=5)
    finally:
        VETTED.reset(token)
    # one connect timeout for all: each address a share of what is left
    assert inner.timeouts[-2:] == [pytest.approx(2.5, abs=0.2), pytest.approx(5, abs=0.2)]
    async with httpx.AsyncClient() as client:
        assert vet_connections(client)  # httpx's layout is the one this reaches into


async def test_the_check_resolves_the_name_httpx_connects_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """IDNA 2008 (httpx), not Python's IDNA 2003, which maps faß.de to fass.de: another host."""
    loop = asyncio.get_running_loop()
    asked: list[str] = []

    async def resolver(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("93.184.215.14", port))]

    monkeypatch.setattr(loop, "getaddrinfo", resolver)
    assert await check_target("https://faß.de/hook", allow_private=False) == (
        "xn--fa-hia.de",
        ("93.184.215.14",),
    )
    assert asked == ["xn--fa-hia.de"]


def test_alert_routes_through_the_proxy(proxy: Proxy) -> None:
    _, key = proxy.create_account("10")
    with (
        proxy.admin() as admin,
        httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as me,
    ):
        r = me.get("/api/v1/credits/alerts")
        assert r.json() == {"balance_below": [], "monthly_cap_percent": [80, 100], "own": False}, r.text
        r = me.put(
            "/api/v1/credits/alerts", json={"balance_below": ["1.5", "5"], "monthly_cap_percent": [50]}
        )
        assert r.json() == {
            "balance_below": ["5.000000", "1.500000"],
            "monthly_cap_percent": [50],
            "own": True,
        }
        for bad in (
            {"balance_below": ["-1"]},
            {"monthly_cap_percent": [0]},
            {"balance_below": "5"},
            {"x": 1},
        ):
            r = me.put("/api/v1/credits/alerts", json=bad)
            assert r.status_code == 422 and r.json()["error"]["type"] == "validation_error", (bad, r.text)
        assert me.put("/api/v1/credits/alerts", json={}).json()["own"] is False  # back to the tier's

        assert (
            me.post("/api/v1/admin/credits/webhooks", json={"url": "http://127.0.0.1:9/"}).status_code == 403
        )
        r = admin.post(
            "/api/v1/admin/credits/webhooks", json={"url": "http://169.254.169.254/latest/meta-data"}
        )
        assert (r.status_code, r.json()["error"]["type"]) == (400, "webhook_target_refused"), r.text
        r = admin.post("/api/v1/admin/credits/webhooks", json={"url": "gopher://127.0.0.1/"})
        assert (r.status_code, r.json()["error"]["type"]) == (400, "invalid_request"), r.text
        r = admin.post(
            "/api/v1/admin/credits/webhooks", json={"url": "http://127.0.0.1:9/", "events": ["nope"]}
        )
        assert r.status_code == 422
        r = admin.post(
            "/api/v1/admin/credits/webhooks",
            json={"url": "http://127.0.0.1:9/hook", "events": ["balance.low"], "format": "slack"},
        )
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["secret"].startswith("whsec_") and created["events"] == ["balance.low"]
        listed = {e["id"]: e for e in admin.get("/api/v1/admin/credits/webhooks").json()}
        assert "secret" not in listed[created["id"]]
        rotated = admin.post(f"/api/v1/admin/credits/webhooks/{created['id']}/rotate-secret").json()
        assert rotated["secret"] != created["secret"] and rotated["previous_secret_until"] is not None
        r = admin.get("/api/v1/admin/credits/webhooks/deliveries?status=dead&limit=5")
        assert r.status_code == 200 and set(r.json()) == {"items", "total", "limit", "offset"}
        r = admin.post("/api/v1/admin/credits/webhooks/deliveries/999999999/replay")
        assert (r.status_code, r.json()["error"]["type"]) == (404, "not_found"), r.text
        r = admin.post(f"/api/v1/admin/credits/webhooks/{created['id']}/deactivate")
        assert r.json()["active"] is False


async def test_expiring_grants_are_announced_under_their_accounts_locks(
    ledger: Ledger, alerts: Alerts, account: AccountFactory
) -> None:
    """announce_expiring takes its accounts' row locks (in the ledger's order) before their grants,
    as a settlement does: an account a batch holds makes it wait. It updated the grants of many
    accounts in heap order without those locks, which could deadlock with a batch that holds an
    account and then burns its grant (an outside review's finding)."""
    from datetime import datetime, timedelta, timezone

    from litellm_credits.records import GrantTerms

    subject = await account("0")
    soon = datetime.now(timezone.utc) + timedelta(days=3)
    await ledger.credit(subject, c("2"), terms=GrantTerms("promotional", 0, soon))
    announced = "SELECT bool_or(expiring_announced) FROM credits.grants WHERE subject_id = $1"
    async with ledger.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "SELECT 1 FROM credits.credit_accounts WHERE subject_id = $1 FOR NO KEY UPDATE", subject
        )
        task = asyncio.create_task(alerts.announce_expiring(7))
        await asyncio.sleep(0.5)
        assert not task.done(), "it did not wait for the account's lock"
        assert await ledger.pool.fetchval(announced, subject) is False  # its grant not touched yet
    assert await asyncio.wait_for(task, 10) >= 1
    assert await ledger.pool.fetchval(announced, subject) is True


async def test_grant_expiring_is_announced_once_ahead_and_expired_when_it_expires(
    ledger: Ledger, alerts: Alerts, account: AccountFactory
) -> None:
    from datetime import datetime, timedelta, timezone

    from litellm_credits.grants import Grants
    from litellm_credits.records import GrantTerms

    subject = await account("0")
    soon = datetime.now(timezone.utc) + timedelta(days=3)
    await ledger.credit(subject, c("2"), terms=GrantTerms("promotional", 0, soon))
    await ledger.credit(subject, c("2"), terms=GrantTerms("promotional", 0, soon + timedelta(days=30)))
    assert await alerts.announce_expiring(7) >= 1
    await alerts.announce_expiring(7)  # once only
    [(kind, data)] = await events(ledger, subject)
    assert (kind, data["amount"], data["category"]) == ("grant.expiring", "2.000000", "promotional")

    await ledger.pool.execute(
        "UPDATE credits.grants SET effective_at = now() - interval '2 days',"
        " expires_at = now() - interval '1 day'"
        " WHERE subject_id = $1 AND expires_at < now() + interval '7 days'",
        subject,
    )
    await ledger.pool.execute(
        "UPDATE credits.credit_accounts SET grants_due_at = now() - interval '1 day' WHERE subject_id = $1",
        subject,
    )
    await Grants(ledger.pool).expire_due(batch=10_000)
    kinds = [(k, d.get("amount"), d.get("balance")) for k, d in await events(ledger, subject)]
    assert kinds[1:] == [("grant.expired", "2.000000", "2.000000")]


def test_a_proxy_killed_after_the_commit_delivers_the_alert_after_restart(
    database_url: str, redis_url: str, upstream: Any, tmp_path: Path
) -> None:
    """The real proxy, SIGKILLed after the change that raised an alert committed and before it
    dispatched it (its dispatch interval is an hour); the proxy started after it delivers it."""
    import os
    import signal

    from .conftest import CREDITS_TEST_CONFIG, TESTS, proxy_env, start_proxy, stop_proxy

    master = "sk-master-" + uuid.uuid4().hex
    env = proxy_env(database_url, master, upstream.url, redis_url, CREDITS_ENCRYPTION_KEYS=ENCRYPTION_KEY)
    receiver = Receiver(tmp_path)
    first, url = start_proxy(TESTS / "proxy_config.yaml", env, tmp_path / "first.log")
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {master}"}, timeout=30) as admin:
            created = admin.post(
                "/api/v1/admin/credits/webhooks", json={"url": receiver.url, "events": ["balance.low"]}
            ).json()
            receiver.start(created["secret"])
            user = "killed-" + uuid.uuid4().hex[:8]
            key = admin.post("/api/v1/admin/credits/accounts", json={"user_id": user}).json()["api_key"]
            admin.post(
                "/api/v1/admin/credits/allocate", json={"user_id": user, "amount": "10"}
            ).raise_for_status()
            me = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            me.put("/api/v1/credits/alerts", json={"balance_below": ["5"]}).raise_for_status()
            charge = {"user_id": user, "amount": "6", "idempotency_key": "k-" + user, "service": "search"}
            r = admin.post("/api/v1/credits/deduct", json=charge)
            assert r.status_code == 200, r.text
        os.kill(first.pid, signal.SIGKILL)  # committed, not delivered
        first.wait(10)
        assert receiver.received(user) == []

        fast = tmp_path / "credits.yaml"
        fast.write_text(
            CREDITS_TEST_CONFIG.read_text().replace(
                "dispatch_interval_seconds: 3600", "dispatch_interval_seconds: 0.2"
            )
        )
        second, _ = start_proxy(
            TESTS / "proxy_config.yaml", {**env, "CREDITS_CONFIG": str(fast)}, tmp_path / "second.log"
        )
        try:
            deadline = time.monotonic() + 30
            while not receiver.received(user):
                assert time.monotonic() < deadline, "the restarted proxy did not deliver the alert"
                time.sleep(0.1)
        finally:
            stop_proxy(second)
        [got] = receiver.received(user)
        assert got["verified"] and got["status"] == 204 and got["body"]["data"]["threshold"] == "5.000000"
    finally:
        if first.poll() is None:
            first.kill()
        receiver.stop()
        asyncio.run(_deactivate_endpoints(database_url))  # none may take the next tests' events


async def _deactivate_endpoints(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE credits.webhook_endpoints SET active = false")
    finally:
        await conn.close()


async def test_new_tier_thresholds_move_the_ceilings_of_the_accounts_that_follow_them(
    fresh_database: Any,
) -> None:
    """sync_defaults (at start-up) moves the alert ceiling of every account that follows its
    tier's thresholds, and of no other (the rows locked in the ledger's order first)."""
    from litellm_credits import db, migrations
    from litellm_credits.alerts import TierAlerts

    pool = await db.create_pool(fresh_database(), min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await migrations.migrate(conn)
        ledger, alerts = Ledger(pool), Alerts(pool)
        for subject in ("b-follows", "a-follows", "own"):
            await ledger.create_account(subject, tier="free")
        await alerts.set_thresholds("own", [c("1")], None)
        await alerts.sync_defaults({"free": TierAlerts(balance_below=[c("5"), c("2")])}, "free")
        ceilings = dict(await pool.fetch("SELECT subject_id, alert_ceiling FROM credits.credit_accounts"))
        assert ceilings == {"a-follows": c("5"), "b-follows": c("5"), "own": c("1")}
        await alerts.sync_defaults({"free": TierAlerts(balance_below=[c("3")])}, "free")
        ceilings = dict(await pool.fetch("SELECT subject_id, alert_ceiling FROM credits.credit_accounts"))
        assert ceilings == {"a-follows": c("3"), "b-follows": c("3"), "own": c("1")}
    finally:
        await pool.close()
