"""Versioned tables: one Delta Lake table per schema under `<store>/tables/<name>`.

A stage's output for one (experiment, round) is written as one atomic commit that replaces that
partition; readers see the previous version until the commit lands, and every version stays readable.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from storage.schemas import PARTITIONS, SCHEMAS


class SchemaError(ValueError):
    """A frame does not match its table's schema; nothing was written."""


def resolve_store(store: str | os.PathLike | None = None) -> str:
    """The store root: the argument, else $ASYMRE_STORE, else ./store (absolute for local paths)."""
    root = str(store or os.environ.get("ASYMRE_STORE") or "./store")
    return root if "://" in root else str(Path(root).expanduser().resolve())


def table_uri(store: str, name: str) -> str:
    if name not in SCHEMAS:
        raise KeyError(f"unknown table {name!r}; tables: {', '.join(SCHEMAS)}")
    return f"{resolve_store(store)}/tables/{name}"


def open_table(store: str, name: str, version: int | None = None) -> DeltaTable | None:
    """The Delta table (at `version`, default latest), or None when it was never written.

    The handle of a local table's latest version is shared within the process, also when `version` names
    that version (a flow reads its inputs at the versions just written: no log replay then), and moves on
    at the next open of the latest version: read what you need from it right away (`read` and `files` do,
    and make sure a pinned read was not moved meanwhile)."""
    uri = table_uri(store, name)
    if version is None:
        return _latest(uri)
    held = _held(uri, version)
    if held is not None:
        return held
    try:
        return DeltaTable(uri, version=version)
    except TableNotFoundError:
        return None
    except Exception as err:  # delta-rs reports a missing version as a generic error
        if DeltaTable.is_deltatable(uri):
            raise ValueError(f"table {name} has no version {version} (latest is {DeltaTable(uri).version()})") from err
        raise


# Latest-version handles of local tables, kept per process and brought up to date with
# update_incremental (reads only the log entries added since), instead of replaying the whole log on
# every open: a round opens its tables some hundred times (reads, checks, views.sql, lineage). A handle
# is dropped when the commit file of the version it holds is gone or another file (the table was
# deleted and made again at the same path).
_LATEST: dict[str, tuple[DeltaTable, int, tuple[int, int]]] = {}  # uri → (handle, version, stamp of its commit)
_LATEST_LOCK = threading.Lock()


def _commit_stamp(uri: str, version: int) -> tuple[int, int] | None:
    try:
        st = os.stat(Path(uri) / "_delta_log" / f"{version:020d}.json")
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _latest(uri: str) -> DeltaTable | None:
    if "://" in uri:  # object stores: no cheap way to tell a remade table apart; open afresh
        try:
            return DeltaTable(uri)
        except TableNotFoundError:
            return None
    entry = _latest_entry(uri)
    return None if entry is None else entry[0]


def _latest_entry(uri: str) -> tuple[DeltaTable, int, tuple[int, int] | None] | None:
    """(handle, version, stamp of that version's commit file) of a local table, brought up to date and
    held for the next call; None if unwritten. A version without a commit file (log cleaned up) has no
    stamp, so its handle is not held."""
    with _LATEST_LOCK:
        held = _LATEST.pop(uri, None)
        dt = None
        if held is not None and _commit_stamp(uri, held[1]) == held[2]:
            dt = held[0]
            try:
                dt.update_incremental()
            except Exception:  # the log moved under the handle (e.g. cleaned up): open afresh
                dt = None
        if dt is None:
            try:
                dt = DeltaTable(uri)
            except TableNotFoundError:
                return None
        version = dt.version()
        stamp = _commit_stamp(uri, version)
        if stamp is not None:
            _LATEST[uri] = (dt, version, stamp)
        return dt, version, stamp


def _held(uri: str, version: int) -> DeltaTable | None:
    """The held latest handle of a local table if it is at `version` of the table as it is on disk now."""
    with _LATEST_LOCK:
        held = _LATEST.get(uri)
    if held is None or held[1] != version or _commit_stamp(uri, version) != held[2]:
        return None
    return held[0]


def snapshot_id(store: str, name: str) -> tuple[int, int, int] | None:
    """(version, and the identity of its commit file) of a local table's latest version, to key caches
    of what was read from it; None for object stores and tables not written yet (nothing to cache)."""
    uri = table_uri(store, name)
    entry = None if "://" in uri else _latest_entry(uri)
    if entry is None or entry[2] is None:
        return None
    return entry[1], *entry[2]


