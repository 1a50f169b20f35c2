"""``litellm-credits``: operate the ledger from a shell.

litellm-credits migrate [--check]
litellm-credits accounts create USER [--tier T] [--monthly-cap N]
litellm-credits allocate USER AMOUNT [--reason TEXT] [--idempotency-key K]
                [--category paid|promotional] [--priority N] [--expires-at 2027-01-01T00:00:00Z]
litellm-credits balance USER
litellm-credits grants USER [--status live|used|expired]
litellm-credits alerts USER [--balance-below 5 1] [--cap-percent 80 100] [--tier-defaults]
litellm-credits topups USER
litellm-credits verify          # balance = sum(ledger) = live grants - overrun; held = open holds
litellm-credits sweep           # resolve expired holds and expire grants now
litellm-credits dsn             # the database in use (starts the embedded one if needed)
litellm-credits serve [--config litellm_config.yaml] [--port 4000]

With no CREDITS_DATABASE_URL the database is an embedded PostgreSQL under CREDITS_DATA_DIR, by
default the ``.credits-data`` of the checkout it runs in (``make serve``'s), else the user data
directory; every command says which on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from . import auth, crypto, db, migrations
from .alerts import Alerts
from .errors import CreditsError
from .grants import Grants
from .ledger import Ledger
from .money import AmountError, format_credits, parse_credits
from .records import GrantTerms
from .runtime import Runtime
from .settings import Settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="litellm-credits", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("migrate", help="apply pending migrations")
    m.add_argument("--check", action="store_true", help="list pending migrations and verify the schema")
    acc = sub.add_parser("accounts", help="manage accounts").add_subparsers(dest="action", required=True)
    c = acc.add_parser("create", help="create an account and print its API key (shown once)")
    c.add_argument("user_id")
    c.add_argument("--tier")
    c.add_argument("--monthly-cap")
    c.add_argument("--admin", action="store_true", help="the key is an admin key")
    a = sub.add_parser("allocate", help="add credits to an account")
    a.add_argument("user_id")
    a.add_argument("amount")
    a.add_argument("--reason")
    a.add_argument("--idempotency-key")
    a.add_argument("--category", choices=["paid", "promotional"], help="default: paid")
    a.add_argument("--priority", type=int, help="0-1000, lower burns first (default 0)")
    a.add_argument("--expires-at", type=_aware_time, help="ISO 8601 with a UTC offset; default: never")
    g = sub.add_parser("grants", help="an account's credit grants, newest first")
    g.add_argument("user_id")
    g.add_argument("--status", choices=["live", "used", "expired"])
    al = sub.add_parser("alerts", help="an account's alert thresholds: show them, or set them")
    al.add_argument("user_id")
    al.add_argument("--balance-below", nargs="+", metavar="CREDITS", help="balance.low below each")
    al.add_argument(
        "--cap-percent", nargs="+", type=int, metavar="PERCENT", help="monthly_cap.reached at each"
    )
    al.add_argument("--tier-defaults", action="store_true", help="drop the account's own: its tier's apply")
    tp = sub.add_parser("topups", help="an account's paid top-ups, newest first")
    tp.add_argument("user_id")
    b = sub.add_parser("balance", help="show an account")
    b.add_argument("user_id")
    sub.add_parser("verify", help="check every balance against the ledger")
    sub.add_parser("sweep", help="resolve expired holds and expire grants now")
    sub.add_parser("dsn", help="print the database DSN in use")
    sub.add_parser("stop-db", help="stop the embedded PostgreSQL (it outlives the proxy)")
    orp = sub.add_parser("openrouter", help="OpenRouter keys of accounts").add_subparsers(
        dest="action", required=True
    )
    orp.add_parser("sync", help="cap provisioned keys at what their accounts can pay; read every key's usage")
    orp.add_parser("reconcile", help="compare OpenRouter's usage per key with the ledger")
    rk = sub.add_parser("rotate-keys", help="re-encrypt stored secrets under the current encryption key")
    rk.add_argument("--batch", type=int, default=100)
    s = sub.add_parser("serve", help="migrate, then run the LiteLLM proxy with the plugin")
    s.add_argument("--config", default="litellm_config.yaml")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=4000)
    s.add_argument("--num-workers", type=int, default=1)
    return p


def _aware_time(text: str) -> datetime:
    at = datetime.fromisoformat(text)
    if at.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset (add Z or +00:00)")
    return at


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _embedded_note(settings: Settings) -> None:
    """Say which embedded database a command uses: a second one, made by running from another
    directory, looks like a database whose accounts have vanished."""
    if not settings.database_url:
        print(
            f"litellm-credits: embedded PostgreSQL under {settings.data_dir} "
            "(set CREDITS_DATA_DIR or CREDITS_DATABASE_URL for another)",
            file=sys.stderr,
            flush=True,
        )


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    _embedded_note(settings)
    dsn = await db.resolve_dsn(settings.database_url, settings.data_dir)
    if args.command == "dsn":
        print(dsn)
        return 0
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    runtime = Runtime(settings.model_copy(update={"database_url": dsn, "sweeper": False}))
    try:
        async with pool.acquire() as conn:
            if args.command == "migrate":
                if args.check:
                    report = await migrations.check(conn)
                    for m in report.pending:
                        print(f"pending  {m.version:04d}_{m.name}")
                    for v in report.changed:
                        print(f"changed  {v:04d} (file differs from what was applied)")
                    for name in report.missing:
                        print(f"missing  {name}")
                    print("ok" if report.ok else "schema is not up to date")
                    return 0 if report.ok else 1
                applied = await migrations.migrate(conn)
                for m in applied:
                    print(f"applied  {m.version:04d}_{m.name}")
                if not applied:
                    print("nothing to apply")
                return 0
            if settings.auto_migrate:
                await migrations.migrate(conn)
        # changes made here reach the proxies' caches (through Redis) like their own
        ledger = Ledger(pool, on_change=runtime.accounts_changed)
        cfg = settings.credits
        if args.command == "accounts":
            tier = args.tier or cfg.default_tier
            if tier not in cfg.tiers:
                raise CreditsError(f"unknown tier {tier!r}")
            cap = parse_credits(args.monthly_cap) if args.monthly_cap else None
            async with pool.acquire() as conn, conn.transaction():
                account = await ledger.create_account(args.user_id, tier=tier, monthly_cap=cap, conn=conn)
                issued = await auth.issue_key(conn, args.user_id, role="admin" if args.admin else "user")
            _print({**account.to_json(), "api_key": issued.key})
        elif args.command == "allocate":
            tx = await ledger.credit(
                args.user_id,
                parse_credits(args.amount),
                description=args.reason,
                idempotency_key=args.idempotency_key,
                terms=GrantTerms(args.category, args.priority, args.expires_at),
            )
            _print(tx.to_json())
        elif args.command == "grants":
            await ledger.require_account(args.user_id)
            grants = Grants(pool)
            items, _ = await grants.list(args.user_id, status=args.status, limit=1000)
            _print({**await grants.summary(args.user_id), "grants": [g.to_json() for g in items]})
        elif args.command == "alerts":
            alerts = Alerts(pool)
            if args.tier_defaults:
                _print(await alerts.set_thresholds(args.user_id, None, None))
            elif args.balance_below is not None or args.cap_percent is not None:
                now = await alerts.thresholds(args.user_id)
                below = (
                    [parse_credits(b) for b in args.balance_below]
                    if args.balance_below is not None
                    else [parse_credits(b) for b in now["balance_below"]]
                )
                percents = args.cap_percent if args.cap_percent is not None else now["monthly_cap_percent"]
                _print(await alerts.set_thresholds(args.user_id, below, percents))
            else:
                _print(await alerts.thresholds(args.user_id))
        elif args.command == "topups":
            await ledger.require_account(args.user_id)
            _print(await (await runtime.topups()).list(args.user_id, limit=1000, offset=0))
        elif args.command == "balance":
            _print((await ledger.require_account(args.user_id)).to_json())
        elif args.command == "verify":
            bad = await ledger.discrepancies()
            _print(bad)
            return 1 if bad else 0
        elif args.command == "openrouter":
            accounts = await runtime.openrouter_accounts()
            if args.action == "sync":
                results = await accounts.sync_all()
                _print(results)
                return 0 if all(v == "ok" for v in results.values()) else 1
            _print(await accounts.reconcile())
        elif args.command == "rotate-keys":
            keys = settings.encryption_keys.get_secret_value() if settings.encryption_keys else None
            rotation = await crypto.rotate_stored_secrets(
                pool, crypto.SecretBox.from_env_value(keys), batch=args.batch
            )
            print(
                f"re-encrypted {rotation.rotated} secrets; "
                f"{rotation.current} were already under the current key"
            )
            if rotation.unreadable:
                print(
                    f"{len(rotation.unreadable)} secrets open with no configured key (accounts: "
                    f"{', '.join(rotation.unreadable[:20])}); add their old key and run again",
                    file=sys.stderr,
                )
                return 1
        elif args.command == "sweep":
            n = await ledger.expire(policy=cfg.holds.expiry_policy, batch=cfg.holds.sweep_batch)
            print(f"resolved {n} expired holds ({cfg.holds.expiry_policy})")
            swept = await Grants(pool, ledger.changed).expire_due(batch=cfg.holds.sweep_batch)
            print(f"expired {format_credits(swept.expired)} credits of grants on {swept.accounts} accounts")
        return 0
    finally:
        await runtime.close()
        await pool.close()


def _kept(settings: Settings, name: str, make: Callable[[], str]) -> str:
    """A secret generated once and kept (0600) in the data directory."""
    path = settings.data_dir / name
    if path.is_file():
        return path.read_text().strip()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def _master_key(settings: Settings) -> str:
    """LITELLM_MASTER_KEY, or one generated once and kept in the data directory."""
    return os.environ.get("LITELLM_MASTER_KEY") or _kept(
        settings, "master_key", lambda: "sk-" + secrets.token_urlsafe(32)
    )


def _encryption_keys(settings: Settings) -> str:
    """CREDITS_ENCRYPTION_KEYS, or a Fernet key generated once and kept in the data directory
    (secrets at rest: webhook signing secrets, OpenRouter keys)."""
    return os.environ.get("CREDITS_ENCRYPTION_KEYS") or _kept(
        settings, "encryption_key", lambda: Fernet.generate_key().decode()
    )


_SERVE_HELP = """
litellm-credits: proxy starting on {url} (database: {db})

  export LITELLM_MASTER_KEY={key}

