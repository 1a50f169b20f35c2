"""How commands print: rich tables for people, exact JSON (``--json``) for scripts, one-line errors.

Colour only reaches a terminal (rich checks, and honours NO_COLOR); piped or captured output is
plain text.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (amounts as decimal strings).")]


class CliError(Exception):
    """Bad input or a refused operation: printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _console(stderr: bool = False) -> Console:
    # a console per call: it writes to the sys.stdout/stderr of the moment (tests capture them)
    console = Console(stderr=stderr, highlight=False, soft_wrap=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 200  # piped tables keep whole ids and amounts
    return console


def out() -> Console:
    return _console()


def err() -> Console:
    return _console(stderr=True)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def fail(message: str, code: int = 2) -> NoReturn:
    raise CliError(message, code)


def table(
    rows: Sequence[Mapping[str, Any]],
    columns: Iterable[tuple[str, str]],
    *,
    title: str | None = None,
    right: Iterable[str] = (),
) -> Table:
    """``rows`` as a table of ``columns`` (key, heading); ``right``: keys aligned right (amounts)."""
    aligned = set(right)
    t = Table(title=title, title_justify="left", header_style="bold")
    cols = list(columns)
    for key, heading in cols:
        t.add_column(heading, justify="right" if key in aligned else "left", overflow="fold")
    for row in rows:
        t.add_row(*(cell(row.get(key)) for key, _ in cols))
    return t


def fields(data: Mapping[str, Any], *, title: str | None = None) -> Table:
    """One record as a two-column table: field, value."""
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for key, value in data.items():
        t.add_row(key, cell(value))
    return t


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


# an ISO 8601 time as to_json() writes it: shown to the second in tables (JSON keeps it whole)
_ISO_TIME = re.compile(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(?:\.\d+)?(\+00:00|Z)")


def cell(value: Any) -> str:
    if isinstance(value, str) and (at := _ISO_TIME.fullmatch(value)):
        return f"{at[1]} {at[2]}Z"
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={cell(v)}" for k, v in value.items()) or "-"
    return str(value)


def show_rows(
    rows: Sequence[Mapping[str, Any]],
    columns: Iterable[tuple[str, str]],
    *,
    empty: str,
    right: Iterable[str] = (),
    title: str | None = None,
) -> None:
    """A table of ``rows``, or ``empty`` (a sentence such as "No grants.") when there are none."""
    if not rows:
        out().print(empty)
    else:
        out().print(table(rows, columns, right=right, title=title))


__all__ = [
    "CliError",
    "JsonOption",
    "cell",
    "err",
    "fail",
    "fields",
    "out",
    "plural",
    "print_json",
    "show_rows",
    "table",
]
