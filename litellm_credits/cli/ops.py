"""Upkeep: ``migrate``, ``verify``, ``sweep``, ``rotate-keys``, ``openrouter``, ``dsn``, ``stop-db``."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from .. import crypto, db, migrations, sweeper
from ..money import format_credits
from ..settings import Settings
from .output import JsonOption, out, plural, print_json, show_rows
from .session import resolve_dsn, run, session

SQL_ACCOUNT_COUNT = "SELECT count(*) FROM credits.credit_accounts"
# the columns of credits.v_ledger_discrepancies that hold micro-credits
DISCREPANCY_MONEY = ("balance", "ledger_total", "held", "open_holds", "grants_remaining", "overrun")

openrouter_app = typer.Typer(help="OpenRouter keys of accounts.", no_args_is_help=True)


def migrate(
    check: Annotated[
        bool, typer.Option("--check", help="Only list pending migrations and verify the schema.")
    ] = False,
) -> None:
    """Apply pending database migrations."""

    async def work() -> int:
        async with session(migrate=False) as s, s.pool.acquire() as conn:
            if check:
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

    raise typer.Exit(run(work))


def verify(as_json: JsonOption = False) -> None:
    """Check every balance against the ledger; exit code 1 on any discrepancy.

    balance = sum of ledger rows = live grants - overrun, and held = open holds.
    """

    async def work() -> tuple[int, list[dict[str, Any]]]:
        async with session() as s:
            count = await s.pool.fetchval(SQL_ACCOUNT_COUNT)
            return count, await s.ledger.discrepancies()

    count, bad = run(work)
    rows = [{k: format_credits(v) if k in DISCREPANCY_MONEY else v for k, v in r.items()} for r in bad]
    if as_json:
        print_json({"accounts": count, "discrepancies": rows})
    else:
        if rows:
            columns = [("subject_id", "account")] + [(k, k.replace("_", " ")) for k in DISCREPANCY_MONEY]
            show_rows(rows, columns, empty="", right=DISCREPANCY_MONEY, title="Discrepancies")
        out().print(f"{plural(count, 'account')}, {plural(len(rows), 'discrepancy', 'discrepancies')}")
    raise typer.Exit(1 if rows else 0)


def sweep() -> None:
    """Resolve expired holds and expire due grants now (the proxy's sweeper does it periodically)."""

    async def work() -> None:
        async with session() as s:
            holds = s.settings.credits.holds
            # (after any pass another process has under way: one pass at a time)
            swept = await sweeper.sweep(
                s.ledger,
                s.dsn,
                policy=holds.expiry_policy,
                batch=holds.sweep_batch,
                hold_for=sweeper.claim_seconds(holds.sweep_interval_seconds),
                wait=True,
            )
            assert swept is not None
            print(f"resolved {swept.holds} expired holds ({holds.expiry_policy})")
            grants = swept.grants
            print(f"expired {format_credits(grants.expired)} credits of grants on {grants.accounts} accounts")

    run(work)


def rotate_keys(
    batch: Annotated[
        int, typer.Option(min=1, metavar="N", help="Secrets re-encrypted per transaction.")
    ] = 100,
) -> None:
    """Re-encrypt stored secrets under the current encryption key (the first of CREDITS_ENCRYPTION_KEYS)."""

    async def work() -> int:
        async with session() as s:
            keys = s.settings.encryption_keys
            rotation = await crypto.rotate_stored_secrets(
                s.pool,
                crypto.SecretBox.from_env_value(keys.get_secret_value() if keys else None),
                batch=batch,
            )
        print(
            f"re-encrypted {rotation.rotated} secrets; {rotation.current} were already under the current key"
        )
        if rotation.unreadable:
            held_by = [
                u if u.startswith("webhook endpoint") else f"account {u}" for u in rotation.unreadable[:20]
            ]
            print(
                f"{len(rotation.unreadable)} not re-encrypted (no configured key opens them, or they "
                f"changed during the run): {', '.join(held_by)}; add their old key and run again",
                file=sys.stderr,
            )
            return 1
        return 0

    raise typer.Exit(run(work))


@openrouter_app.command("sync")
def openrouter_sync(as_json: JsonOption = False) -> None:
    """Cap provisioned keys at what their accounts can pay; read every key's usage.

    Exit code 1 if any key failed.
    """

    async def work() -> dict[str, str]:
        async with session() as s:
            return await (await s.runtime.openrouter_accounts()).sync_all()

    results = run(work)
    if as_json:
        print_json(results)
    else:
        rows = [{"user_id": k, "result": v} for k, v in results.items()]
        show_rows(rows, [("user_id", "account"), ("result", "result")], empty="No OpenRouter keys.")
    raise typer.Exit(0 if all(v == "ok" for v in results.values()) else 1)


@openrouter_app.command("reconcile")
def openrouter_reconcile(as_json: JsonOption = False) -> None:
    """Compare OpenRouter's usage per provisioned key with what the ledger priced (USD)."""

    async def work() -> list[dict[str, Any]]:
        async with session() as s:
            return await (await s.runtime.openrouter_accounts()).reconcile()

    report = run(work)
    if as_json:
        print_json(report)
    else:
        columns = [(k, k.replace("_", " ")) for k in (report[0] if report else {})]
        show_rows(report, columns, empty="No provisioned OpenRouter keys.", right=[c for c, _ in columns[1:]])


def dsn(as_json: JsonOption = False) -> None:
    """Print the database DSN in use (starting the embedded PostgreSQL if it is the one)."""
    settings = Settings.load()

    async def work() -> str:
        return await resolve_dsn(settings)

    url = run(work)
    if as_json:
        print_json({"dsn": url, "embedded": not settings.database_url})
    else:
        print(url)


def stop_db() -> None:
    """Stop the embedded PostgreSQL (it outlives the proxy)."""
    data_dir = Settings.load().data_dir
    stopped = db.stop_embedded(data_dir)
    print(
        f"stopped the embedded PostgreSQL under {data_dir}"
        if stopped
        else f"no embedded PostgreSQL running under {data_dir}"
    )


__all__ = ["dsn", "migrate", "openrouter_app", "rotate_keys", "stop_db", "sweep", "verify"]
