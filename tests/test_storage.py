"""Tests of the versioned tables (storage/tables.py), lineage and the checkpoint registry: schema round trips
and refusals, partition replace with time travel, a writer killed mid-commit, concurrent writers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from frames import (
    SMALL,
    advantages_frame,
    partition_of,
    rewards_frame,
    rollouts_frame,
    train_set_frame,
)
from polars.testing import assert_frame_equal

from storage import catalog, checkpoints, lineage, tables
from storage.catalog import connect
from storage.schemas import PARTITIONS, SCHEMAS

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def store(tmp_path) -> str:
    return str(tmp_path / "store")


def sorted_rows(frame: pl.DataFrame, table: str) -> pl.DataFrame:
    keys = [c for c in ("dataset", "experiment", "round", "prompt_id", "sample_idx", "step", "stage_key") if c in frame]
    return frame.sort(keys)


def expected_dtypes(table: str) -> dict[str, pl.DataType]:
    return dict(pl.from_arrow(SCHEMAS[table].empty_table()).schema)


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])}


# --- schemas: round trip and refusals --------------------------------------------------------------------


def test_small_frames_cover_every_table():
    assert set(SMALL) == set(SCHEMAS)


@pytest.mark.parametrize("table", list(SCHEMAS))
def test_round_trip(store, table):
    frame = SMALL[table]()
    assert frame.height > 0
    version = tables.write_partition(store, table, frame, partition=partition_of(table, frame))
    assert version == 0
    back = tables.read(store, table)
    assert dict(back.schema) == expected_dtypes(table)
    assert back.columns == SCHEMAS[table].names
    assert_frame_equal(sorted_rows(back, table), sorted_rows(frame.select(SCHEMAS[table].names), table))
    # the Delta table itself is partitioned as PARTITIONS says
    assert DeltaTable(tables.table_uri(store, table)).metadata().partition_columns == PARTITIONS[table]


def test_round_trip_keeps_exact_list_and_float_values(store):
    frame = rollouts_frame("exp", 2, n_prompts=3, G=4, seed=7, max_tokens=16)
    tables.write_partition(store, "rollouts", frame, partition={"experiment": "exp", "round": 2})
    back = sorted_rows(tables.read(store, "rollouts"), "rollouts")
    assert back["behaviour_logprobs"].dtype == pl.List(pl.Float32)
    assert back["completion_token_ids"].dtype == pl.List(pl.Int32)
    assert back["completion_token_ids"].to_list() == frame["completion_token_ids"].to_list()
    assert back["behaviour_logprobs"].to_list() == frame["behaviour_logprobs"].to_list()
    assert back["num_tokens"].to_list() == [len(x) for x in frame["completion_token_ids"].to_list()]


def _wrong_type(dtype: pl.DataType) -> pl.DataType:
    """A dtype that is not `dtype`'s logical type (what a stage might produce by mistake)."""
    if dtype == pl.List(pl.Int32):
        return pl.List(pl.Int64)
    if dtype == pl.List(pl.Float32):
        return pl.List(pl.Float64)
    return {
        pl.String: pl.Int64,
        pl.Int32: pl.Int64,
        pl.Int64: pl.Float64,
        pl.Float64: pl.Float32,
        pl.Boolean: pl.Int8,
    }.get(dtype, pl.String)


def _mistyped(frame: pl.DataFrame, column: str) -> pl.DataFrame:
    wrong = _wrong_type(frame[column].dtype)
    if wrong == pl.String:
        return frame.with_columns(pl.col(column).cast(pl.String))
    if frame[column].dtype == pl.String:
        return frame.with_columns(pl.int_range(pl.len()).cast(wrong).alias(column))
    return frame.with_columns(pl.col(column).cast(wrong))


@pytest.mark.parametrize("table", list(SCHEMAS))
def test_bad_frames_are_refused_and_leave_the_table_unchanged(store, table):
    frame = SMALL[table]()
    partition = partition_of(table, frame)
    tables.write_partition(store, table, frame, partition=partition)
    before = sorted_rows(tables.read(store, table), table)
    for field in SCHEMAS[table]:
        expected = str(field.type)
        bad_frames = {
            "renamed": frame.rename({field.name: field.name + "_typo"}),
            "missing": frame.drop(field.name),
            "mistyped": _mistyped(frame, field.name),
        }
        for what, bad in bad_frames.items():
            with pytest.raises(tables.SchemaError) as err:
                tables.write_partition(store, table, bad, partition=partition)
            message = str(err.value)
            assert f"'{field.name}'" in message and expected in message, (what, message)
            if what == "mistyped":
                assert f"has type {bad.to_arrow().schema.field(field.name).type}, expected {expected}" in message, (
                    message
                )
    assert tables.version(store, table) == 0
    assert len(tables.history(store, table)) == 1
    assert_frame_equal(sorted_rows(tables.read(store, table), table), before)