def _logical(t: pa.DataType) -> pa.DataType:
    """Collapse physical variants (large/view strings and lists) that polars and Arrow produce."""
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_list(t) or pa.types.is_list_view(t) or pa.types.is_list(t):
        return pa.list_(_logical(t.value_type))
    return t


def conform(frame: pl.DataFrame | pa.Table, name: str) -> pa.Table:
    """The frame as an Arrow table in exactly `name`'s schema, or SchemaError naming the column."""
    schema = SCHEMAS[name]
    table = frame.to_arrow() if isinstance(frame, pl.DataFrame) else frame
    have = set(table.column_names)
    missing = [f for f in schema if f.name not in have]
    if missing:
        f = missing[0]
        raise SchemaError(f"table {name}: missing column {f.name!r} (expected {f.type})")
    extra = sorted(have - set(schema.names))
    if extra:
        raise SchemaError(f"table {name}: unexpected column {extra[0]!r}; its columns are {', '.join(schema.names)}")
    columns = []
    for f in schema:
        col = table.column(f.name)
        if pa.types.is_null(col.type) and f.nullable:
            col = pa.nulls(len(col), f.type)
        elif _logical(col.type) != _logical(f.type) and not _timestamp_match(col.type, f.type):
            raise SchemaError(f"table {name}: column {f.name!r} has type {col.type}, expected {f.type}")
        if not f.nullable and col.null_count:
            raise SchemaError(f"table {name}: column {f.name!r} holds {col.null_count} nulls but may not")
        columns.append(col.cast(f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _timestamp_match(have: pa.DataType, want: pa.DataType) -> bool:
    return pa.types.is_timestamp(have) and pa.types.is_timestamp(want)


def _sql_literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(int(value))


def _commit(uri: str, data: pa.Table, name: str, mode: str, predicate: str | None, metadata: dict) -> int:
    """Write one commit and return the version it landed as (not a concurrent writer's later one)."""
    commit_id = uuid.uuid4().hex
    metadata = {**metadata, "asymre.commit_id": commit_id}
    # Concurrent writers to other partitions can race on the log; delta-rs detects it and we retry.
    for attempt in range(20):
        try:
            write_deltalake(
                _latest(uri) or uri,  # the held handle spares delta-rs a replay of the log
                data,
                partition_by=PARTITIONS[name],
                mode=mode,
                predicate=predicate,
                commit_properties=CommitProperties(custom_metadata=metadata, max_commit_retries=50),
            )
            break
        except (CommitFailedError, OSError) as err:
            if attempt == 19 or ("conflict" not in str(err).lower() and "exists" not in str(err).lower()):
                raise
            time.sleep(0.05 + random.random() * 0.2 * (attempt + 1))
    return _find_commit(uri, commit_id, name)


def _find_commit(uri: str, commit_id: str, name: str) -> int:
    """The version whose commit carries `commit_id`: other writers may have committed after ours, and
    history() numbers entries from its own snapshot, so read the log's commit files themselves."""
    latest = _latest(uri).version()
    if "://" in uri:  # object stores: history is the only portable reader
        for commit in DeltaTable(uri).history(limit=256):
            if commit.get("asymre.commit_id") == commit_id:
                return int(commit["version"])
    else:
        for version in range(latest, max(-1, latest - 256), -1):
            log = Path(uri) / "_delta_log" / f"{version:020d}.json"
            if commit_id in log.read_text():
                return version
    raise RuntimeError(f"table {name}: commit {commit_id} not found in the last 256 versions")


def write_partition(
    store: str,
    name: str,
    frame: pl.DataFrame | pa.Table,
    *,
    partition: dict[str, Any],
    stage_key: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> int:
    """Replace one partition of `name` with `frame` in a single atomic commit; return the new version.

    `partition` names the partition columns' values (e.g. experiment and round); every row must carry
    them. `stage_key`, when given, fills the stage_key column.
    """
    if set(partition) != set(PARTITIONS[name]):
        raise ValueError(f"table {name} is partitioned by {PARTITIONS[name]}, got {sorted(partition)}")
    if isinstance(frame, pa.Table):
        frame = pl.from_arrow(frame)
    if stage_key is not None and "stage_key" in SCHEMAS[name].names:
        frame = frame.with_columns(pl.lit(stage_key, pl.String).alias("stage_key"))
    data = conform(frame, name)  # first, so the partition columns below exist with their schema's types
    for col, value in partition.items():
        bad = frame.filter(pl.col(col) != value).height
        if bad:
            raise ValueError(f"table {name}: {bad} rows have {col} != {value!r}; a write replaces one partition")
    predicate = " AND ".join(f"{col} = {_sql_literal(v)}" for col, v in partition.items())
    meta = {"asymre.partition": json.dumps(partition), **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    uri = table_uri(store, name)
    return _commit(uri, data, name, "overwrite", predicate, meta)


def append(store: str, name: str, frame: pl.DataFrame | pa.Table, metadata: dict[str, Any] | None = None) -> int:
    """Append rows (used for the lineage table, which is never rewritten)."""
    data = conform(frame, name)
    uri = table_uri(store, name)
    return _commit(uri, data, name, "append", None, {k: json.dumps(v) for k, v in (metadata or {}).items()})


def compact(store: str, name: str) -> None:
    """Rewrite the small files of `name`'s latest version into few (rows and old versions unchanged).

    Best effort: a concurrent writer that wins the commit race leaves it for the next call."""
    dt = open_table(store, name)
    if dt is None:
        return
    with contextlib.suppress(CommitFailedError):
        dt.optimize.compact()


def empty(name: str) -> pl.DataFrame:
    return pl.from_arrow(SCHEMAS[name].empty_table())


def _partition_filter(name: str, where: dict[str, Any]) -> list[tuple] | None:
    """delta-rs file filters for the partition columns of `where` (value, or list of values = any of)."""
    filters = [
        (col, "in", [_plain(v) for v in value]) if isinstance(value, list | tuple | set) else (col, "=", _plain(value))
        for col, value in where.items()
        if col in PARTITIONS[name]
    ]
    return filters or None


def _plain(value: Any) -> Any:
    """A numpy scalar as its Python value (delta-rs encodes only Python primitives)."""
    return value.item() if hasattr(value, "item") else value


T = TypeVar("T")


def _at_version(store: str, name: str, version: int | None, use: Callable[[DeltaTable], T]) -> T | None:
    """use(handle of `name` at `version`, default latest), or None when it was never written. A pinned
    version may be served by the shared latest handle; if another thread moved that on while `use` ran,
    `use` runs again on a handle of its own."""
    dt = open_table(store, name, version)
    if dt is None:
        return None
    result = use(dt)
    if version is not None and dt.version() != version:
        result = use(DeltaTable(table_uri(store, name), version=version))
    return result


def files(store: str, name: str, *, version: int | None = None, where: dict[str, Any] | None = None) -> list[str]:
    """URIs of the Parquet files of `name` (latest version, or `version`); `where` (partition column → a
    value or a list of values; other columns are ignored) keeps those of the partitions it names."""
    pruning = _partition_filter(name, where or {})
    return _at_version(store, name, version, lambda dt: dt.file_uris(file_pruning_predicate=pruning)) or []


def read(
    store: str,
    name: str,
    *,
    version: int | None = None,
    columns: list[str] | None = None,
    **where: Any,
) -> pl.DataFrame:
    """Rows of `name` (latest version, or `version`), filtered by equality on columns in `where`.

    Only the files of the partitions `where` names are opened, so a read of one partition costs the same
    however many others the table holds."""
    pruning = _partition_filter(name, where)
    dataset = _at_version(store, name, version, lambda dt: dt.to_pyarrow_dataset(file_pruning_predicate=pruning))
    if dataset is None:
        frame = empty(name)
        return frame.select(columns) if columns else frame
    import pyarrow.dataset as ds

    expr = None
    for col, value in where.items():
        term = ds.field(col) == value
        expr = term if expr is None else expr & term
    table = dataset.to_table(columns=columns or SCHEMAS[name].names, filter=expr)
    return pl.from_arrow(table)


def version(store: str, name: str) -> int | None:
    dt = open_table(store, name)
    return None if dt is None else dt.version()


def history(store: str, name: str) -> list[dict[str, Any]]:
    """Commits of `name`, newest first: version, timestamp, operation, and our custom metadata."""
    dt = open_table(store, name)
    return [] if dt is None else dt.history()


def existing_tables(store: str) -> list[str]:
    return [name for name in SCHEMAS if open_table(store, name) is not None]
