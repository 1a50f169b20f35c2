"""Migration 0016's batch functions against migration 0014's, on random batches.

0014's `take_holds`/`resolve_holds` ran `take_hold`/`resolve_hold` for each item in arrival order;
that is the definition of a batch's answer. Here they are installed beside 0016's (renamed
`ref_*`, from 0014's own file), and random batches over a team, its members, an account that
joined the team with holds of its own still open, and accounts paying for themselves (grants of
several priorities, some due to expire, caps, alert thresholds) run through both from the same
state: the answers and every row written (accounts, holds, grants and their burns, ledger rows,
usage events, the daily rollup, the alerts' outbox) must be the same.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from litellm_credits import migrations
from litellm_credits.ledger_batch import HoldItem, ResolveItem
from litellm_credits.records import UsageRecord

SEEDS = 24
STEPS = 10

# what the two runs must agree on, per account in id order (ids and times differ between them)
SNAPSHOT = """
SELECT jsonb_build_object(
 'accounts', (SELECT jsonb_agg(to_jsonb(a) - 'updated_at' - 'created_at' ORDER BY subject_id)
              FROM credits.credit_accounts a WHERE subject_id LIKE $1),
 'holds', (SELECT jsonb_agg(jsonb_build_object('s', subject_id, 'id', id, 'status', status,
                  'amount', amount, 'settled', settled_amount, 'member', member_id) ORDER BY subject_id, id)
           FROM credits.holds WHERE subject_id LIKE $1),
 'grants', (SELECT jsonb_agg(to_jsonb(g) - 'created_at' - 'effective_at' - 'transaction_id'
                   ORDER BY subject_id, id) FROM credits.grants g WHERE subject_id LIKE $1),
 'ledger', (SELECT jsonb_agg(jsonb_build_object('s', subject_id, 'amount', amount, 'after', balance_after,
                   'hold', hold_id, 'grant', grant_id, 'member', member_id, 'type', type,
                   'burns', (SELECT jsonb_agg(jsonb_build_object('g', b.grant_id, 'a', b.amount)
                                              ORDER BY b.grant_id NULLS LAST, b.amount)
                             FROM credits.grant_burns b
                             WHERE b.subject_id = t.subject_id AND b.transaction_id = t.id))
                   ORDER BY subject_id, id)
           FROM credits.credit_transactions t WHERE subject_id LIKE $1),
 'events', (SELECT jsonb_agg(jsonb_build_object('s', subject_id, 'request', request_id, 'status', status,
                   'cost', cost, 'charged', charged, 'payer', payer_id,
                   'ledger_hold', (SELECT t.hold_id FROM credits.credit_transactions t
                                   WHERE t.subject_id = coalesce(e.payer_id, e.subject_id)
                                     AND t.id = e.transaction_id)) ORDER BY subject_id, id)
           FROM credits.usage_events e WHERE subject_id LIKE $1),
 'daily', (SELECT jsonb_agg(to_jsonb(d) ORDER BY subject_id)
           FROM credits.usage_daily d WHERE subject_id LIKE $1),
 'outbox', (SELECT jsonb_agg(jsonb_build_object('s', subject_id, 'type', type, 'data', data)
                             ORDER BY subject_id, id)
            FROM credits.outbox WHERE subject_id LIKE $1)
)"""

OPEN_ACCOUNT = """
WITH a AS (INSERT INTO credits.credit_accounts (subject_id, parent_id) VALUES ($1, $2) RETURNING subject_id)
SELECT 1 FROM a
"""
CREDIT = """
WITH a AS (UPDATE credits.credit_accounts SET balance = balance + $2 WHERE subject_id = $1 RETURNING balance)
INSERT INTO credits.credit_transactions
    (subject_id, amount, balance_after, type, idempotency_key, grant_priority, grant_expires_at)
SELECT $1, $2, a.balance, $3, $4, $5, $6 FROM a
"""


def reference_functions() -> str:
    """Migration 0014's take_holds and resolve_holds, renamed ref_take_holds and ref_resolve_holds."""
    sql = next(m.sql for m in migrations.load_migrations() if m.version == 14)
    found = []
    for name in ("take_holds", "resolve_holds"):
        body = re.search(rf"CREATE FUNCTION credits\.{name}\(.*?\n\$\$;\n", sql, re.DOTALL)
        assert body is not None, name
        found.append(body.group(0).replace(f"credits.{name}(", f"credits.ref_{name}(", 1))
    return "\n".join(found)


@pytest.fixture(scope="module")
async def conn(fresh_database: Callable[[], str]) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(fresh_database())
    try:
        await migrations.migrate(connection)
        await connection.execute(reference_functions())
        yield connection
    finally:
        await connection.close()


def hold_item(subject: str, amount: int, minimum: int | None, debits: bool) -> dict[str, Any]:
    """A hold as the ledger sends it in a batch (the second tier is unlimited)."""
    return HoldItem(
        subject, uuid.uuid4(), ["free", "unlimited"], [amount, amount], [minimum, minimum],
        [debits, False], "free", 600, "m", "balanced", None, fresh=True,
    ).json(True)  # fmt: skip


def resolve_item(subject: str, hold: uuid.UUID, charge: int | None, status: str) -> dict[str, Any]:
    """A resolution as the ledger sends it in a batch."""
    usage_status = {"settled": "success", "captured": "success", "voided": "failed"}.get(status, status)
    usage = UsageRecord(model="m", provider="p", prompt_tokens=1, completion_tokens=2, latency_ms=1)
    return ResolveItem(subject, hold, charge, status, usage_status, usage).json()