def test_nulls_are_refused_only_where_the_schema_forbids_them(store):
    frame = SMALL["rewards"]()
    part = partition_of("rewards", frame)
    no_outcome = pl.when(pl.col("sample_idx") == 0).then(None).otherwise(pl.col("outcome")).alias("outcome")
    with pytest.raises(tables.SchemaError, match="'outcome' holds 2 nulls"):  # sample 0 of both prompts
        tables.write_partition(store, "rewards", frame.with_columns(no_outcome), partition=part)
    assert tables.version(store, "rewards") is None  # nothing was written, not even an empty table
    # an all-null column (polars dtype Null) is fine where the schema allows nulls, and is stored typed
    ckpt = SMALL["checkpoints"]().with_columns(pl.lit(None).alias("parent_version"))
    assert ckpt["parent_version"].dtype == pl.Null
    tables.write_partition(store, "checkpoints", ckpt, partition=partition_of("checkpoints", ckpt))
    back = tables.read(store, "checkpoints")
    assert back["parent_version"].dtype == pl.String and back["parent_version"].to_list() == [None]


def test_rows_outside_the_partition_are_refused(store):
    frame = advantages_frame("a", 0)
    with pytest.raises(ValueError, match="rows have round != 1"):
        tables.write_partition(store, "advantages", frame, partition={"experiment": "a", "round": 1})
    with pytest.raises(ValueError, match="partitioned by"):
        tables.write_partition(store, "advantages", frame, partition={"experiment": "a"})
    assert tables.version(store, "advantages") is None


# --- partition replace and time travel -------------------------------------------------------------------


def test_replace_partition_makes_a_new_version_and_keeps_the_old_one(store):
    a0 = advantages_frame("a", 0, seed=0)
    a1 = advantages_frame("a", 1, seed=1)
    b0 = advantages_frame("b", 0, seed=2, n_prompts=3)
    assert tables.write_partition(store, "advantages", a0, partition={"experiment": "a", "round": 0}) == 0
    assert tables.write_partition(store, "advantages", a1, partition={"experiment": "a", "round": 1}) == 1
    assert tables.write_partition(store, "advantages", b0, partition={"experiment": "b", "round": 0}) == 2
    new_a0 = advantages_frame("a", 0, seed=5, n_prompts=4, delta_v=-0.1, stage_key="key-new")
    assert tables.write_partition(store, "advantages", new_a0, partition={"experiment": "a", "round": 0}) == 3

    def rows(version=None, **where):
        return sorted_rows(tables.read(store, "advantages", version=version, **where), "advantages")

    assert_frame_equal(rows(experiment="a", round=0), sorted_rows(new_a0, "advantages"))
    assert_frame_equal(rows(version=2, experiment="a", round=0), sorted_rows(a0, "advantages"))
    assert_frame_equal(rows(version=0), sorted_rows(a0, "advantages"))
    # the other experiment and the other round are untouched by the replace
    assert_frame_equal(rows(experiment="a", round=1), sorted_rows(a1, "advantages"))
    assert_frame_equal(rows(experiment="b", round=0), sorted_rows(b0, "advantages"))
    assert tables.read(store, "advantages").height == 12 + 6 + 9
    assert [tables.read(store, "advantages", version=v).height for v in range(4)] == [6, 12, 21, 27]
    # the commit records which partition it replaced
    history = tables.history(store, "advantages")
    assert [h["version"] for h in history] == [3, 2, 1, 0]
    assert json.loads(history[0]["asymre.partition"]) == {"experiment": "a", "round": 0}
    assert history[0]["operationParameters"]["predicate"] == "experiment = 'a' AND round = 0"
    with pytest.raises(ValueError, match="has no version 9 \\(latest is 3\\)"):
        tables.read(store, "advantages", version=9)