Create an account (its API key is shown once) and give it credits:

  curl -s {url}/api/v1/admin/credits/accounts -H "Authorization: Bearer $LITELLM_MASTER_KEY" \\
       -H 'content-type: application/json' -d '{{"user_id": "alice"}}'
  curl -s {url}/api/v1/admin/credits/allocate -H "Authorization: Bearer $LITELLM_MASTER_KEY" \\
       -H 'content-type: application/json' -d '{{"user_id": "alice", "amount": "10"}}'

Call a model with alice's key, then look at her balance:

  curl -s {url}/v1/chat/completions -H "Authorization: Bearer sk-cr-..." \\
       -H 'content-type: application/json' \\
       -d '{{"model": "demo-chat", "messages": [{{"role": "user", "content": "Hello"}}]}}'
  curl -s {url}/api/v1/credits/balance -H "Authorization: Bearer sk-cr-..."
"""


def serve(args: argparse.Namespace, settings: Settings) -> int:
    """Resolve the database, migrate, print how to use it, then become the proxy."""
    dsn = asyncio.run(db.resolve_dsn(settings.database_url, settings.data_dir))

    async def _migrate() -> None:
        conn = await db.create_pool(dsn, min_size=1, max_size=1)
        try:
            async with conn.acquire() as c:
                await migrations.migrate(c)
        finally:
            await conn.close()

    asyncio.run(_migrate())
    key = _master_key(settings)
    url = f"http://{args.host}:{args.port}"
    where = "embedded, " + str(settings.data_dir) if not settings.database_url else "CREDITS_DATABASE_URL"
    print(_SERVE_HELP.format(url=url, key=key, db=where), flush=True)
    exe = shutil.which("litellm") or str(Path(sys.executable).parent / "litellm")
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": key,
        "CREDITS_DATABASE_URL": dsn,
        "CREDITS_ENCRYPTION_KEYS": _encryption_keys(settings),
        "LITELLM_LOCAL_MODEL_COST_MAP": os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP", "True"),
        # LiteLLM serves Swagger UI at / unless told otherwise; /docs is where people look
        "DOCS_URL": os.environ.get("DOCS_URL", "/docs"),
    }
    cmd = [exe, "--config", args.config, "--host", args.host, "--port", str(args.port)]
    if args.num_workers > 1:
        cmd += ["--num_workers", str(args.num_workers)]
        if not settings.redis_url:
            print(
                "warning: several workers without CREDITS_REDIS_URL: each counts rate limits and "
                "caches analytics on its own (balances, keys and holds are read from PostgreSQL "
                "and always current)",
                file=sys.stderr,
                flush=True,
            )
    os.execvpe(exe, cmd, env)  # noqa: S606 - replaces this process with the proxy


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args, Settings.load())
    if args.command == "stop-db":
        data_dir = Settings.load().data_dir
        stopped = db.stop_embedded(data_dir)
        print(
            f"stopped the embedded PostgreSQL under {data_dir}"
            if stopped
            else f"no embedded PostgreSQL running under {data_dir}"
        )
        return 0
    try:
        return asyncio.run(_run(args, Settings.load()))
    except (CreditsError, AmountError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
