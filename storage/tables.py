"""Versioned tables: one Delta Lake table per schema under `<store>/tables/<name>`.

A stage's output for one (experiment, round) is written as one atomic commit that replaces that
partition; readers see the previous version until the commit lands, and every version stays readable.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from storage import object_store
from storage.schemas import PARTITIONS, SCHEMAS


class SchemaError(ValueError):
    """A frame does not match its table's schema; nothing was written."""


class TableDamaged(RuntimeError):
    """A table's `_delta_log` cannot be read (a commit file truncated, overwritten or missing): every read and
    write of that table would fail, the store's other tables are unaffected."""

    def __init__(self, store: str, table: str, reason: str, file: str | None = None):
        self.store, self.table, self.reason, self.file = store, table, reason, file
        what, fix = (f"{file} {reason}", "restore that file") if file else (reason, "restore its _delta_log")
        super().__init__(
            f"table {table} of store {store} cannot be read: {what}; {fix} from a copy, or move the folder "
            f"{store}/tables/{table} away and rerun `asymre run` (it rebuilds the table from its stages)"
        )


class DataFileMissing(RuntimeError):
    """A Parquet file that a committed version of a table lists is gone from the store."""

    def __init__(self, store: str, table: str, version: int, partition: dict[str, Any], file: str):
        self.store, self.table, self.version, self.partition, self.file = store, table, version, partition, file
        where = ", ".join(f"{k}={v}" for k, v in partition.items()) or "(unpartitioned)"
        super().__init__(
            f"table {table} version {version}, partition {where}: data file {file} is missing; restore it from a "
            f"copy, or recompute that partition by rerunning the stage that writes {table} for it"
        )


def resolve_store(store: str | os.PathLike | None = None) -> str:
    """The store root: the argument, else $ASYMRE_STORE, else ./store (absolute for local paths, without a trailing
    slash for an object store: s3://bucket/prefix)."""
    root = str(store or os.environ.get("ASYMRE_STORE") or "./store")
    return root.rstrip("/") if "://" in root else str(Path(root).expanduser().resolve())


def _delta(uri: str, version: int | None = None) -> DeltaTable:
    """A DeltaTable handle; one on S3 gets its storage options from the environment (object_store)."""
    return DeltaTable(uri, version=version, storage_options=object_store.options_for(uri))


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
        return _delta(uri, version)
    except TableNotFoundError:
        return None
    except DeltaError as err:  # delta-rs reports a missing version and a damaged log as the same generic error
        latest = _latest(uri)  # raises TableDamaged if the damage reaches the latest version too
        if latest is None:
            return None
        if version > latest.version() or _damage_in_log(uri, version) is None:
            raise ValueError(f"table {name} has no version {version} (latest is {latest.version()})") from err
        raise _damaged(uri, err, version) from None


# Latest-version handles of tables, kept per process and brought up to date with update_incremental
# (reads only the log entries added since), instead of replaying the whole log on every open: a round
# opens its tables some hundred times (reads, checks, views.sql, lineage). A handle is dropped when the
# commit file of the version it holds is gone or another file (the table was deleted and made again at
# the same path): a stat of that file, on S3 one HEAD request (then one listing of the log from there on,
# where a fresh open lists the log and reads every commit file since its last checkpoint).
_LATEST: dict[str, tuple[DeltaTable, int, tuple[int, ...]]] = {}  # uri → (handle, version, stamp of its commit)
_LATEST_LOCK = threading.Lock()


def _commit_stamp(uri: str, version: int) -> tuple[int, ...] | None:
    """(inode, mtime, size) of a commit file, (size, mtime) of its object on S3; None if it is not there."""
    name = f"_delta_log/{version:020d}.json"
    if object_store.is_remote(uri):
        return object_store.stamp(f"{uri}/{name}")
    try:
        st = os.stat(Path(uri) / name)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size  # size too: a rewrite within one mtime tick keeps the mtime


def _latest(uri: str) -> DeltaTable | None:
    entry = _latest_entry(uri)
    return None if entry is None else entry[0]


def _latest_entry(uri: str) -> tuple[DeltaTable, int, tuple[int, ...] | None] | None:
    """(handle, version, stamp of that version's commit file) of a table, brought up to date and held for
    the next call; None if unwritten. A version without a commit file (log cleaned up) has no stamp, so its
    handle is not held. The lock guards only the dict (a handle taken out is updated by its one taker), not the
    requests that bring a table on S3 up to date."""
    with _LATEST_LOCK:
        held = _LATEST.pop(uri, None)
    dt = stamp = None
    if held is not None and _commit_stamp(uri, held[1]) == held[2]:
        dt = held[0]
        try:
            dt.update_incremental()
        except Exception:  # the log moved under the handle (e.g. cleaned up): open afresh
            dt = None
        else:
            stamp = held[2] if dt.version() == held[1] else None  # checked just above
    if dt is None:
        dt = _open_latest(uri)
        if dt is None:
            return None
    version = dt.version()
    stamp = stamp or _commit_stamp(uri, version)
    if stamp is not None:
        with _LATEST_LOCK:
            _LATEST[uri] = (dt, version, stamp)
    return dt, version, stamp