def test_partition_values_with_odd_characters_read_back_everywhere(store):
    names = ["my exp", "a=b", "x%y/z", "ü"]
    for i, name in enumerate(names):
        frame = train_set_frame(name, 0, n_prompts=1, G=i + 1)
        tables.write_partition(store, "train_set", frame, partition={"experiment": name, "round": 0})
    counts = dict(tables.read(store, "train_set").group_by("experiment").len().iter_rows())
    assert counts == {name: i + 1 for i, name in enumerate(names)}
    assert {name: tables.read(store, "train_set", experiment=name, round=0).height for name in names} == counts
    duck = dict(connect(store).sql("select experiment, count(*) from train_set group by 1").fetchall())
    assert duck == counts


# --- a writer killed mid-write ---------------------------------------------------------------------------

KILLED_WRITER = """
import sys
from frames import rollouts_frame
from storage import tables

delta_write = tables.write_deltalake

def announced_write(*args, **kwargs):  # says when delta-rs itself starts writing (conform is done by then)
    print("writing", flush=True)
    return delta_write(*args, **kwargs)

tables.write_deltalake = announced_write
frame = rollouts_frame("big", 0, n_prompts=12_500, G=8, max_tokens=512)  # 100k rows, ~220 MB in memory
tables.write_partition(sys.argv[1], "rollouts", frame, partition={"experiment": "big", "round": 0})
print("done", flush=True)
"""


@pytest.mark.slow
def test_writer_killed_mid_write_leaves_the_previous_version(store):
    small = rollouts_frame("big", 0, n_prompts=2, G=2)
    other = rollouts_frame("other", 0, n_prompts=1, G=2)
    tables.write_partition(store, "rollouts", small, partition={"experiment": "big", "round": 0})
    tables.write_partition(store, "rollouts", other, partition={"experiment": "other", "round": 0})
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, store], stdout=subprocess.PIPE, text=True, env=child_env(), cwd=REPO
    )
    try:
        assert child.stdout.readline().strip() == "writing"
        time.sleep(0.1)  # well inside the delta write of ~220 MB (seconds here; >0.1 s on any machine)
        child.send_signal(signal.SIGKILL)
        rest = child.stdout.read()
    finally:
        child.kill()
        child.wait()
    # What we verify about the kill: the child died of SIGKILL after it entered write_deltalake ('writing')
    # and before write_partition returned ('done'), and the table's version did not advance, so the kill
    # landed inside the delta-rs write, before its commit. Parquet files it may have left behind (delta-rs
    # stages them as `part-….parquet#1` near the end of a write) are not in the log and only in the partition
    # being written.
    assert child.returncode == -signal.SIGKILL
    assert "done" not in rest
    assert tables.version(store, "rollouts") == 1, "the big write committed before the kill: make it bigger"
    uri = Path(tables.table_uri(store, "rollouts"))
    committed = set(DeltaTable(str(uri)).file_uris())
    on_disk = {str(p) for p in uri.rglob("*.parquet*")}
    leftovers = on_disk - committed
    assert committed <= on_disk
    assert all("experiment=big" in p for p in leftovers), leftovers

    # readers see the previous version, with no error, in polars and DuckDB
    back = tables.read(store, "rollouts", experiment="big", round=0)
    assert_frame_equal(sorted_rows(back, "rollouts"), sorted_rows(small, "rollouts"))
    assert connect(store).sql("select count(*) from rollouts").fetchall() == [(6,)]
    # and the following write works and lands as the next version
    again = rollouts_frame("big", 0, n_prompts=3, G=2, seed=3)
    assert tables.write_partition(store, "rollouts", again, partition={"experiment": "big", "round": 0}) == 2
    assert tables.read(store, "rollouts", experiment="big").height == 6
    assert tables.read(store, "rollouts").height == 8


# --- concurrent writers ----------------------------------------------------------------------------------

CONCURRENT_WRITER = """
import json, sys, time
from pathlib import Path
from frames import rollouts_frame
from storage import tables

store, experiment, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
versions = []
for round in range(5):
    frame = rollouts_frame(experiment, round, n_prompts=round + 1, G=2, seed=round)
    partition = {"experiment": experiment, "round": round}
    versions.append(tables.write_partition(store, "rollouts", frame, partition=partition))
print(json.dumps(versions), flush=True)
"""


