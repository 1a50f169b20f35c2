"""The command line: which database it uses when none is configured; every command's output
for people (tables, no colour off a terminal) and scripts (--json); CSV allocation; help text."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asyncpg
import platformdirs
import pytest
import typer

from litellm_credits import db, sweeper
from litellm_credits.cli import _embedded_note, app, main
from litellm_credits.cli.session import ended_by_the_database
from litellm_credits.ledger import Ledger
from litellm_credits.settings import Settings

from .conftest import CREDITS_TEST_CONFIG


@pytest.fixture
def no_database_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CREDITS_DATABASE_URL", "CREDITS_DATA_DIR", "CREDITS_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def checkout(root: Path, *, data: bool = True) -> Path:
    """A directory like this repository after `make serve`: litellm_config.yaml and .credits-data/."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "litellm_config.yaml").write_text("model_list: []\n")
    if data:
        (root / ".credits-data").mkdir()
    return root


@pytest.mark.usefixtures("no_database_settings")
def test_cli_in_the_checkout_uses_the_database_make_serve_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: run from the repository without CREDITS_DATA_DIR, the CLI started a second
    embedded database in the user data directory and answered "no credit account" for the
    accounts `make serve` had made (the Makefile sets CREDITS_DATA_DIR=$(CURDIR)/.credits-data)."""
    root = checkout(tmp_path / "repo")
    (root / "litellm_credits").mkdir()
    monkeypatch.chdir(root / "litellm_credits")  # anywhere below the checkout
    assert Settings.load().data_dir == root / ".credits-data"
    assert main(["stop-db"]) == 0
    assert capsys.readouterr().out.strip() == f"no embedded PostgreSQL running under {root / '.credits-data'}"


@pytest.mark.usefixtures("no_database_settings")
def test_elsewhere_the_user_data_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(checkout(tmp_path / "never-served", data=False))
    assert Settings.load().data_dir == platformdirs.user_data_path("litellm-credits")
    stray = tmp_path / "no-config"
    (stray / ".credits-data").mkdir(parents=True)
    monkeypatch.chdir(stray)
    assert Settings.load().data_dir == platformdirs.user_data_path("litellm-credits")


@pytest.mark.usefixtures("no_database_settings")
def test_credits_data_dir_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(checkout(tmp_path / "repo"))
    monkeypatch.setenv("CREDITS_DATA_DIR", str(tmp_path / "elsewhere"))
    assert Settings.load().data_dir == tmp_path / "elsewhere"


def test_every_command_says_which_embedded_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _embedded_note(Settings.load(database_url=None, data_dir=tmp_path / "data"))
    assert f"embedded PostgreSQL under {tmp_path / 'data'}" in capsys.readouterr().err
    _embedded_note(Settings.load(database_url="postgresql://db.example/credits", data_dir=tmp_path))
    assert capsys.readouterr().err == ""


# -- the commands, against a database of their own -------------------------------------------

ANSI = "\x1b["


@pytest.fixture(scope="module")
def cli_database(fresh_database: Callable[[], str]) -> Iterator[str]:
    """A database for this module's commands (they reach it through CREDITS_DATABASE_URL)."""
    url = fresh_database()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CREDITS_DATABASE_URL", url)
        mp.setenv("CREDITS_CONFIG", str(CREDITS_TEST_CONFIG))
        mp.delenv("CREDITS_REDIS_URL", raising=False)
        mp.delenv("NO_COLOR", raising=False)
        yield url


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def cli(cli_database: str, capsys: pytest.CaptureFixture[str]) -> Callable[..., Ran]:
    """Runs ``litellm-credits ARGS`` in this process: its exit code and output (never a TTY)."""

    def run(*args: str) -> Ran:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        assert ANSI not in captured.out and ANSI not in captured.err, "colour codes reached a pipe"
        return Ran(code, captured.out, captured.err)

    return run


def sql(dsn: str, query: str, *args: Any) -> Any:
    async def go() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


def new_ids(n: int) -> list[str]:
    tag = "cli-" + secrets.token_hex(4)
    return [f"{tag}-{i}" for i in range(n)]