def _open_latest(uri: str) -> DeltaTable | None:
    """A fresh handle of the latest version; None if no table is there, TableDamaged if its log is unreadable."""
    try:
        return _delta(uri)
    except TableNotFoundError:
        return None
    except DeltaError as err:
        raise _damaged(uri, err) from None


# delta-rs's messages end in a Rust backtrace (RUST_BACKTRACE) and may hold a whole debug dump of a path: the
# reason a user needs is the first line, and the file is found by reading the log (_damage_in_log).
def _damaged(uri: str, err: Exception, version: int | None = None) -> TableDamaged:
    store, _, name = uri.rpartition("/tables/")
    found = _damage_in_log(uri, version)
    if found is not None:
        return TableDamaged(store, name, found[1], found[0])
    first_line = object_store.redact((str(err).strip().splitlines() or [type(err).__name__])[0])
    return TableDamaged(store, name, f"delta-rs says: {first_line[:300]}")


def _damage_in_log(uri: str, version: int | None = None) -> tuple[str, str] | None:
    """(file, what is wrong with it) for the first commit file up to `version` (default: all) of a local table
    that is not one JSON object a line, or that is missing between the oldest and the newest; None if every
    commit file reads. Only called once delta-rs has failed, so reading the whole log costs nothing that
    matters."""
    if object_store.is_remote(uri):
        log = f"{uri}/_delta_log"
        names = [n for n in object_store.listing(log) if "/" not in n]
        read = lambda name: object_store.get_bytes(f"{log}/{name}").decode()  # noqa: E731
    elif "://" in uri or not (Path(uri) / "_delta_log").is_dir():
        return None
    else:
        log = str(Path(uri) / "_delta_log")
        names = [p.name for p in Path(log).iterdir()]
        read = lambda name: (Path(log) / name).read_text()  # noqa: E731
    versions = sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())
    if version is not None:
        versions = [v for v in versions if v <= version]
    for previous, v in zip([None, *versions], versions):
        name = f"{v:020d}.json"
        if previous is not None and v != previous + 1:
            return f"{log}/{previous + 1:020d}.json", f"is missing (the log has versions {previous} and {v})"
        try:
            for line in read(name).splitlines():
                if line.strip():
                    json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return f"{log}/{name}", "is not valid JSON (truncated or overwritten)"
    return None


def _held(uri: str, version: int) -> DeltaTable | None:
    """The held latest handle of a table if it is at `version` of the table as it is in the store now."""
    with _LATEST_LOCK:
        held = _LATEST.get(uri)
    if held is None or held[1] != version or _commit_stamp(uri, version) != held[2]:
        return None
    return held[0]


def snapshot_id(store: str, name: str) -> tuple[int, int, int] | None:
    """(version, and the identity of its commit file) of a table's latest version, to key caches of what
    was read from it; None for tables not written yet (nothing to cache)."""
    uri = table_uri(store, name)
    entry = _latest_entry(uri)
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


# The commit conflicts delta-rs reports (the texts of its CommitConflictError and TransactionError kinds, all
# raised as CommitFailedError): another writer committed first, to this partition (its delete or its new data
# overlaps ours), to another one, or created the table at the same moment (metadata and protocol "changed").
# A write replaces one whole partition, so writing it again on top of the other commit is right: the last
# writer wins and both commits stay as versions.
_CONFLICT = re.compile(
    r"concurrent transaction"  # added new data, deleted data this operation read, deleted the same data, failed
    r"|changed since last commit"  # metadata / protocol: two writers made the table
    r"|already exists|committing existing table version"  # the version's log file was taken
    r"|failed to commit transaction: \d+\s*$",  # its own retries (max_commit_retries) used up
    re.IGNORECASE,
)


def _is_conflict(err: Exception) -> bool:
    """Whether `err` is a lost commit race, worth writing again; a schema error, a full disk or a permission
    error is not, and fails at once."""
    if isinstance(err, CommitFailedError):
        first_line = (str(err).strip().splitlines() or [""])[0]  # the rest is help text and a Rust backtrace
        return _CONFLICT.search(first_line) is not None
    # the object store's "Object at location … already exists" for a log file another writer took first
    return isinstance(err, OSError) and "already exists" in str(err)


