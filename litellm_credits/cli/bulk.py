"""``allocate --from-csv``: credit the accounts a CSV file lists, all rows or none, or row by row.

Every row is checked before anything is written (amount, category, priority, expiry, that the
account exists and takes credits itself), and is credited with its own reason, category, priority
and expiry in either mode (--all-or-nothing: every row in one transaction, one row per account).
Re-running a file credits nothing twice: each account's credit is keyed by the file's SHA-256 and
the account (and the line, for an account listed twice), the same keys in both modes, so a per-row
run can finish what an interrupted one started.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, cast

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from ..bulk_credits import BulkItem
from ..errors import CreditsError
from ..money import AmountError, format_credits, micro_ceil, parse_credits
from ..records import GrantTerms
from .output import CliError, err, out, plural, print_json, show_rows
from .session import Session, run, session

REQUIRED = ("user_id", "amount")
OPTIONAL = ("reason", "description", "category", "priority", "expires_at")
SQL_KNOWN = "SELECT subject_id, parent_id FROM credits.credit_accounts WHERE subject_id = ANY($1::text[])"
# the rows an earlier run of the file credited already (found by the ledger's unique key)
SQL_DONE = """
SELECT t.idempotency_key FROM unnest($1::text[], $2::text[]) AS k(subject_id, idempotency_key)
JOIN credits.credit_transactions t USING (subject_id, idempotency_key)
"""


@dataclass(frozen=True)
class RowDefaults:
    """What an empty or missing cell means: the command's own options."""

    reason: str | None
    category: str | None
    priority: int | None
    expires_at: datetime | None


@dataclass
class Row:
    line: int
    user_id: str
    amount: int
    reason: str | None
    terms: GrantTerms
    key: str = ""


@dataclass
class Outcome:
    credited: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)


