"""DuckDB over the store: one view per table (the current file list of its Delta version) plus
the views in sql/views/, and `<store>/views.sql` so the plain `duckdb` shell sees the same tables."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa

from storage.schemas import PARTITIONS, SCHEMAS
from storage.tables import open_table, resolve_store

SQL_DIR = Path(__file__).resolve().parents[1] / "sql"

_DUCK_TYPES = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
}


def duck_type(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return duck_type(t.value_type) + "[]"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    return _DUCK_TYPES[t]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def table_view_sql(store: str, name: str, version: int | None = None, where: dict | None = None) -> str:
    """CREATE VIEW for one table at `version` (latest by default); an empty typed view if unwritten.

    `where` (partition column → value) limits the view to the files of those partitions; columns the
    table is not partitioned by are ignored."""
    schema = SCHEMAS[name]
    dt = open_table(store, name, version)
    filters = [(c, "=", str(v)) for c, v in (where or {}).items() if c in PARTITIONS[name]]
    files = [] if dt is None else dt.file_uris(partition_filters=filters or None)
    if not files:
        cols = ", ".join(f"CAST(NULL AS {duck_type(f.type)}) AS {f.name}" for f in schema)
        return f"CREATE OR REPLACE VIEW {name} AS SELECT {cols} WHERE false;"
    hive_types = ", ".join(f"'{c}': {duck_type(schema.field(c).type)}" for c in PARTITIONS[name])
    file_list = ", ".join(_quote(f) for f in sorted(files))
    cols = ", ".join(f"CAST({f.name} AS {duck_type(f.type)}) AS {f.name}" for f in schema)
    return (
        f"CREATE OR REPLACE VIEW {name} AS SELECT {cols} FROM read_parquet([{file_list}], "
        f"hive_partitioning = true, hive_types = {{{hive_types}}}, union_by_name = true);"
    )


def derived_views() -> list[tuple[str, str]]:
    """(name, query) for every file in sql/views/, in name order."""
    return [(p.stem, p.read_text()) for p in sorted((SQL_DIR / "views").glob("*.sql"))]


def catalog_sql(store: str, as_of: dict[str, int] | None = None) -> str:
    as_of = as_of or {}
    lines = [f"-- asymre catalog of {resolve_store(store)}; regenerated after each write", ""]
    lines += [table_view_sql(store, name, as_of.get(name)) for name in SCHEMAS]
    for name, query in derived_views():
        body = query.strip().rstrip(";")
        lines.append(f"CREATE OR REPLACE VIEW {name} AS\n{body};")
    return "\n".join(lines) + "\n"


def connect(store: str | None = None, as_of: dict[str, int] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with every table (optionally some at earlier versions) as a view."""
    con = duckdb.connect()
    con.execute(catalog_sql(resolve_store(store), as_of))
    return con


def connect_partition(store: str, names: list[str], where: dict) -> duckdb.DuckDBPyConnection:
    """A connection with views over only the tables `names`, each limited to the partition `where`
    (e.g. one experiment and round): what a check of one stage's output needs, at a cost that does not
    grow with the store's history."""
    root = resolve_store(store)
    con = duckdb.connect()
    con.execute("\n".join(table_view_sql(root, name, where=where) for name in names))
    return con


def write_views_sql(store: str) -> Path | None:
    """Rewrite `<store>/views.sql` atomically (local stores only)."""
    root = resolve_store(store)
    if "://" in root:
        return None
    target = Path(root) / "views.sql"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".views.", suffix=".sql")
    with os.fdopen(fd, "w") as out:
        out.write(catalog_sql(root))
    os.replace(tmp, target)
    return target


def query(con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None) -> pl.DataFrame:
    """Run `sql` with bound parameters and return the result as a polars frame."""
    return pl.from_arrow(con.sql(sql, params=params or None).to_arrow_table())


def tables_named(sql: str) -> list[str]:
    """The store's tables that `sql` mentions as a word (for --as-of with a bare version)."""
    return [name for name in SCHEMAS if re.search(rf"\b{name}\b", sql)]


_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def bind(query: str, params: dict) -> dict:
    """The subset of `params` that `query` names as $name (DuckDB refuses unused ones)."""
    names = set(_PARAM.findall(query))
    missing = names - set(params)
    if missing:
        raise ValueError(f"query needs parameters {sorted(missing)}")
    return {k: v for k, v in params.items() if k in names}