def _commit(uri: str, data: pa.Table, name: str, mode: str, predicate: str | None, metadata: dict) -> int:
    """Write one commit and return the version it landed as (not a concurrent writer's later one)."""
    commit_id = uuid.uuid4().hex
    metadata = {**metadata, "asymre.commit_id": commit_id}
    for attempt in range(20):
        try:
            held = _latest(uri)  # the held handle spares delta-rs a replay of the log
            landed = None
            write_deltalake(
                held or uri,
                data,
                partition_by=PARTITIONS[name],
                mode=mode,
                predicate=predicate,
                storage_options=None if held is not None else object_store.options_for(uri),
                commit_properties=CommitProperties(custom_metadata=metadata, max_commit_retries=50),
            )
            landed = None if held is None else held.version()  # the handle moves to the version it committed
            break
        except (CommitFailedError, OSError) as err:
            if attempt == 19 or not _is_conflict(err):
                raise
            # back off a random while, longer each time, so that the writers that collided spread out
            time.sleep(0.05 + random.random() * 0.2 * (attempt + 1))
    return _find_commit(uri, commit_id, name, landed)


def _find_commit(uri: str, commit_id: str, name: str, landed: int | None = None) -> int:
    """The version whose commit carries `commit_id`: other writers may have committed after ours, and
    history() numbers entries from its own snapshot (a handle opened at version 0 numbers versions 2, 1, 0 as
    0, -1, -2: a negative version reached a stage's input on S3 with four writers), so read the log's commit files
    themselves."""
    if landed is not None and commit_id in _log_entry(uri, landed):  # one read, where the writing handle went
        _latest(uri)  # the held entry still names the version before the write: stamp the one it moved to
        return landed
    latest = _latest(uri).version()
    for version in range(latest, max(-1, latest - 256), -1):
        if commit_id in _log_entry(uri, version):
            return version
    raise RuntimeError(f"table {name}: commit {commit_id} not found in the last 256 versions")


def _log_entry(uri: str, version: int) -> str:
    """The text of one commit file ("" if it is not there): a GET on S3."""
    name = f"_delta_log/{version:020d}.json"
    try:
        if object_store.is_remote(uri):
            return object_store.get_bytes(f"{uri}/{name}").decode()
        return (Path(uri) / name).read_text()
    except OSError:
        return ""


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
        uri = table_uri(store, name)
        try:
            own = _delta(uri, version)
        except DeltaError as err:
            raise _damaged(uri, err, version) from None
        result = use(own)
    return result


def files(
    store: str,
    name: str,
    *,
    version: int | None = None,
    where: dict[str, Any] | None = None,
    must_exist: bool = False,
) -> list[str]:
    """URIs of the Parquet files of `name` (latest version, or `version`); `where` (partition column → a
    value or a list of values; other columns are ignored) keeps those of the partitions it names.
    `must_exist` raises DataFileMissing for the first one that is gone from a local store (a stat per file):
    for readers that open the files themselves (DuckDB) and would name only the path."""

    def uris(dt: DeltaTable) -> list[str]:
        found = dt.file_uris(file_pruning_predicate=pruning)
        if must_exist:
            gone = _first_missing(store, name, dt, found)
            if gone is not None:
                raise gone
        return found

    pruning = _partition_filter(name, where or {})
    return _at_version(store, name, version, uris) or []


def _first_missing(store: str, name: str, dt: DeltaTable, uris: list[str]) -> DataFileMissing | None:
    """DataFileMissing for the first of `uris` (files of `dt`'s version) that the store lacks, else None: a stat
    per file in a local store, one listing of the table's objects on S3."""
    held = present(table_uri(store, name), uris)
    for uri in uris:
        if uri not in held:
            return DataFileMissing(resolve_store(store), name, dt.version(), _partition_of(name, uri), uri)
    return None


def present(table: str, uris: list[str]) -> set[str]:
    """Those of `uris` (data files of the table at URI `table`) that exist."""
    if object_store.is_remote(table):
        if not uris:
            return set()
        listed = object_store.listing(table)
        return {uri for uri in uris if uri[len(table) + 1 :] in listed}
    return {uri for uri in uris if os.path.exists(uri.removeprefix("file://"))}


def _partition_of(name: str, file: str) -> dict[str, Any]:
    """The partition a data file belongs to, from the hive folders of its path (`round=3` is the int 3)."""
    partition: dict[str, Any] = {}
    for folder in file.split("/")[:-1]:
        col, eq, value = folder.partition("=")
        if eq and col in PARTITIONS[name]:
            value = urllib.parse.unquote(value)
            partition[col] = int(value) if pa.types.is_integer(SCHEMAS[name].field(col).type) else value
    return partition


