"""`asymre check`: verify a whole store (tables readable, checkpoints matching their hashes, the data checks
of sql/checks/ over every round, lineage consistent) and list each problem with how to fix it.

Every item is checked on its own, so one damaged table or checkpoint does not hide the others."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from storage import checkpoints, object_store, tables
from storage.checks import CheckFailed, load_checks, run_checks
from storage.schemas import PARTITIONS, ROW_KEYS, SCHEMAS

ROUND_TABLES = [name for name in SCHEMAS if PARTITIONS[name] == ["experiment", "round"]]  # what a round writes
# the stage of flows/pipeline.py that writes each table, in the order a round writes them
WRITTEN_BY = {
    "prompts": "prompts",
    "rollouts": "rollouts",
    "rewards": "rewards",
    "advantages": "advantages",
    "train_set": "curation",
    "train_steps": "train",
    "checkpoints": "train",
    "evals": "eval",
}


@dataclass(frozen=True)
class Problem:
    kind: str  # table | checkpoint | check | lineage
    where: str  # the table / checkpoint / partition it is about
    message: str  # what is wrong and how to fix it

    def __str__(self) -> str:
        return f"{self.kind} {self.where}: {self.message}"


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # what was looked at: tables, files, checkpoints, ...

    def add(self, kind: str, where: str, message: str) -> None:
        self.problems.append(Problem(kind, where, message))

    def summary(self) -> str:
        looked = ", ".join(f"{n} {what}" for what, n in self.counts.items())
        verdict = "no problems" if not self.problems else f"{len(self.problems)} problem(s)"
        return f"checked {looked}: {verdict}"


def rerun(stage: str, round: int) -> str:
    """The run that repeats `stage` of `round` (as stage_runs records it) and everything after it."""
    if stage == "eval":  # the evaluation of checkpoint j is recorded as round j but ends round j − 1
        stage, round = ("eval", round - 1) if round > 0 else ("base", 0)  # checkpoint 0's goes with the base
    elif stage in ("prompts", "base"):
        round = 0
    return f"rebuild with `asymre run CONFIG --from-stage {stage} --round {round}`"


def rebuild(table: str, round: int | None) -> str:
    """The run that writes a partition of `table` (of `round`) again."""
    stage = WRITTEN_BY.get(table)
    if stage is None or (round is None and table != "prompts"):
        return "no stage writes it again: restore the store from a copy"
    if table == "checkpoints":
        return f"rebuild with `{checkpoints.rebuild_command(round)}`"
    return rerun(stage, round or 0)


def check_store(store: str, stage_outputs: Mapping[str, str]) -> Report:
    """Everything `asymre check` verifies. `stage_outputs`: each stage's output table (flows/pipeline.py), whose
    versions its `done` runs in stage_runs name."""
    store = tables.resolve_store(store)
    report = Report()
    damaged = _table_files(store, report)
    _checkpoints(store, report)
    _data_checks(store, report, damaged)
    _lineage(store, report, stage_outputs)
    return report


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return object_store.redact(f"{type(err).__name__}: {text[0] if text else ''}")[:300]


_PARTITION = re.compile(r"(experiment|round|dataset)=([^/]+)")


def _partition_of(uri: str) -> dict[str, str]:
    return dict(_PARTITION.findall(uri))


def _table_files(store: str, report: Report) -> set[tuple[str, str]]:
    """Open every table at its latest version and read every data file's footer; return the (experiment,
    round) partitions with a damaged file (their data checks would only repeat the damage)."""
    damaged: set[tuple[str, str]] = set()
    opened = files = 0
    for name in SCHEMAS:
        try:
            dt = tables.open_table(store, name)
            if dt is None:
                continue
            version, uris = dt.version(), dt.file_uris()
        except Exception as err:  # a truncated or missing log entry: the table cannot be opened at all
            report.add("table", name, f"cannot be opened ({_first_line(err)}); restore tables/{name} from a copy")
            continue
        opened += 1
        held = tables.present(tables.table_uri(store, name), uris)  # one listing of the table on S3
        remote = object_store.is_remote(store)
        for uri in uris:
            files += 1
            path = object_store.path_of(uri) if remote else uri.removeprefix("file://")
            part = _partition_of(uri)
            try:
                if uri not in held:
                    raise FileNotFoundError("missing")
                pq.read_metadata(path, filesystem=object_store.filesystem() if remote else None)
            except Exception as err:
                round = int(part["round"]) if "round" in part else None
                where = " ".join(f"{k}={v}" for k, v in part.items())
                wrong = "is missing" if isinstance(err, FileNotFoundError) else f"is unreadable ({_first_line(err)})"
                report.add(
                    "table",
                    f"{name} ({where})" if where else name,
                    f"data file {Path(path).name} of version {version} {wrong}; {rebuild(name, round)}",
                )
                if "experiment" in part and round is not None:
                    damaged.add((part["experiment"], part["round"]))
    report.counts["tables"] = opened
    report.counts["data files"] = files
    return damaged


def _safely(report: Report, kind: str, where: str, read: Callable[[], pl.DataFrame]) -> pl.DataFrame | None:
    try:
        return read()
    except Exception as err:  # reported with the table's files above; nothing more to check here
        report.add(kind, where, f"not checked: {_first_line(err)}")
        return None


def _checkpoints(store: str, report: Report) -> None:
    rows = _safely(report, "checkpoint", "registry", lambda: tables.read(store, "checkpoints"))
    if rows is None:
        return
    report.counts["checkpoints"] = rows.height
    for row in rows.sort("experiment", "round").iter_rows(named=True):
        row = {**row, "path": checkpoints.location(store, row["path"])}
        where = f"{row['experiment']} round={row['round']} ({row['path']})"
        try:
            wrong = checkpoints.problem(row)
        except OSError as err:
            wrong = f"unreadable ({_first_line(err)})"
        if wrong is not None:
            report.add("checkpoint", where, f"{wrong}; {rebuild('checkpoints', row['round'])}")


def _data_checks(store: str, report: Report, damaged: set[tuple[str, str]]) -> None:
    """The checks a stage runs on what it wrote, over every (experiment, round) partition, with the reward
    range the round's rewards stage was configured with (stage_runs records it)."""
    partitions: set[tuple[str, str]] = set()
    for name in ROUND_TABLES:
        try:
            partitions |= {
                (p["experiment"], p["round"]) for p in map(_partition_of, tables.files(store, name)) if len(p) == 2
            }
        except Exception:  # an unopenable table is reported above
            continue
    ranges = _reward_ranges(store)
    checks = {c.name: c for c in load_checks()}
    checked = 0
    for experiment, round_ in sorted(partitions, key=lambda p: (p[0], int(p[1]))):
        if (experiment, round_) in damaged:
            continue
        k = int(round_)
        where = f"{experiment} round={k}"
        checked += 1
        try:
            run_checks(
                store, experiment=experiment, round=k, tables=[t for t in ROUND_TABLES if t in ROW_KEYS],
                available=list(SCHEMAS), reward_range=ranges.get((experiment, k), (0.0, 1.0)),
            )  # fmt: skip
        except CheckFailed as failed:
            for name, bad in failed.failures.items():
                named = [name.removeprefix("duplicate_")] if name.startswith("duplicate_") else checks[name].tables
                last = max(named, key=lambda t: list(WRITTEN_BY).index(t) if t in WRITTEN_BY else -1)
                source = "duplicate row keys" if name.startswith("duplicate_") else f"sql/checks/{name}.sql"
                report.add("check", where, f"{name} returns {bad.height} bad rows ({source}); {rebuild(last, k)}")
        except Exception as err:
            report.add("check", where, f"the checks could not run ({_first_line(err)})")
    report.counts["round partitions"] = checked  # those with a damaged data file are reported above instead