def read_rows(
    path: Path, defaults: RowDefaults, max_micro: int
) -> tuple[list[Row], list[dict[str, Any]], str]:
    """The file's valid rows, its invalid ones (line, user_id, error), and its SHA-256."""
    try:
        data = path.read_bytes()
        text = data.decode("utf-8-sig")
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CliError(f"{path} is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in reader.fieldnames or []]
    if not header:
        raise CliError(f"{path} is empty; its first line should be: user_id,amount[,reason,...]")
    reader.fieldnames = header
    missing = [c for c in REQUIRED if c not in header]
    unknown = [c for c in header if c not in REQUIRED + OPTIONAL]
    if missing or unknown:
        raise CliError(
            f"{path} line 1: "
            + (f"missing column {', '.join(missing)}; " if missing else "")
            + (f"unknown column {', '.join(unknown)}; " if unknown else "")
            + f"columns: {', '.join(REQUIRED + OPTIONAL)}"
        )
    rows: list[Row] = []
    bad: list[dict[str, Any]] = []
    for record in reader:
        line = reader.line_num
        cells = {k: (v or "").strip() for k, v in record.items() if k is not None}
        user = cells.get("user_id", "")
        try:
            if None in record:
                raise ValueError("more cells than columns")
            rows.append(_row(line, cells, defaults, max_micro))
        except (ValueError, AmountError) as e:
            bad.append({"line": line, "user_id": user, "error": str(e)})
    if not rows and not bad:
        raise CliError(f"{path} has no rows below its header")
    return rows, bad, hashlib.sha256(data).hexdigest()


def _row(line: int, cells: dict[str, str], defaults: RowDefaults, max_micro: int) -> Row:
    user = cells.get("user_id", "")
    if not user:
        raise ValueError("no user_id")
    if not cells.get("amount"):
        raise ValueError("no amount")
    amount = parse_credits(cells["amount"])
    if amount <= 0:
        raise ValueError(f"amount {cells['amount']} is not positive")
    if amount > max_micro:
        raise ValueError(f"amount {cells['amount']} is above the maximum of {format_credits(max_micro)}")
    category = cells.get("category") or defaults.category
    if category not in (None, "paid", "promotional"):
        raise ValueError(f"category {category!r} is not paid or promotional")
    priority = defaults.priority
    if cells.get("priority"):
        if not cells["priority"].isdigit() or int(cells["priority"]) > 1000:
            raise ValueError(f"priority {cells['priority']!r} is not a whole number from 0 to 1000")
        priority = int(cells["priority"])
    expires = defaults.expires_at
    if cells.get("expires_at"):
        try:
            expires = datetime.fromisoformat(cells["expires_at"].replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"expires_at {cells['expires_at']!r} is not an ISO 8601 time") from None
        if expires.tzinfo is None:
            raise ValueError(f"expires_at {cells['expires_at']!r} has no UTC offset (add Z or +00:00)")
    reason = cells.get("reason") or cells.get("description") or defaults.reason
    terms = GrantTerms(cast(Literal["paid", "promotional"] | None, category), priority, expires)
    return Row(line, user, amount, reason, terms)


async def _check_accounts(s: Session, rows: list[Row]) -> list[dict[str, Any]]:
    """Rows whose account does not exist, or spends its team's credits (so takes none)."""
    found = {
        r["subject_id"]: r["parent_id"] for r in await s.pool.fetch(SQL_KNOWN, [r.user_id for r in rows])
    }
    bad = []
    for row in rows:
        if row.user_id not in found:
            bad.append(
                {"line": row.line, "user_id": row.user_id, "error": f"no credit account {row.user_id!r}"}
            )
        elif found[row.user_id] is not None:
            bad.append(
                {
                    "line": row.line,
                    "user_id": row.user_id,
                    "error": f"spends the credits of its team {found[row.user_id]!r}; allocate to the team",
                }
            )
    return bad


def _credited(row: Row, tx: Any, done: set[str]) -> dict[str, Any]:
    return {
        "line": row.line,
        "user_id": row.user_id,
        "amount": format_credits(tx.amount),
        "balance": format_credits(tx.balance_after),
        "transaction_id": tx.id,
        "status": "already credited" if row.key in done else "credited",
    }


async def _all_or_nothing(s: Session, rows: list[Row], prefix: str, done: set[str], result: Outcome) -> None:
    first: dict[str, int] = {}
    for row in rows:
        if row.user_id in first:
            result.failed.append(
                {
                    "line": row.line,
                    "user_id": row.user_id,
                    "error": f"also on line {first[row.user_id]}: one row per account (or use --per-row)",
                }
            )
        first.setdefault(row.user_id, row.line)
    if result.failed:
        return
    if done and len(done) < len(rows):
        raise CliError(
            f"{len(done)} of {len(rows)} rows were credited by an earlier --per-row run of this file: "
            "finish it with --per-row"
        )
    # each row with its own reason and terms; the ledger keys row r's credit f"{prefix}:{r.user_id}"
    items = {r.user_id: BulkItem(r.amount, r.reason, r.terms) for r in rows}
    with _progress() as progress:
        progress.add_task("crediting in one transaction", total=None)
        txs = await s.ledger.credit_each(items, idempotency_key=prefix)
    by_user = {t.subject_id: t for t in txs}
    result.credited = [_credited(r, by_user[r.user_id], done) for r in rows]


async def _per_row(s: Session, rows: list[Row], done: set[str], result: Outcome) -> None:
    with _progress() as progress:
        task = progress.add_task("crediting", total=len(rows))
        for row in rows:
            try:
                tx = await s.ledger.credit(
                    row.user_id, row.amount, description=row.reason, idempotency_key=row.key, terms=row.terms
                )
                result.credited.append(_credited(row, tx, done))
            except (CreditsError, AmountError) as e:
                result.failed.append({"line": row.line, "user_id": row.user_id, "error": str(e)})
            progress.advance(task)


def _progress() -> Progress:
    console = err()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def allocate_csv(
    path: Path, defaults: RowDefaults, all_or_nothing: bool, key: str | None, as_json: bool
) -> int:
    """Credit the file's rows; 0 when every row was credited, else 1 (the failures listed)."""

    async def work() -> Outcome:
        async with session() as s:
            rows, bad, digest = read_rows(path, defaults, micro_ceil(s.settings.credits.max_amount))
            prefix = key or f"csv:{digest[:32]}"
            repeats = Counter(r.user_id for r in rows)
            for row in rows:
                row.key = f"{prefix}:{row.user_id}" + (f":{row.line}" if repeats[row.user_id] > 1 else "")
            result = Outcome(failed=bad + (await _check_accounts(s, rows) if rows else []))
            found = await s.pool.fetch(SQL_DONE, [r.user_id for r in rows], [r.key for r in rows])
            done = {r["idempotency_key"] for r in found}
            if all_or_nothing:
                if not result.failed:
                    await _all_or_nothing(s, rows, prefix, done, result)
            else:
                failed = {f["line"] for f in result.failed}
                await _per_row(s, [r for r in rows if r.line not in failed], done, result)
            result.failed.sort(key=lambda f: f["line"])
            return result

    result = run(work)
    credited = result.credited
    total = format_credits(sum(parse_credits(c["amount"]) for c in credited))
    if as_json:
        print_json({"count": len(credited), "total": total, "items": credited, "failed": result.failed})
    else:
        show_rows(
            credited,
            [
                (k, k.replace("_", " "))
                for k in ("line", "user_id", "amount", "balance", "transaction_id", "status")
            ],
            empty="No rows credited.",
            right=("amount", "balance"),
        )
        if result.failed:
            show_rows(result.failed, [("line", "line"), ("user_id", "user_id"), ("error", "error")], empty="")
        nothing = " (nothing was credited)" if all_or_nothing and result.failed else ""
        earlier = sum(c["status"] != "credited" for c in credited)
        before = f" ({earlier} by an earlier run of this file)" if earlier else ""
        rows = plural(len(credited), "row")
        out().print(f"credited {rows}{before}, {total} credits; {len(result.failed)} failed{nothing}")
    return 1 if result.failed else 0


__all__ = ["RowDefaults", "allocate_csv", "read_rows"]
