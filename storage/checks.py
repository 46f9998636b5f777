"""Data checks of one (experiment, round) partition: no two rows share their table's ROW_KEYS, and every
query in sql/checks/ returns the offending rows. Zero rows everywhere = pass; otherwise CheckFailed.

The queries get views of only the tables they name, each holding only the checked partition's files (so
a check costs the same however long the store's history); $experiment and $round are bound. A check that
wants other rounds or the views of sql/views/ must be given its own connection (`con=`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl

from storage.catalog import connect_partition, tables_named
from storage.schemas import PARTITIONS, ROW_KEYS, SCHEMAS
from storage.sql import SQL_DIR, query
from storage.tables import read as read_table


@dataclass(frozen=True)
class Check:
    name: str
    query: str
    tables: frozenset[str]  # the tables it reads: it runs once all of them are written


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
        checks.append(Check(path.stem, text, frozenset(tables_named(text))))
    return checks


def duplicate_keys(store: str, table: str, *, experiment: str, round: int) -> pl.DataFrame:
    """Key values of `table` that more than one row of the partition holds, with their count (`copies`).

    Of a table not partitioned by experiment and round (prompts), every partition is read."""
    keys = ROW_KEYS[table]
    where = {col: value for col, value in (("experiment", experiment), ("round", round)) if col in PARTITIONS[table]}
    rows = read_table(store, table, columns=keys, **where)
    return rows.group_by(keys).agg(pl.len().alias("copies")).filter(pl.col("copies") > 1).sort(keys)


def run_checks(
    store: str,
    *,
    experiment: str,
    round: int,
    tables: Iterable[str] | None = None,
    available: Iterable[str] | None = None,
    reward_range: tuple[float, float] = (0.0, 1.0),
    con: duckdb.DuckDBPyConnection | None = None,
) -> dict[str, pl.DataFrame]:
    """Check the partition (experiment, round) of `tables`, the tables a stage just wrote (None: every
    check of every table); raise CheckFailed listing the bad rows, else return {}.

    Each of `tables` gets the duplicate-key check (`duplicate_<table>`). A query of sql/checks/ runs when it
    names one of `tables` and every table it names is in `tables` or `available` (the tables upstream
    stages wrote): rollouts_without_reward runs after rewards, not after rollouts."""
    written = list(SCHEMAS) if tables is None else list(tables)
    unknown = sorted(set(written) - set(SCHEMAS))
    if unknown:
        raise KeyError(f"run_checks: unknown tables {unknown}; tables: {', '.join(SCHEMAS)}")
    readable = set(written) | set(available or ())
    checks = [c for c in load_checks() if tables is None or (c.tables & set(written) and c.tables <= readable)]
    failures = {}
    for table in written:
        if table in ROW_KEYS:
            rows = duplicate_keys(store, table, experiment=experiment, round=round)
            if rows.height:
                failures[f"duplicate_{table}"] = rows
    if checks:
        if con is None:
            named = sorted(set().union(*(c.tables for c in checks)))
            con = connect_partition(store, named, {"experiment": experiment, "round": round})
        params = {
            "experiment": experiment,
            "round": round,
            "reward_min": reward_range[0],
            "reward_max": reward_range[1],
        }
        for check in checks:
            rows = query(con, check.query, params)
            if rows.height:
                failures[check.name] = rows
    if failures:
        raise CheckFailed(failures)
    return failures
