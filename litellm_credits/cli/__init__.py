"""``litellm-credits``: operate the ledger from a shell.

Every read command prints a table, or JSON with ``--json``. With no CREDITS_DATABASE_URL the
database is an embedded PostgreSQL under CREDITS_DATA_DIR, by default the ``.credits-data`` of
the checkout it runs in (``make serve``'s), else the user data directory; every command says
which on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

from . import accounts, credits, ops
from .serve import serve
from .session import embedded_note

app = typer.Typer(
    name="litellm-credits",
    help="Operate the litellm-credits ledger: accounts, credits, checks, and the proxy.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(accounts.app, name="accounts")
app.command("allocate")(credits.allocate)
app.command("balance")(accounts.balance)
app.command("grants")(credits.grants)
app.command("alerts")(credits.alerts)
app.command("topups")(credits.topups)
app.command("verify")(ops.verify)
app.command("sweep")(ops.sweep)
app.command("migrate")(ops.migrate)
app.command("rotate-keys")(ops.rotate_keys)
app.add_typer(ops.openrouter_app, name="openrouter")
app.command("dsn")(ops.dsn)
app.command("stop-db")(ops.stop_db)
app.command("serve")(serve)

# options that once took several values at once (``--balance-below 5 1``): each value gets
# its own option, as click wants (``--balance-below 5 --balance-below 1``)
_MANY_VALUED = ("--balance-below", "--cap-percent")


def _spread(argv: Sequence[str]) -> list[str]:
    spread: list[str] = []
    option = None
    for arg in argv:
        if arg in _MANY_VALUED:
            option = arg
            spread.append(arg)
            continue
        if option and not arg.startswith("-") and spread[-1] != option:
            spread.append(option)
        elif arg.startswith("-"):
            option = None
        spread.append(arg)
    return spread


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: this process's); returns the exit code."""
    args = _spread(sys.argv[1:] if argv is None else argv)
    try:
        app(args=args, prog_name="litellm-credits", standalone_mode=True)
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


_embedded_note = embedded_note  # the name tests and older callers know

__all__ = ["app", "main"]
