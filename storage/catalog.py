"""DuckDB over the store: one view per table (the current file list of its Delta version) plus
the views in sql/views/, and `<store>/views.sql` so the plain `duckdb` shell sees the same tables.

A store on S3 is read through the Arrow datasets of its Delta tables (pyarrow's S3 filesystem), registered with
DuckDB: DuckDB itself would need its httpfs extension, which it cannot download everywhere."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa

from storage import object_store, tables
from storage.schemas import PARTITIONS, SCHEMAS
from storage.sql import SQL_DIR, code_only, query

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


def table_view_sql(
    store: str,
    name: str,
    version: int | None = None,
    where: dict | None = None,
    relative_to: str | None = None,
    must_exist: bool = True,
) -> str:
    """CREATE VIEW for one table at `version` (latest by default); an empty typed view if unwritten.

    `where` (partition column → a value or a list of values) limits the view to the files of those
    partitions; columns the table is not partitioned by are ignored. Raises TableDamaged or DataFileMissing
    (DuckDB reads the files' schemas here already, and would name only a path) unless not `must_exist`.
    `relative_to`: name the files relative to this folder (views.sql, which DuckDB resolves through its
    file_search_path)."""
    schema = SCHEMAS[name]
    files = tables.files(store, name, version=version, where=where, must_exist=must_exist)
    if relative_to is not None:
        files = [os.path.relpath(f.removeprefix("file://"), relative_to) for f in files]
    if not files:
        return _empty_view_sql(name)
    hive_types = ", ".join(f"'{c}': {duck_type(schema.field(c).type)}" for c in PARTITIONS[name])
    file_list = ", ".join(_quote(f) for f in sorted(files))
    return (
        f"CREATE OR REPLACE VIEW {name} AS SELECT {_typed_columns(name)} FROM read_parquet([{file_list}], "
        f"hive_partitioning = true, hive_types = {{{hive_types}}}, union_by_name = true);"
    )


def _typed_columns(name: str) -> str:
    return ", ".join(f"CAST({f.name} AS {duck_type(f.type)}) AS {f.name}" for f in SCHEMAS[name])


def _empty_view_sql(name: str) -> str:
    cols = ", ".join(f"CAST(NULL AS {duck_type(f.type)}) AS {f.name}" for f in SCHEMAS[name])
    return f"CREATE OR REPLACE VIEW {name} AS SELECT {cols} WHERE false;"


def register_view(con: duckdb.DuckDBPyConnection, name: str, dataset) -> None:
    """The view of one table over its Arrow dataset (a store on S3), registered with `con`; an empty typed view
    if there is none (the table was never written)."""
    if dataset is None:
        con.execute(_empty_view_sql(name))
        return
    con.register(f"__asymre_{name}", dataset)
    con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT {_typed_columns(name)} FROM __asymre_{name};")


def unreadable_view_sql(name: str, message: str) -> str:
    """CREATE VIEW for a table that cannot be read: it has the table's columns, so the views over it are made,
    and a query that reads it fails with `message` (one line) while queries of the other tables work."""
    cols = ", ".join(f"CAST(NULL AS {duck_type(f.type)}) AS {f.name}" for f in SCHEMAS[name])
    return f"CREATE OR REPLACE VIEW {name} AS SELECT {cols} FROM range(1) WHERE error({_quote(message)}) IS NULL;"


def derived_views() -> list[tuple[str, str]]:
    """(name, query) for every file in sql/views/, in name order."""
    return [(p.stem, p.read_text()) for p in sorted((SQL_DIR / "views").glob("*.sql"))]


# What the duckdb shell needs to read views.sql of a store on S3 (the catalog here reads it without httpfs).
S3_HEADER = """-- This store is on S3: its views read s3:// files, which the duckdb shell reads with its httpfs extension and
-- an S3 secret. Before `.read views.sql` (or with `duckdb -init`), run in the shell:
--   INSTALL httpfs; LOAD httpfs;
--   CREATE SECRET (TYPE s3, PROVIDER credential_chain, CHAIN 'env');  -- AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
--                                                                     -- AWS_REGION from the environment
-- and for an S3-compatible server (AWS_ENDPOINT_URL) add to the secret: ENDPOINT 'host:port', URL_STYLE 'path'
-- and, for plain http, USE_SSL false. `asymre sql` needs none of this."""


def catalog_sql(store: str, as_of: dict[str, int] | None = None, portable: bool = False) -> str:
    """The views of every table and of sql/views/. `portable` (views.sql): file paths relative to the store,
    found through DuckDB's file_search_path from the store's folder as written, from inside it, or from its
    parent, so the file keeps working when the store is copied or moved; for a store on S3, the s3:// URIs of
    the files, with a header that says what the duckdb shell needs to read them."""
    as_of = as_of or {}
    root = tables.resolve_store(store)
    remote = object_store.is_remote(root)
    lines = [f"-- asymre catalog of {root}; regenerated after each stage", ""]
    if portable and remote:
        lines += [S3_HEADER, ""]
    elif portable:
        search = ",".join([root, ".", os.path.basename(root)])
        lines += [f"SET file_search_path = {_quote(search)};", ""]
    relative_to = root if portable and not remote else None
    there = tables.folders(root)  # on S3 one listing spares opening the tables never written
    for name in SCHEMAS:
        if there is not None and name not in there and name not in as_of:
            lines.append(_empty_view_sql(name))
            continue
        try:
            # on S3 a listing per table after every stage would cost more than the file it checks
            lines.append(table_view_sql(store, name, as_of.get(name), relative_to=relative_to, must_exist=not remote))
        except (tables.TableDamaged, tables.DataFileMissing) as err:
            lines.append(unreadable_view_sql(name, str(err)))
    lines += _derived_view_sql()
    return "\n".join(lines) + "\n"


def _derived_view_sql() -> list[str]:
    return [f"CREATE OR REPLACE VIEW {name} AS\n{sql.strip().rstrip(';')};" for name, sql in derived_views()]


def connect(store: str | None = None, as_of: dict[str, int] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with every table (optionally some at earlier versions) as a view, that
    reads only the store's tables (see `read_only`)."""
    root = tables.resolve_store(store)
    con = duckdb.connect()
    if object_store.is_remote(root):
        as_of = as_of or {}
        there = tables.folders(root)  # one listing spares opening the tables never written
        for name in SCHEMAS:
            try:
                written = name in there or name in as_of
                register_view(con, name, tables.dataset(root, name, version=as_of.get(name)) if written else None)
            except tables.TableDamaged as err:
                con.execute(unreadable_view_sql(name, str(err)))
        con.execute("\n".join(_derived_view_sql()))
    else:
        con.execute(catalog_sql(root, as_of))
    return read_only(con, root)


def read_only(con: duckdb.DuckDBPyConnection, root: str) -> duckdb.DuckDBPyConnection:
    """`con`, from now on unable to touch any file but the store's table files, and only to read them: no
    COPY … TO, no ATTACH, no reading other files, no extensions loaded, and the settings locked so that a
    query cannot undo this. What it creates in memory (tables, views) dies with the connection. Results that
    are to be written go through the caller (`asymre sql -o` writes them itself). A store on S3 is read through
    the Arrow datasets registered with `con`, which need no file access of DuckDB's own."""
    if not object_store.is_remote(root):
        con.execute(f"SET allowed_directories = [{_quote(root.rstrip('/') + '/tables/')}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def connect_partition(store: str, names: list[str], where: dict) -> duckdb.DuckDBPyConnection:
    """A connection with views over only the tables `names`, each limited to the partitions `where` names
    (partition column → a value or a list of values, e.g. one experiment and some rounds): what a check of
    one stage's output or a summary of one experiment needs, at a cost that does not grow with the rest of
    the store."""
    root = tables.resolve_store(store)
    con = duckdb.connect()
    if object_store.is_remote(root):
        for name in names:
            register_view(con, name, tables.dataset(root, name, where=where))
    else:
        con.execute("\n".join(table_view_sql(root, name, where=where) for name in names))
    return read_only(con, root)


def write_views_sql(store: str) -> Path | str:
    """Rewrite `<store>/views.sql` atomically: the same views as `connect`, for the plain `duckdb` shell (on S3:
    one object, with s3:// file URIs and a header saying what the shell needs). Writes never do it themselves;
    a flow calls this once after each stage's commits. Returns the file's path or URI."""
    root = tables.resolve_store(store)
    if object_store.is_remote(root):
        target = f"{root}/views.sql"
        object_store.put_bytes(target, catalog_sql(root, portable=True).encode())
        return target
    target = Path(root) / "views.sql"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".views.", suffix=".sql")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(catalog_sql(root, portable=True))
        os.replace(tmp, target)
    except BaseException:  # a full disk, a damaged table: no half-written temp file left behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def tables_named(sql: str) -> list[str]:
    """The store's tables that `sql` mentions as a word outside comments and string literals."""
    code = code_only(sql)
    return [name for name in SCHEMAS if re.search(rf"\b{name}\b", code)]


def round_summaries(store: str, experiment: str, rounds: list[int] | None = None) -> pl.DataFrame:
    """sql/views/round_summary.sql for one experiment (optionally only `rounds`), ordered by round: per
    round k its samples' reward, the training on them (steps, p, p̃) and the test accuracy of checkpoint
    k + 1. The views hold only this experiment's partitions (and with `rounds`, only rounds k and k + 1), so
    the cost does not grow with other experiments."""
    sql = (SQL_DIR / "views" / "round_summary.sql").read_text()
    where: dict = {"experiment": experiment}
    if rounds is not None:
        where["round"] = sorted({k for r in rounds for k in (r, r + 1)})  # evals of checkpoint k + 1: round k + 1
    con = connect_partition(store, tables_named(sql), where)
    try:
        summary = query(con, sql)
    finally:
        con.close()
    if rounds is not None:
        summary = summary.filter(pl.col("round").is_in(list(rounds)))
    return summary.sort("round")
