"""The one way this project runs SQL with DuckDB: `$name` parameters bound (never interpolated), exactly the
ones a query uses; `run_file` runs a file of sql/ over in-memory frames."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import polars as pl

SQL_DIR = Path(__file__).resolve().parents[1] / "sql"

_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_NOT_CODE = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", re.DOTALL)


def code_only(sql: str) -> str:
    """`sql` with its comments, string literals and quoted identifiers blanked out: what is left is what
    names tables and parameters (a `$round` or `rewards` in a comment does not count)."""
    return _NOT_CODE.sub(" ", sql)


def query(con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None) -> pl.DataFrame:
    """Run `sql` on `con` with the $names it uses bound from `params` (DuckDB refuses unused ones, so the
    rest of `params` is left out) and return the result as a polars frame."""
    params = params or {}
    used = set(_PARAM.findall(code_only(sql)))
    missing = sorted(used - set(params))
    if missing:
        raise ValueError(f"the query uses {', '.join('$' + m for m in missing)}: pass a value for each in params")
    result = con.sql(sql, params={name: params[name] for name in used} or None)
    return pl.from_arrow(result.to_arrow_table())


def run_file(name: str, frames: dict[str, pl.DataFrame], params: dict | None = None) -> pl.DataFrame:
    """Run sql/<name> in a fresh in-memory DuckDB, each frame visible as a table under its key."""
    sql = (SQL_DIR / name).read_text()
    con = duckdb.connect()
    try:
        for table, frame in frames.items():
            con.register(table, frame.to_arrow())
        return query(con, sql, params)
    finally:
        con.close()