def _reward_ranges(store: str) -> dict[tuple[str, int], tuple[float, float]]:
    try:
        runs = tables.read(store, "stage_runs").filter((pl.col("stage") == "rewards") & (pl.col("status") == "done"))
    except Exception:
        return {}
    ranges = {}
    for run in runs.sort("created_at").iter_rows(named=True):
        reward = json.loads(run["config"] or "{}").get("reward", {})
        if "incorrect" in reward and "correct" in reward:
            ranges[(run["experiment"], run["round"])] = (float(reward["incorrect"]), float(reward["correct"]))
    return ranges


def _lineage(store: str, report: Report, stage_outputs: Mapping[str, str]) -> None:
    """Every `done` stage run names a version of its output table that exists; every checkpoint's parent is
    registered."""
    runs = _safely(report, "lineage", "stage_runs", lambda: tables.read(store, "stage_runs"))
    if runs is None:
        return
    done = runs.filter((pl.col("status") == "done") & pl.col("output_version").is_not_null())
    report.counts["stage runs"] = done.height
    versions: dict[str, set[int] | None] = {}
    for run in done.sort("created_at").iter_rows(named=True):
        table = stage_outputs.get(run["stage"])
        if table is None:
            continue
        if table not in versions:
            try:
                versions[table] = {c["version"] for c in tables.history(store, table)}
            except Exception:  # an unopenable table is reported above
                versions[table] = None
        held = versions[table]
        if held is not None and run["output_version"] not in held:
            report.add(
                "lineage",
                f"{run['experiment']} round={run['round']} {run['stage']}",
                f"its done run in stage_runs names version {run['output_version']} of {table}, which the table "
                f"does not hold (latest {max(held, default=None)}); the table was rewritten or removed: "
                f"{rerun(run['stage'], run['round'])}",
            )
    registry = _safely(report, "lineage", "checkpoints", lambda: tables.read(store, "checkpoints"))
    if registry is None:
        return
    known = set(registry["policy_version"].to_list())
    for row in registry.sort("experiment", "round").iter_rows(named=True):
        if row["parent_version"] is not None and row["parent_version"] not in known:
            report.add(
                "lineage",
                f"{row['experiment']} round={row['round']}",
                f"checkpoint {row['round']} was trained from {row['parent_version']}, which is no longer registered "
                f"(its parent was rebuilt since); {rebuild('checkpoints', row['round'])}",
            )