def make_account(cli: Callable[..., Ran], user: str, credits: str = "0", *extra: str) -> None:
    assert cli("accounts", "create", user, *extra).code == 0
    if credits != "0":
        assert cli("allocate", user, credits).code == 0


def balance(cli: Callable[..., Ran], user: str) -> str:
    ran = cli("balance", user, "--json")
    assert ran.code == 0, ran.err
    return str(ran.json()["balance"])


def test_accounts_list_filters_pages_and_prints_json(cli: Callable[..., Ran], cli_database: str) -> None:
    a, b, c, team, member = new_ids(5)
    tag = a.rsplit("-", 1)[0]
    make_account(cli, a, "5")
    make_account(cli, b, "20", "--tier", "pro")
    make_account(cli, c, "0.5")
    make_account(cli, team, "100")
    make_account(cli, member)
    sql(cli_database, "UPDATE credits.credit_accounts SET parent_id = $1 WHERE subject_id = $2", team, member)
    sql(cli_database, "UPDATE credits.credit_accounts SET status = 'disabled' WHERE subject_id = $1", c)

    def ids(*args: str) -> list[str]:
        ran = cli("accounts", "list", "--search", tag, "--json", *args)
        assert ran.code == 0, ran.err
        return [item["user_id"] for item in ran.json()["items"]]

    assert ids() == [member, team, c, b, a]  # newest first
    assert ids("--tier", "pro") == [b]
    assert ids("--status", "disabled") == [c]
    assert ids("--team", team) == [member]
    assert ids("--min-balance", "5", "--max-balance", "20") == [b, a]
    assert ids("--limit", "2") == [member, team]
    assert ids("--limit", "2", "--offset", "4") == [a]

    page = cli("accounts", "list", "--search", tag, "--limit", "2", "--json").json()
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 0)
    assert page["items"][1]["balance"] == "100.000000"  # money as exact decimal strings

    table = cli("accounts", "list", "--search", tag, "--limit", "2")
    assert table.code == 0
    assert team in table.out and "100.000000" in table.out and a not in table.out
    assert "1-2 of 5 accounts; next page: --offset 2" in table.out


def test_accounts_list_when_nothing_matches(cli: Callable[..., Ran]) -> None:
    ran = cli("accounts", "list", "--search", "no-such-account-anywhere")
    assert (ran.code, ran.out.strip()) == (0, "No accounts.")
    assert cli("accounts", "list", "--search", "no-such-account-anywhere", "--json").json() == {
        "items": [],
        "total": 0,
        "limit": 50,
        "offset": 0,
    }
    assert cli("accounts", "list", "--min-balance", "ten").code == 2


def test_accounts_show(cli: Callable[..., Ran]) -> None:
    (user,) = new_ids(1)
    make_account(cli, user, "12.5", "--monthly-cap", "40")
    assert cli("allocate", user, "1", "--reason", "welcome bonus", "--category", "promotional").code == 0
    shown = cli("accounts", "show", user, "--json").json()
    assert (shown["balance"], shown["monthly_cap"], shown["tier"]) == ("13.500000", "40.000000", "free")
    assert shown["grants"]["promotional"] == "1.000000"
    assert [t["amount"] for t in shown["recent_transactions"]] == ["1.000000", "12.500000"]
    table = cli("accounts", "show", user)
    assert table.code == 0
    for text in (user, "13.500000", "40.000000", "welcome bonus", "Recent transactions"):
        assert text in table.out
    missing = cli("accounts", "show", "nobody-" + user)
    assert missing.code == 2
    assert missing.err.strip().splitlines()[-1] == f"error: no credit account 'nobody-{user}'"


def test_empty_lists_say_so(cli: Callable[..., Ran]) -> None:
    (user,) = new_ids(1)
    make_account(cli, user)
    assert "No grants." in cli("grants", user).out
    assert cli("grants", user, "--json").json()["grants"] == []
    assert cli("topups", user).out.strip() == "No top-ups."
    assert cli("topups", user, "--json").json() == []