@pytest.mark.slow
def test_two_processes_write_different_experiments_at_once(store, tmp_path):
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_WRITER, store, experiment, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
            cwd=REPO,
        )
        for experiment in ("a", "b")
    ]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        go.touch()  # both are past their imports: start writing together
        outputs = [child.communicate(timeout=120) for child in children]
    finally:
        for child in children:
            child.kill()
    versions = {}
    for experiment, child, (out, err) in zip(("a", "b"), children, outputs):
        assert child.returncode == 0, err
        versions[experiment] = json.loads(out)
    rows = tables.read(store, "rollouts")
    per_round = {r: 2 * (r + 1) for r in range(5)}  # n_prompts = round + 1, G = 2
    counts = {(e, r): n for e, r, n in rows.group_by("experiment", "round").len().iter_rows()}
    assert counts == {(e, r): n for e in ("a", "b") for r, n in per_round.items()}
    assert tables.version(store, "rollouts") == 9  # ten commits, none lost
    # each write returned the version of its own commit, not the other writer's later one
    committed = {h["version"]: json.loads(h["asymre.partition"]) for h in tables.history(store, "rollouts")}
    returned = {v: {"experiment": e, "round": r} for e, vs in versions.items() for r, v in enumerate(vs)}
    assert returned == committed


def test_latest_handle_follows_other_writers_and_a_remade_table(store):
    """open_table keeps a per-process handle of each table's latest version: it must see commits made by
    another process, and a table deleted and written again at the same path must not read as the old one."""
    tables.write_partition(store, "rewards", rewards_frame("a", 0), partition={"experiment": "a", "round": 0})
    assert tables.version(store, "rewards") == 0
    assert tables.open_table(store, "rewards") is tables.open_table(store, "rewards")  # the held handle
    child = f"""
import sys; sys.path[:0] = {[str(TESTS), str(REPO)]!r}
from frames import rewards_frame
from storage import tables
tables.write_partition({store!r}, "rewards", rewards_frame("a", 1, n_prompts=3), partition={{"experiment": "a", "round": 1}})
"""
    subprocess.run([sys.executable, "-c", child], check=True, env=child_env(), cwd=REPO, timeout=120)
    assert tables.version(store, "rewards") == 1
    assert (
        tables.read(store, "rewards").height == rewards_frame("a", 0).height + rewards_frame("a", 1, n_prompts=3).height
    )

    shutil.rmtree(Path(store) / "tables" / "rewards")
    assert tables.open_table(store, "rewards") is None
    tables.write_partition(store, "rewards", rewards_frame("b", 0), partition={"experiment": "b", "round": 0})
    tables.write_partition(store, "rewards", rewards_frame("b", 1), partition={"experiment": "b", "round": 1})
    shutil.rmtree(Path(store) / "tables" / "rewards")  # remade again, now at a lower version than the handle's
    tables.write_partition(store, "rewards", rewards_frame("c", 0), partition={"experiment": "c", "round": 0})
    assert tables.version(store, "rewards") == 0
    assert tables.read(store, "rewards")["experiment"].unique().to_list() == ["c"]


