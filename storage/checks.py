"""Data checks: every query in sql/checks/ returns the offending rows; zero rows everywhere = pass.

A check is about one partition: `run_checks` binds $experiment and $round and gives the queries views
of only the tables they name, each holding only that partition's files (so its cost does not grow with
the store's history). A check that wants other rounds or the views of sql/views/ must get its own
connection (`con=`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl

from storage.catalog import SQL_DIR, bind, connect_partition, query, tables_named

_STAGE = re.compile(r"^--\s*stage:\s*(\S+)", re.MULTILINE)


@dataclass(frozen=True)
class Check:
    name: str
    stage: str  # the stage whose output it checks, or "*" for every stage
    query: str


class CheckFailed(RuntimeError):
    """A data check returned rows; the message lists them."""

    def __init__(self, failures: dict[str, pl.DataFrame]):
        self.failures = failures
        parts = []
        for name, rows in failures.items():
            with pl.Config(tbl_rows=10, tbl_cols=10, fmt_str_lengths=40):
                parts.append(f"check {name}: {rows.height} bad rows\n{rows.head(10)}")
        super().__init__("data checks failed:\n" + "\n".join(parts))


def load_checks(folder: Path = SQL_DIR / "checks") -> list[Check]:
    checks = []
    for path in sorted(folder.glob("*.sql")):
        text = path.read_text()
        match = _STAGE.search(text)
        checks.append(Check(path.stem, match.group(1) if match else "*", text))
    return checks


def run_checks(
    store: str,
    *,
    experiment: str,
    round: int,
    stage: str | None = None,
    reward_range: tuple[float, float] = (0.0, 1.0),
    con: duckdb.DuckDBPyConnection | None = None,
) -> dict[str, pl.DataFrame]:
    """Run the checks that apply to `stage` (all when None) on one partition; raise CheckFailed on bad rows."""
    checks = [c for c in load_checks() if stage is None or c.stage in ("*", stage)]
    if not checks:
        return {}
    if con is None:
        named = sorted({table for check in checks for table in tables_named(check.query)})
        con = connect_partition(store, named, {"experiment": experiment, "round": round})
    params = {"experiment": experiment, "round": round, "reward_min": reward_range[0], "reward_max": reward_range[1]}
    failures = {}
    for check in checks:
        rows = query(con, check.query, bind(check.query, params))
        if rows.height:
            failures[check.name] = rows
    if failures:
        raise CheckFailed(failures)
    return failures