def test_alerts_still_take_several_values_after_one_option(cli: Callable[..., Ran]) -> None:
    """The README's ``--balance-below 5 1 --cap-percent 80 100`` (argparse's nargs) still works."""
    (user,) = new_ids(1)
    make_account(cli, user)
    ran = cli("alerts", user, "--balance-below", "5", "1", "--cap-percent", "80", "100", "--json")
    assert ran.code == 0, ran.err
    assert ran.json() == {
        "balance_below": ["5.000000", "1.000000"],
        "monthly_cap_percent": [80, 100],
        "own": True,
    }
    assert cli("alerts", user, "--tier-defaults", "--json").json()["own"] is False


def write_csv(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / f"grants-{secrets.token_hex(3)}.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_allocate_from_csv_all_or_nothing(cli: Callable[..., Ran], tmp_path: Path) -> None:
    a, b = new_ids(2)
    make_account(cli, a)
    make_account(cli, b)
    bad = write_csv(tmp_path, "user_id,amount,reason", f"{a},5,march", f"{b},-1,march", f"ghost-{a},1,march")
    ran = cli("allocate", "--from-csv", bad)
    assert ran.code == 1
    assert "2 ┆" not in ran.out  # (a table, not a traceback)
    assert "3" in ran.out and "not positive" in ran.out
    assert "4" in ran.out and f"no credit account 'ghost-{a}'" in ran.out
    assert "nothing was credited" in ran.out
    assert (balance(cli, a), balance(cli, b)) == ("0.000000", "0.000000")

    good = write_csv(
        tmp_path,
        "user_id,amount,reason,category,expires_at",
        f"{a},5,march,promotional,",
        f"{b},2.25,march,,",
    )
    first = cli("allocate", "--from-csv", good, "--category", "promotional", "--json")
    assert first.code == 0, first.err
    assert first.json()["total"] == "7.250000" and first.json()["failed"] == []
    assert {item["status"] for item in first.json()["items"]} == {"credited"}
    again = cli("allocate", "--from-csv", good, "--category", "promotional", "--json")
    assert again.code == 0
    # the same file credits nothing twice: it answers with the first run's rows
    assert [{**item, "status": "credited"} for item in again.json()["items"]] == first.json()["items"]
    assert {item["status"] for item in again.json()["items"]} == {"already credited"}
    assert (balance(cli, a), balance(cli, b)) == ("5.000000", "2.250000")
    assert cli("grants", a, "--json").json()["promotional"] == "5.000000"

    twice = write_csv(tmp_path, "user_id,amount", f"{a},1", f"{b},1", f"{a},2")
    refused = cli("allocate", "--from-csv", twice, "--json")
    assert refused.code == 1 and refused.json()["failed"] == [
        {"line": 4, "user_id": a, "error": "also on line 2: one row per account (or use --per-row)"}
    ]
    assert (balance(cli, a), balance(cli, b)) == ("5.000000", "2.250000")


def test_all_or_nothing_credits_each_row_with_its_own_terms(
    cli: Callable[..., Ran], cli_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: --all-or-nothing refused a file whose rows differed in reason, category,
    priority or expiry ("use --per-row, or split the file"); it credits each row with its own, in
    one transaction, and a re-run credits nothing again."""
    a, b, c = users = new_ids(3)
    for user in users:
        make_account(cli, user)
    lines = (
        "user_id,amount,reason,category,priority,expires_at",
        f"{a},1,march promo,promotional,5,2031-01-01T00:00:00Z",
        f"{b},2.5,refill,paid,,",
        f"{c},3,,,900,2032-06-30T12:00:00+02:00",
    )
    defaults = ("--reason", "default reason", "--category", "promotional")
    ledger = (
        "SELECT subject_id, amount, description, grant_category, grant_priority, grant_expires_at"
        " FROM credits.credit_transactions WHERE subject_id = ANY($1::text[]) ORDER BY subject_id, id"
    )
    grants = (
        "SELECT subject_id, amount, category, priority, expires_at"
        " FROM credits.grants WHERE subject_id = ANY($1::text[]) ORDER BY subject_id, id"
    )

    # a bad row: nothing is credited
    bad = cli("allocate", "--from-csv", write_csv(tmp_path, *lines, f"{c}-ghost,1,,,,"), *defaults)
    assert bad.code == 1 and f"no credit account '{c}-ghost'" in bad.out and "nothing was credited" in bad.out
    # an account that is gone by the time of the transaction (the ledger finds it, not the file's
    # checks): the rows before it in account order were credited in the same transaction, undone
    with monkeypatch.context() as mp:
        mp.setattr("litellm_credits.cli.bulk._check_accounts", _no_failures)
        gone = cli("allocate", "--from-csv", write_csv(tmp_path, *lines, f"{c}-ghost,1,,,,"), *defaults)
    assert gone.code == 2 and "1 of 4 accounts do not exist; nothing was credited" in gone.err
    assert sql(cli_database, ledger, users) == []

    path = write_csv(tmp_path, *lines)
    first = cli("allocate", "--from-csv", path, *defaults, "--json")
    assert first.code == 0, first.err
    assert first.json()["total"] == "6.500000" and first.json()["failed"] == []
    assert {item["status"] for item in first.json()["items"]} == {"credited"}
    utc = timezone.utc
    a_expiry, c_expiry = datetime(2031, 1, 1, tzinfo=utc), datetime(2032, 6, 30, 10, tzinfo=utc)
    assert [tuple(r) for r in sql(cli_database, ledger, users)] == [
        (a, 1_000_000, "march promo", "promotional", 5, a_expiry),
        (b, 2_500_000, "refill", "paid", None, None),
        (c, 3_000_000, "default reason", "promotional", 900, c_expiry),
    ]
    assert [tuple(r) for r in sql(cli_database, grants, users)] == [
        (a, 1_000_000, "promotional", 5, a_expiry),
        (b, 2_500_000, "paid", 0, None),
        (c, 3_000_000, "promotional", 900, c_expiry),
    ]

    again = cli("allocate", "--from-csv", path, *defaults, "--json")
    assert again.code == 0, again.err
    assert [{**item, "status": "credited"} for item in again.json()["items"]] == first.json()["items"]
    assert {item["status"] for item in again.json()["items"]} == {"already credited"}
    assert len(sql(cli_database, ledger, users)) == 3
    assert [balance(cli, u) for u in users] == ["1.000000", "2.500000", "3.000000"]


async def _no_failures(*_: Any) -> list[dict[str, Any]]:
    return []


def test_allocate_from_csv_per_row(cli: Callable[..., Ran], tmp_path: Path) -> None:
    a, b = new_ids(2)
    make_account(cli, a)
    make_account(cli, b)
    path = write_csv(tmp_path, "user_id,amount", f"{a},3", f"{b},abc", f"nobody-{a},1", f"{b},4")
    ran = cli("allocate", "--from-csv", path, "--per-row")
    assert ran.code == 1
    assert "credited 2 rows, 7.000000 credits; 2 failed" in ran.out
    assert "not a decimal number: 'abc'" in ran.out and f"no credit account 'nobody-{a}'" in ran.out
    assert (balance(cli, a), balance(cli, b)) == ("3.000000", "4.000000")
    rerun = cli("allocate", "--from-csv", path, "--per-row", "--json")
    assert rerun.code == 1
    assert [f["line"] for f in rerun.json()["failed"]] == [3, 4]
    assert (balance(cli, a), balance(cli, b)) == ("3.000000", "4.000000")  # idempotent
    assert {item["status"] for item in rerun.json()["items"]} == {"already credited"}


def test_all_or_nothing_will_not_finish_a_per_row_run(cli: Callable[..., Ran], tmp_path: Path) -> None:
    """Under one key a per-row run credited some rows: all-or-nothing refuses (nothing twice)."""
    a, b = new_ids(2)
    make_account(cli, a)
    make_account(cli, b)
    key = "feb-" + a
    assert (
        cli(
            "allocate",
            "--from-csv",
            write_csv(tmp_path, "user_id,amount", f"{a},1"),
            "--per-row",
            "--idempotency-key",
            key,
        ).code
        == 0
    )
    both = write_csv(tmp_path, "user_id,amount", f"{a},1", f"{b},2")
    refused = cli("allocate", "--from-csv", both, "--idempotency-key", key)
    assert refused.code == 2 and "finish it with --per-row" in refused.err
    assert (balance(cli, a), balance(cli, b)) == ("1.000000", "0.000000")
    finished = cli("allocate", "--from-csv", both, "--idempotency-key", key, "--per-row", "--json")
    assert [i["status"] for i in finished.json()["items"]] == ["already credited", "credited"]
    assert (balance(cli, a), balance(cli, b)) == ("1.000000", "2.000000")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("", "is empty"),
        ("user,amount\nx,1\n", "missing column user_id; unknown column user"),
        ("user_id,amount\n", "has no rows"),
    ],
)
def test_allocate_from_a_bad_csv_file(
    cli: Callable[..., Ran], tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "grants.csv"
    if content is not None:
        path.write_text(content)
    ran = cli("allocate", "--from-csv", str(path))
    assert ran.code == 2 and message in ran.err and "Traceback" not in ran.err


def test_verify_counts_and_exits_nonzero_on_a_discrepancy(cli: Callable[..., Ran], cli_database: str) -> None:
    (user,) = new_ids(1)
    make_account(cli, user, "10")
    ran = cli("verify")
    assert ran.code == 0
    assert re.fullmatch(r"\d+ accounts?, 0 discrepancies", ran.out.strip())  # (alone: 1 account)
    # the accounts table is not append-only: a balance the ledger does not back
    sql(
        cli_database,
        "UPDATE credits.credit_accounts SET balance = balance + 1000000 WHERE subject_id = $1",
        user,
    )
    try:
        bad = cli("verify")
        assert bad.code == 1
        assert user in bad.out and "11.000000" in bad.out and "1 discrepancy" in bad.out
        report = cli("verify", "--json")
        assert report.code == 1
        (row,) = report.json()["discrepancies"]
        assert (row["subject_id"], row["balance"], row["ledger_total"]) == (user, "11.000000", "10.000000")
    finally:
        sql(
            cli_database,
            "UPDATE credits.credit_accounts SET balance = balance - 1000000 WHERE subject_id = $1",
            user,
        )
    assert cli("verify").code == 0


def test_bad_input_is_one_line_and_a_nonzero_exit(cli: Callable[..., Ran]) -> None:
    (user,) = new_ids(1)
    make_account(cli, user)
    for args, message in [
        (("allocate", user, "ten"), "error: not a decimal number: 'ten'"),
        (("allocate", "nobody-" + user, "1"), f"error: no credit account 'nobody-{user}'"),
        (("balance", "nobody-" + user), f"error: no credit account 'nobody-{user}'"),
    ]:
        ran = cli(*args)
        assert ran.code == 2
        assert ran.err.strip().splitlines()[-1] == message
    late = cli("allocate", user, "1", "--expires-at", "2027-01-01")
    assert late.code == 2 and "has no UTC offset" in late.err and "Traceback" not in late.err
    assert cli("no-such-command").code == 2


def every_command(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """The command tree of the typer app (its click commands: typer vendors click), depth first."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from every_command(sub, (*path, name))


MARKUP = re.compile(r"``|:class:|:func:|:meth:|:attr:|\[/?bold\]")


def test_every_command_and_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = list(every_command(typer.main.get_command(app)))
    names = {" ".join(path) for path, _ in commands}
    assert {
        "accounts list",
        "accounts show",
        "accounts create",
        "allocate",
        "serve",
        "openrouter sync",
    } <= names
    for path, command in commands:
        assert command.help and not MARKUP.search(command.help), path
        for param in command.params:
            assert param.help, (path, param.name)  # options and arguments alike
            assert not MARKUP.search(param.help), (path, param.name)
        assert main([*path, "--help"]) == 0
        shown = capsys.readouterr().out
        assert "Usage: litellm-credits" in shown and ANSI not in shown and not MARKUP.search(shown), path
        # typer 0.29 printed a metavar "<bool>" beside every flag, "--help" included
        assert "<bool>" not in shown, path


def test_read_commands_all_take_json() -> None:
    root = typer.main.get_command(app)
    for path in (
        ("accounts", "list"),
        ("accounts", "show"),
        ("balance",),
        ("grants",),
        ("alerts",),
        ("topups",),
        ("verify",),
        ("dsn",),
        ("openrouter", "sync"),
        ("openrouter", "reconcile"),
    ):
        command = root
        for name in path:
            command = command.commands[name]  # type: ignore[attr-defined]
        assert "--json" in [o for p in command.params for o in p.opts], path


def test_serve_prints_the_dashboard_and_gives_the_workers_a_metrics_directory(
    cli_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``serve`` becomes the proxy (exec); here the exec is caught, with what it would run."""
    execs: list[tuple[list[str], dict[str, str]]] = []

    class Execd(Exception):
        pass

    def fake_exec(file: str, args: list[str], env: dict[str, str]) -> None:
        execs.append((args, env))
        raise Execd

    monkeypatch.setattr(os, "execvpe", fake_exec)
    monkeypatch.setenv("CREDITS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LITELLM_MASTER_KEY", "sk-test-master")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    stale = tmp_path / "data" / "prometheus" / "counter_123.db"
    stale.parent.mkdir(parents=True)
    stale.write_text("from a previous run")
    with pytest.raises(Execd):
        main(["serve", "--port", "4999", "--num-workers", "2"])
    printed = capsys.readouterr().out
    assert "proxy starting on http://127.0.0.1:4999" in printed
    assert "export LITELLM_MASTER_KEY=sk-test-master" in printed
    assert "http://127.0.0.1:4999/credits/" in printed
    args, env = execs[-1]
    assert args[1:] == [
        "--config",
        "litellm_config.yaml",
        "--host",
        "127.0.0.1",
        "--port",
        "4999",
        "--num_workers",
        "2",
    ]
    assert env["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "data" / "prometheus")
    assert list((tmp_path / "data" / "prometheus").iterdir()) == []  # emptied at start
    assert env["CREDITS_DATABASE_URL"] == cli_database and env["LITELLM_MASTER_KEY"] == "sk-test-master"

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "mine"))
    with pytest.raises(Execd):
        main(["serve"])
    assert execs[-1][1]["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "mine")  # the operator's wins


def test_sweep_resolves_expired_holds_now(cli: Callable[..., Ran], cli_database: str) -> None:
    (user,) = new_ids(1)
    make_account(cli, user, "10")

    async def hold() -> uuid.UUID:
        pool = await db.create_pool(cli_database, min_size=1, max_size=2)
        try:
            return (await Ledger(pool).hold(user, 4_000_000, ttl_seconds=1)).id
        finally:
            await pool.close()

    hold_id = asyncio.run(hold())
    time.sleep(1.2)
    ran = cli("sweep")
    assert ran.code == 0, ran.err
    resolved = re.match(r"resolved (\d+) expired holds \((void|capture)\)\n", ran.out)
    assert resolved and int(resolved.group(1)) >= 1, ran.out
    [row] = sql(cli_database, "SELECT status FROM credits.holds WHERE id = $1", hold_id)
    assert row["status"] in ("expired", "captured")
    assert "credits of grants on" in ran.out
    assert cli("verify").code == 0


def with_settings(dsn: str, **settings: int) -> str:
    """``dsn`` with server settings added to its query (asyncpg passes unknown ones to the server)."""
    query = "&".join(f"{k}={v}" for k, v in settings.items())
    return dsn + ("&" if "?" in dsn else "?") + query


@contextlib.contextmanager
def held_elsewhere(
    dsn: str, statement: str, *args: Any, until: Callable[[asyncpg.Connection], Awaitable[None]]
) -> Iterator[None]:
    """``statement`` (a lock) taken in a transaction on another connection, in another thread,
    and held until ``until(connection)`` returns."""
    taken = threading.Event()
    failed: list[BaseException] = []

    async def hold() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute(statement, *args)
                taken.set()
                await until(conn)
        except BaseException as e:
            failed.append(e)
        finally:
            await conn.close()

    holder = threading.Thread(target=asyncio.run, args=(hold(),))
    holder.start()
    try:
        assert taken.wait(10), f"the lock was not taken: {failed}"
        yield
    finally:
        holder.join(60)
    assert not failed, failed


def set_within(
    event: threading.Event, seconds: float = 30
) -> Callable[[asyncpg.Connection], Awaitable[None]]:
    """An ``until`` for :func:`held_elsewhere`: until ``event`` is set (or ``seconds`` passed)."""

    async def until(conn: asyncpg.Connection) -> None:
        deadline = time.monotonic() + seconds
        while not event.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    return until


def test_sweep_waits_for_a_pass_under_way_past_the_dsns_timeouts(
    cli: Callable[..., Ran], cli_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command waits for another process's pass however long it takes: a lock_timeout and a
    statement_timeout in the DSN (passed to every statement) do not end the wait in a traceback."""
    waited: list[float] = []

    async def the_command_waits_then_longer(conn: asyncpg.Connection) -> None:
        deadline = time.monotonic() + 60
        while not await conn.fetchval(WAITING_FOR_THE_SWEEP, sweeper.SWEEP_LOCK_ID):
            assert time.monotonic() < deadline, "the command never waited for the pass under way"
            await asyncio.sleep(0.05)
        waited.append(time.monotonic())
        await asyncio.sleep(1.5)  # three times the DSN's timeouts below

    monkeypatch.setenv(
        "CREDITS_DATABASE_URL", with_settings(cli_database, lock_timeout=500, statement_timeout=500)
    )
    claim = "SELECT pg_advisory_xact_lock($1)"
    with held_elsewhere(cli_database, claim, sweeper.SWEEP_LOCK_ID, until=the_command_waits_then_longer):
        ran = cli("sweep")
    assert ran.code == 0, ran.err
    assert waited and time.monotonic() - waited[0] >= 1.5, "the command did not wait for the pass"
    assert re.match(r"resolved \d+ expired holds", ran.out), ran.out


WAITING_FOR_THE_SWEEP = """
SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
               AND objid = ($1::bigint & 4294967295)::oid)
"""


def test_a_database_error_ends_a_command_with_one_line(
    cli: Callable[..., Ran], cli_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statement the server ends (here: the accounts' table locked elsewhere, and a lock_timeout
    in the DSN) is a one-line error with its SQLSTATE and exit code 1, not a traceback."""
    cli("migrate")  # (the command's own migration check would wait on the lock first)
    monkeypatch.setenv("CREDITS_DATABASE_URL", with_settings(cli_database, lock_timeout=200))
    lock = "LOCK TABLE credits.credit_accounts IN ACCESS EXCLUSIVE MODE"
    ended = threading.Event()
    with held_elsewhere(cli_database, lock, until=set_within(ended)):
        ran = cli("verify")
        ended.set()
    assert ran.code == 1, (ran.out, ran.err)
    assert ran.err.startswith("error: the database ended the command: "), ran.err
    assert "SQLSTATE 55P03" in ran.err and "Traceback" not in ran.err, ran.err


def test_a_fault_of_the_command_keeps_its_traceback() -> None:
    """Only the database's circumstances end a command with one line: a fault of the command (a
    column it names that does not exist) keeps its traceback for the report."""
    assert ended_by_the_database(asyncpg.exceptions.LockNotAvailableError("timeout"))
    assert ended_by_the_database(asyncpg.exceptions.AdminShutdownError("shutdown"))
    assert ended_by_the_database(asyncpg.exceptions.TooManyConnectionsError("full"))
    assert ended_by_the_database(asyncpg.exceptions.QueryCanceledError("statement timeout"))
    assert ended_by_the_database(asyncpg.exceptions.DeadlockDetectedError("deadlock"))
    assert not ended_by_the_database(asyncpg.exceptions.UndefinedColumnError("no such column"))