def test_a_read_pinned_at_the_latest_version_reuses_the_held_handle(store, monkeypatch):
    """A flow reads each input at the version its StageRef names, usually the one just written: that read
    must cost what a latest read costs (no DeltaTable opened, so no log replay), and older versions,
    another process's newer commit and a remade table must still read right."""
    for r in range(3):
        tables.write_partition(
            store, "rewards", rewards_frame("a", r, seed=r), partition={"experiment": "a", "round": r}
        )
    latest = tables.version(store, "rewards")
    opened = []
    delta_table = tables.DeltaTable

    class CountingDeltaTable(delta_table):
        def __init__(self, *args, **kwargs):
            opened.append(kwargs.get("version"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tables, "DeltaTable", CountingDeltaTable)
    assert tables.open_table(store, "rewards", latest) is tables.open_table(store, "rewards")
    pinned = tables.read(store, "rewards", version=latest, experiment="a", round=1)
    assert_frame_equal(pinned, tables.read(store, "rewards", experiment="a", round=1))
    assert tables.files(store, "rewards", version=latest, where={"experiment": "a"}) == tables.files(store, "rewards")
    assert opened == []
    # an older version opens its own handle and reads as it was
    assert tables.read(store, "rewards", version=0)["round"].unique().to_list() == [0]
    assert opened == [0]
    assert tables.read(store, "rewards", version=latest).height == 3 * rewards_frame().height

    # another process commits: the held handle (still at `latest`) serves `latest`, the new version opens
    child = f"""
import sys; sys.path[:0] = {[str(TESTS), str(REPO)]!r}
from frames import rewards_frame
from storage import tables
tables.write_partition({store!r}, "rewards", rewards_frame("a", 0, seed=9, n_prompts=5), partition={{"experiment": "a", "round": 0}})
"""
    subprocess.run([sys.executable, "-c", child], check=True, env=child_env(), cwd=REPO, timeout=120)
    opened.clear()
    assert tables.read(store, "rewards", version=latest, experiment="a", round=0).height == rewards_frame().height
    assert opened == []
    assert tables.read(store, "rewards", version=latest + 1, experiment="a", round=0).height == 15
    assert tables.read(store, "rewards", experiment="a", round=0).height == 15

    # a table remade at the same path: its version 0 is not the old handle's
    shutil.rmtree(Path(store) / "tables" / "rewards")
    tables.write_partition(store, "rewards", rewards_frame("c", 0), partition={"experiment": "c", "round": 0})
    assert tables.read(store, "rewards", version=0)["experiment"].unique().to_list() == ["c"]


def test_a_pinned_read_is_not_moved_by_a_commit_while_it_reads(store):
    """The held handle moves on when this process opens the table's latest version (another thread's write,
    say) while a pinned read uses it: the read notices and reads its version on a handle of its own."""
    tables.write_partition(store, "rewards", rewards_frame("a", 0), partition={"experiment": "a", "round": 0})
    pinned = tables.version(store, "rewards")
    before = tables.files(store, "rewards", version=pinned)
    calls = []

    def use(dt):
        calls.append(dt.version())
        if len(calls) == 1:  # a commit lands in the middle of the read and the held handle follows it
            frame = rewards_frame("a", 1)
            tables.write_partition(store, "rewards", frame, partition={"experiment": "a", "round": 1})
            assert tables.open_table(store, "rewards") is dt
        return dt.file_uris()

    assert sorted(tables._at_version(store, "rewards", pinned, use)) == sorted(before)
    assert calls == [pinned, pinned]
    assert len(tables.files(store, "rewards")) == 2


def test_a_partition_read_opens_only_that_partitions_files(store):
    """read, files and the catalog's partition views select files by partition: the other partitions'
    files are never opened (here: they are gone from disk, and nothing notices)."""
    for experiment in ("a", "b"):
        for r in range(2):
            frame = rewards_frame(experiment, r, seed=r)
            tables.write_partition(store, "rewards", frame, partition={"experiment": experiment, "round": r})
    keep = set(tables.files(store, "rewards", where={"experiment": "a", "round": 1}))
    assert len(keep) == 1 and len(tables.files(store, "rewards")) == 4
    assert len(tables.files(store, "rewards", where={"experiment": "b", "round": [0, 1, 7], "sample_idx": 3})) == 2
    for path in set(tables.files(store, "rewards")) - keep:
        Path(path).unlink()
    assert_frame_equal(
        sorted_rows(tables.read(store, "rewards", experiment="a", round=1), "rewards"),
        sorted_rows(rewards_frame("a", 1, seed=1), "rewards"),
    )
    con = catalog.connect_partition(store, ["rewards"], {"experiment": "a", "round": 1})
    assert con.sql("select count(*) from rewards").fetchall() == [(rewards_frame().height,)]


# --- lineage ---------------------------------------------------------------------------------------------

CONFIG = {"baseline": "group_mean", "delta_v": -0.1}


def test_stage_key_changes_with_config_inputs_and_code_only():
    key = lineage.stage_key("advantages", CONFIG, ["kr", "kw"], "1")
    assert len(key) == 16 and int(key, 16) >= 0
    assert lineage.stage_key("advantages", dict(reversed(CONFIG.items())), ["kr", "kw"], "1") == key
    assert lineage.stage_key("advantages", dict(CONFIG), ("kr", "kw"), "1") == key
    changed = [
        lineage.stage_key("advantages", {**CONFIG, "delta_v": -0.2}, ["kr", "kw"], "1"),
        lineage.stage_key("advantages", {**CONFIG, "extra": 1}, ["kr", "kw"], "1"),
        lineage.stage_key("advantages", CONFIG, ["kr", "kw2"], "1"),
        lineage.stage_key("advantages", CONFIG, ["kr"], "1"),
        lineage.stage_key("advantages", CONFIG, ["kr", "kw"], "2"),
        lineage.stage_key("curation", CONFIG, ["kr", "kw"], "1"),
    ]
    assert key not in changed and len(set(changed)) == len(changed)


def _record(store, key, status="done", rows=6, round=0, stage="advantages"):
    lineage.record_run(
        store,
        experiment="a",
        round=round,
        stage=stage,
        key=key,
        config=CONFIG,
        code_version="1",
        rows=rows,
        wall_s=0.5,
        status=status,
        input_versions={"rewards": 0},
    )


def _done_with(store, key, round=0, experiment="a") -> bool:
    """What a flow asks before it skips a stage: its last finished run has `key` and the output carries it."""
    done = lineage.last_done(store, experiment, round, "advantages")
    if done is None or done["stage_key"] != key:
        return False
    where = {"experiment": experiment, "round": round}
    return lineage.output_holds(store, "advantages", where, key, empty_ok=done["rows"] == 0)


def test_last_done_and_output_holds_need_the_last_done_run_and_the_rows_to_carry_the_key(store):
    assert not _done_with(store, "K1")  # nothing yet
    tables.write_partition(
        store, "advantages", advantages_frame("a", 0), partition={"experiment": "a", "round": 0}, stage_key="K1"
    )
    assert not _done_with(store, "K1")  # rows but no recorded run
    _record(store, "K1")
    assert _done_with(store, "K1")
    assert not _done_with(store, "K2")
    assert not _done_with(store, "K1", round=1)  # other round
    assert not _done_with(store, "K1", experiment="b")  # other experiment

    _record(store, "K2", status="failed")  # a failed run does not undo the done one
    assert _done_with(store, "K1")

    # the partition is overwritten with another key's rows: K1 is no longer done, even by its own record
    tables.write_partition(
        store, "advantages", advantages_frame("a", 0), partition={"experiment": "a", "round": 0}, stage_key="K2"
    )
    assert not _done_with(store, "K1")
    assert not _done_with(store, "K2")  # written but not recorded as done
    _record(store, "K2")
    assert _done_with(store, "K2")
    assert not _done_with(store, "K1")

    # a run recorded as done whose partition holds no rows: done only if it wrote zero rows
    _record(store, "K3", round=1, rows=6)
    assert not _done_with(store, "K3", round=1)
    _record(store, "K4", round=2, rows=0)
    assert _done_with(store, "K4", round=2)

    runs = lineage.runs(store, "a")
    assert runs["stage_key"].to_list() == ["K1", "K2", "K2", "K3", "K4"]
    assert runs["status"].to_list() == ["done", "failed", "done", "done", "done"]
    assert json.loads(runs["config"][0]) == CONFIG and json.loads(runs["input_versions"][0]) == {"rewards": 0}
    assert runs["round"].dtype == pl.Int32


def test_stage_runs_are_compacted_as_they_grow_and_lose_nothing(store):
    n = 2 * lineage.COMPACT_EVERY + 5
    for i in range(n):
        _record(store, f"K{i}", round=i % 3)
    dt = tables.open_table(store, "stage_runs")
    assert len(dt.file_uris()) < lineage.COMPACT_EVERY  # one file per run without compaction
    runs = lineage.runs(store, "a")
    assert runs["stage_key"].to_list() == [f"K{i}" for i in range(n)]  # every row, in the order recorded
    assert lineage.last_done(store, "a", 1, "advantages")["stage_key"] == f"K{max(i for i in range(n) if i % 3 == 1)}"
    # compaction commits carry no data change: the version of the 10th run still reads its 10 rows
    assert any(h["operation"] == "OPTIMIZE" for h in tables.history(store, "stage_runs"))
    assert tables.read(store, "stage_runs", version=9).height == 10


def test_lineage_runs_cache_matches_the_table_and_sees_other_writers(store):
    """lineage.runs keeps this process's copy of stage_runs and extends it with its own appends; it must
    read exactly what a fresh read of the table gives, and notice a row another process appended."""

    def fresh() -> list[str]:
        frame = pl.from_arrow(tables.open_table(store, "stage_runs").to_pyarrow_dataset().to_table())
        return frame.filter(pl.col("experiment") == "a").sort("created_at")["stage_key"].to_list()

    for i in range(lineage.COMPACT_EVERY + 3):  # across one compaction
        _record(store, f"K{i}")
        assert lineage.runs(store, "a")["stage_key"].to_list() == fresh()
    assert_frame_equal(
        lineage.runs(store),
        pl.from_arrow(tables.open_table(store, "stage_runs").to_pyarrow_dataset().to_table()).sort("created_at"),
    )
    child = f"""
import sys; sys.path[:0] = {[str(REPO)]!r}
from storage import lineage
lineage.record_run({store!r}, experiment="a", round=0, stage="rewards", key="from-another-process", config={{}},
                   code_version="c", rows=1, wall_s=0.0, status="done")
"""
    subprocess.run([sys.executable, "-c", child], check=True, env=child_env(), cwd=REPO, timeout=120)
    assert lineage.runs(store, "a")["stage_key"].to_list()[-1] == "from-another-process"
    assert lineage.last_done(store, "a", 0, "rewards")["stage_key"] == "from-another-process"


def test_writes_leave_views_sql_to_write_views_sql(store):
    """tables writes and reads tables only: views.sql appears when a flow asks for it, after a stage."""
    views = Path(store) / "views.sql"
    tables.write_partition(store, "rewards", rewards_frame("a", 0), partition={"experiment": "a", "round": 0})
    _record(store, "K1")
    tables.compact(store, "stage_runs")
    assert not views.exists()
    assert catalog.write_views_sql(store) == views
    before = views.read_text()
    assert "/rewards/" in before and "/stage_runs/" in before and "/advantages/" not in before
    tables.write_partition(store, "advantages", advantages_frame("a", 0), partition={"experiment": "a", "round": 0})
    assert views.read_text() == before
    catalog.write_views_sql(store)
    assert "/advantages/" in views.read_text()


# --- checkpoints -----------------------------------------------------------------------------------------


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"hidden": 8}')
    (path / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (path / "sub").mkdir()
    (path / "sub" / "tokenizer.json").write_text("{}")
    return path


def test_checkpoint_register_lookup_verify(store):
    folder = _folder(checkpoints.checkpoint_dir(store, "a", 1))
    assert folder == Path(store) / "checkpoints" / "a" / "round=1"
    sha = checkpoints.folder_sha256(folder)
    assert checkpoints.folder_sha256(folder) == sha  # stable
    version = checkpoints.register(
        store, experiment="a", round=1, path=folder, parent_version=None, loss=0.5, stage_key="KT"
    )
    assert version == f"a/round=1@{sha[:12]}"
    row = checkpoints.lookup(store, "a", 1)
    assert row["policy_version"] == version and row["sha256"] == sha and row["path"] == str(folder)
    assert row["parent_version"] is None and row["loss"] == 0.5 and row["stage_key"] == "KT"
    assert checkpoints.verify(row)
    assert checkpoints.lookup(store, "a", 2) is None
    assert checkpoints.lookup(store, "b", 1) is None

    # one changed byte changes the hash and fails verification
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    assert checkpoints.folder_sha256(folder) != sha
    assert not checkpoints.verify(row)
    # so does a renamed file with the same bytes
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    assert checkpoints.folder_sha256(folder) == sha
    (folder / "sub" / "tokenizer.json").rename(folder / "sub" / "vocab.json")
    assert checkpoints.folder_sha256(folder) != sha

    # re-registering replaces the round's row; a missing folder looks up as None
    new_version = checkpoints.register(
        store, experiment="a", round=1, path=folder, parent_version=version, loss=None, stage_key="KT2"
    )
    assert new_version != version
    assert tables.read(store, "checkpoints").height == 1
    row = checkpoints.lookup(store, "a", 1)
    assert row["parent_version"] == version and row["loss"] is None and checkpoints.verify(row)
    for file in sorted(folder.rglob("*"), reverse=True):
        file.rmdir() if file.is_dir() else file.unlink()
    folder.rmdir()
    assert checkpoints.lookup(store, "a", 1) is None


def test_created_at_is_stored_as_utc_timestamp(store):
    frame = SMALL["checkpoints"]()
    tables.write_partition(store, "checkpoints", frame, partition=partition_of("checkpoints", frame))
    dt = DeltaTable(tables.table_uri(store, "checkpoints"))
    assert dt.to_pyarrow_dataset().schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert tables.read(store, "checkpoints")["created_at"].to_list() == frame["created_at"].to_list()