async def both_ways(
    conn: asyncpg.Connection, name: str, items: list[dict[str, Any]], tag: str, ignore: tuple[str, ...]
) -> None:
    """The batch through 0014's function (rolled back), then through 0016's (kept): the same?"""
    runs = []
    for function, keep in ((f"credits.ref_{name}", False), (f"credits.{name}", True)):
        tx = conn.transaction()
        await tx.start()
        rows = await conn.fetch(f"SELECT * FROM {function}($1::jsonb)", json.dumps(items))
        answers = sorted(
            json.dumps({k: v for k, v in dict(r).items() if k not in ignore}, default=str, sort_keys=True)
            for r in rows
        )
        runs.append((answers, json.loads(await conn.fetchval(SNAPSHOT, tag + "%"))))
        await (tx.commit() if keep else tx.rollback())
    (ref_answers, ref_state), (answers, state) = runs
    assert answers == ref_answers, f"{name}: answers differ for {items}"
    for part in ref_state:
        assert state[part] == ref_state[part], f"{name}: {part} differs for {items}"


@pytest.mark.parametrize("seed", range(SEEDS))
async def test_random_batches_answer_and_write_what_0014_did(conn: asyncpg.Connection, seed: int) -> None:
    rnd = random.Random(seed)
    tag = f"diff{seed}-{uuid.uuid4().hex[:6]}-"
    team, m1, m2, a, b, p = (tag + k for k in ("T", "M1", "M2", "A", "B", "P"))
    await conn.execute(OPEN_ACCOUNT, team, None)
    await conn.execute(CREDIT, team, 1000, "allocation", "init", None, None)
    for member in (m1, m2):
        await conn.execute(OPEN_ACCOUNT, member, team)
    for subject in (a, b, p):
        await conn.execute(OPEN_ACCOUNT, subject, None)
        await conn.execute(CREDIT, subject, rnd.choice([100, 300, 1000]), "allocation", "init", None, None)
    for subject in (a, team, p):  # promotional grants that burn first, or later, and expire
        for n in range(rnd.randint(0, 2)):
            expires = None if rnd.random() < 0.3 else datetime.now(timezone.utc) + timedelta(days=10)
            await conn.execute(
                CREDIT,
                subject,
                rnd.choice([50, 100, 200]),
                "bonus",
                f"bonus-{n}",
                rnd.choice([0, 0, 5]),
                expires,
            )
    await conn.execute(
        "UPDATE credits.credit_accounts SET alert_balances = '{500,250,50}',"
        " monthly_cap = CASE WHEN $2 THEN 2000 END, request_cap = CASE WHEN $3 THEN 300 END"
        " WHERE subject_id LIKE $1",
        tag + "%",
        rnd.random() < 0.5,
        rnd.random() < 0.2,
    )
    await conn.execute("UPDATE credits.credit_accounts SET monthly_cap = 400 WHERE subject_id = $1", m1)
    # P holds on its own account, then joins the team with those holds open
    await conn.fetch(
        "SELECT * FROM credits.take_holds($1::jsonb)",
        json.dumps([hold_item(p, 40, None, True) for _ in range(3)]),
    )
    await conn.execute("UPDATE credits.credit_accounts SET parent_id = $2 WHERE subject_id = $1", p, team)

    names = {"T": team, "M1": m1, "M2": m2, "A": a, "B": b, "P": p}
    for _ in range(STEPS):
        if rnd.random() < 0.2:  # an account's promotional credit comes due (expired by its next hold)
            subject = names[rnd.choice(["A", "T", "P"])]
            await conn.execute(
                "UPDATE credits.grants SET effective_at = now() - interval '2 days',"
                " expires_at = now() - interval '1 second'"
                " WHERE subject_id = $1 AND expires_at IS NOT NULL AND status = 'live'",
                subject,
            )
            await conn.execute(
                "UPDATE credits.credit_accounts SET grants_due_at = now() - interval '1 second',"
                " daily_cap = CASE WHEN $2 THEN 900 END WHERE subject_id = $1",
                subject,
                rnd.random() < 0.5,
            )
        holds = [
            hold_item(
                names[rnd.choice(["T", "M1", "M2", "A", "B", "P", "A", "T"])],
                rnd.choice([0, 30, 80, 150, 300]),
                rnd.choice([None, 10]),
                rnd.random() < 0.9,
            )
            for _ in range(rnd.randint(2, 8))
        ]
        await both_ways(conn, "take_holds", holds, tag, ("expires_at",))
        live = await conn.fetch(
            "SELECT subject_id, id FROM credits.holds"
            " WHERE subject_id LIKE $1 AND status IN ('open', 'expired')",
            tag + "%",
        )
        if not live:
            continue
        ends = []
        for _ in range(rnd.randint(2, 8)):
            hold = rnd.choice(live)
            status = rnd.choice(["settled", "settled", "captured", "voided", "expired"])
            charge = (
                None
                if status == "captured"
                else 0
                if status in ("voided", "expired")
                else rnd.choice([0, 20, 60, 200])
            )
            ends.append(resolve_item(hold["subject_id"], hold["id"], charge, status))
        await both_ways(conn, "resolve_holds", ends, tag, ("transaction_id",))