def dataset_of(dt: DeltaTable, pruning: list[tuple] | None = None) -> Any:
    """The pyarrow dataset of `dt`'s files (those `pruning` keeps), read through pyarrow's own filesystem (local, or
    S3 with the credentials of the environment: storage.object_store).

    delta-rs's default is a filesystem written in Python (deltalake.fs.DeltaStorageHandler), so pyarrow's C++
    IO threads call into Python for every read, also for the reads ahead it issues in the background
    (pre_buffer). With it, `asymre tables` aborted after printing its output in 7 of 150 runs ("terminate called
    without an active exception", exit 134); the same command through this native filesystem, 0 of 196. The
    likely mechanism: an IO thread that needs the interpreter while it shuts down is ended by CPython with
    pthread_exit, whose unwinding through Arrow's noexcept C++ frames calls std::terminate. A table on S3 read
    through delta-rs's handler aborted the same way here (moto on loopback), hence pyarrow's S3 filesystem."""
    import pyarrow.fs as pa_fs

    uri = dt.table_uri.rstrip("/")
    if object_store.is_remote(uri):
        root = pa_fs.SubTreeFileSystem(object_store.path_of(uri), object_store.filesystem())
    else:
        root = pa_fs.SubTreeFileSystem(urllib.parse.unquote(uri.removeprefix("file://")), pa_fs.LocalFileSystem())
    return dt.to_pyarrow_dataset(filesystem=root, file_pruning_predicate=pruning)


def dataset(store: str, name: str, *, version: int | None = None, where: dict[str, Any] | None = None) -> Any:
    """The pyarrow dataset of `name` (latest version, or `version`; only the files of the partitions `where`
    names), or None when it was never written."""
    pruning = _partition_filter(name, where or {})
    return _at_version(store, name, version, lambda dt: dataset_of(dt, pruning))


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
    opened = _at_version(store, name, version, lambda dt: (dt, dt.version(), dataset_of(dt, pruning)))
    if opened is None:
        frame = empty(name)
        return frame.select(columns) if columns else frame
    dt, at, dataset = opened
    import pyarrow.dataset as ds

    expr = None
    for col, value in where.items():
        term = ds.field(col) == value
        expr = term if expr is None else expr & term
    try:
        table = dataset.to_table(columns=columns or SCHEMAS[name].names, filter=expr)
    except OSError as err:
        # pyarrow names only the path; say which table, partition and version lost it. The files are listed
        # from a handle of version `at` of its own: the shared one may have moved on meanwhile.
        own = dt if dt.version() == at else open_table(store, name, at)
        gone = _first_missing(store, name, own, own.file_uris(file_pruning_predicate=pruning))
        if gone is None:
            raise
        raise gone from err
    return pl.from_arrow(table)


def summary(store: str, name: str) -> dict[str, int] | None:
    """version, versions, rows and partitions of `name`'s latest version, or None if it was never written.

    Rows are summed from the log's per-file statistics and the data files are only stat'ed (local stores),
    never opened: no pyarrow dataset and its thread pools for what a listing needs (see `asymre tables`).
    Raises TableDamaged or DataFileMissing when the table cannot be read."""
    dt = open_table(store, name)
    if dt is None:
        return None
    gone = _first_missing(store, name, dt, dt.file_uris())
    if gone is not None:
        raise gone
    try:
        counts = pa.table(dt.get_add_actions(flatten=True)).column("num_records")
        n_versions = len(dt.history())  # reads every commit file, also those before the latest checkpoint
    except DeltaError as err:
        raise _damaged(table_uri(store, name), err) from None
    # a file written without statistics (not by this project) has its rows counted from the data
    rows = dataset_of(dt).count_rows() if counts.null_count else sum(counts.to_pylist())
    return {"version": dt.version(), "versions": n_versions, "rows": rows, "partitions": len(dt.partitions())}


def version(store: str, name: str) -> int | None:
    dt = open_table(store, name)
    return None if dt is None else dt.version()


def history(store: str, name: str) -> list[dict[str, Any]]:
    """Commits of `name`, newest first: version, timestamp, operation, and our custom metadata."""
    dt = open_table(store, name)
    return [] if dt is None else dt.history()


def holds_tables(store: str) -> bool:
    """Whether the store has a tables folder (without opening any table, one of which may be damaged)."""
    root = resolve_store(store)
    if object_store.is_remote(root):
        return object_store.holds(f"{root}/tables")
    return (Path(root) / "tables").is_dir()


def folders(store: str) -> set[str] | None:
    """The names of the table folders of a store on S3 (one listing; a table never written has none), None for a
    local store (opening a table that is not there costs no more than looking)."""
    root = resolve_store(store)
    return object_store.folders(f"{root}/tables") if object_store.is_remote(root) else None


def existing_tables(store: str) -> list[str]:
    """The tables written so far, also those that cannot be read any more (TableDamaged)."""
    have = []
    there = folders(store)
    for name in SCHEMAS if there is None else [n for n in SCHEMAS if n in there]:
        try:
            if open_table(store, name) is not None:
                have.append(name)
        except TableDamaged:
            have.append(name)
    return have
