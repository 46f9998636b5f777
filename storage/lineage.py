"""Lineage: the stage_key of a stage run and the `stage_runs` table that records every run.

A stage whose output already holds its stage_key is skipped; that is how rounds resume.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

import polars as pl

from storage import object_store, tables

COMPACT_EVERY = 20  # stage_runs commits between compactions


def stage_key(stage: str, config: dict[str, Any], input_keys: list[str], code_version: str) -> str:
    """hash(stage name, the stage's config, its inputs' stage_keys, its code version), 16 hex chars."""
    payload = json.dumps(
        {"stage": stage, "config": config, "inputs": list(input_keys), "code": code_version},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def record_run(
    store: str,
    *,
    experiment: str,
    round: int,
    stage: str,
    key: str,
    config: dict[str, Any],
    code_version: str,
    rows: int,
    wall_s: float,
    status: str,
    input_versions: dict[str, int | None] | None = None,
    output_version: int | None = None,
    message: str | None = None,
) -> None:
    row = {
        "experiment": experiment,
        "round": round,
        "stage": stage,
        "stage_key": key,
        "input_versions": json.dumps(input_versions or {}, sort_keys=True),
        "config": json.dumps(config, sort_keys=True, default=str),
        "code_version": code_version,
        "rows": rows,
        "wall_s": wall_s,
        "status": status,
        "message": None if message is None else object_store.redact(message),  # no credential in a table
        "output_version": output_version,
        "created_at": datetime.now(timezone.utc),
    }
    frame = pl.DataFrame([row], schema_overrides={"round": pl.Int32, "rows": pl.Int64, "output_version": pl.Int64})
    version = tables.append(store, "stage_runs", frame)
    _extend_cache(store, version, frame)
    if version and version % COMPACT_EVERY == 0:
        # one small file per run: without this, every stage's last_done reads a list that only grows
        tables.compact(store, "stage_runs")  # a new version: the cached copy no longer matches and is re-read


# Every row of stage_runs as this process last saw it, keyed by the table's snapshot: a round asks
# `last_done` once per stage, and re-reading the table's files each time cost more than the stage
# bookkeeping itself. A row this process appends extends the cached copy when its commit directly
# follows the cached version; any other change (another writer, a compaction) means a fresh read.
_CACHE: dict[str, tuple[tuple, pl.DataFrame]] = {}


def _all_runs(store: str) -> pl.DataFrame:
    snapshot = tables.snapshot_id(store, "stage_runs")
    uri = tables.table_uri(store, "stage_runs")
    held = _CACHE.get(uri)
    if snapshot is not None and held is not None and held[0] == snapshot:
        return held[1]
    # the latest version through the held handle (no log replay); if a writer slipped in after the
    # snapshot, the copy is newer than its key, and the next call's snapshot differs: read again
    frame = tables.read(store, "stage_runs")
    if snapshot is not None:
        _CACHE[uri] = (snapshot, frame)
    return frame


def _extend_cache(store: str, version: int, row: pl.DataFrame) -> None:
    uri = tables.table_uri(store, "stage_runs")
    held = _CACHE.pop(uri, None)
    snapshot = tables.snapshot_id(store, "stage_runs")
    if held is None or snapshot is None or held[0][0] != version - 1 or snapshot[0] != version:
        return
    _CACHE[uri] = (snapshot, pl.concat([held[1], pl.from_arrow(tables.conform(row, "stage_runs"))]))


def runs(store: str, experiment: str | None = None) -> pl.DataFrame:
    frame = _all_runs(store)
    if experiment is not None:
        frame = frame.filter(pl.col("experiment") == experiment)
    return frame.sort("created_at")


def last_done(store: str, experiment: str, round: int, stage: str) -> dict | None:
    """The last finished ('done') run of (experiment, round, stage), or None."""
    done = runs(store, experiment).filter(
        (pl.col("round") == round) & (pl.col("stage") == stage) & (pl.col("status") == "done")
    )
    return None if done.is_empty() else done.row(-1, named=True)


def output_holds(store: str, table: str, where: dict[str, Any], key: str, empty_ok: bool = False) -> bool:
    """Every row of the output partition carries `key`; an empty partition counts only when `empty_ok`
    (the run that wrote it recorded zero rows)."""
    keys = tables.read(store, table, columns=["stage_key"], **where)["stage_key"]
    return set(keys.to_list()) <= {key} and (keys.len() > 0 or empty_ok)


def completed_rounds(store: str, experiment: str) -> int:
    """Rounds whose last stage (the evaluation of the next checkpoint, recorded as round k+1) finished."""
    done = runs(store, experiment).filter((pl.col("stage") == "eval") & (pl.col("status") == "done"))
    return int(done["round"].max()) if done.height else 0
