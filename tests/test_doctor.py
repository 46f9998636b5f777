"""Damaged and moved stores: a checkpoint is verified against its registered hash before a stage uses it,
the registry's paths follow a store copied elsewhere, and `asymre check` lists what is wrong with a store."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from frames import TINY
from safetensors.numpy import save_file
from typer.testing import CliRunner

from flows.cli import app
from flows.config import load_config
from storage import checkpoints, lineage, tables
from storage.schemas import SCHEMAS

# ---- checkpoints: hash verified before use, paths relative to the store ---------------------------


def _checkpoint(store: str, experiment: str, round: int) -> Path:
    """A registered checkpoint folder with a real safetensors file (its header gives each tensor's length)."""
    folder = checkpoints.checkpoint_dir(store, experiment, round)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden": 8}')
    save_file({"w": np.arange(256, dtype=np.float32)}, str(folder / "model.safetensors"))
    checkpoints.register(
        store, experiment=experiment, round=round, path=folder, parent_version=None, loss=None, stage_key="K"
    )
    return folder


def test_registry_holds_paths_relative_to_the_store(tmp_path):
    store = str(tmp_path / "store")
    folder = _checkpoint(store, "a", 2)
    assert tables.read(store, "checkpoints")["path"].to_list() == ["checkpoints/a/round=2"]
    assert checkpoints.lookup(store, "a", 2)["path"] == str(folder)

    outside = tmp_path / "elsewhere"  # a folder outside the store keeps its absolute path
    outside.mkdir()
    assert checkpoints.stored_path(store, outside) == str(outside)

    # a row written before paths were relative: its absolute path is gone once the store moved
    moved = tmp_path / "moved"
    shutil.copytree(store, moved)
    shutil.rmtree(store)
    old = f"{store}/checkpoints/a/round=2"
    assert checkpoints.resolve_path(str(moved), old) == moved / "checkpoints" / "a" / "round=2"
    assert checkpoints.resolve_path(str(moved), "checkpoints/a/round=2") == moved / "checkpoints" / "a" / "round=2"
    assert checkpoints.lookup(str(moved), "a", 2)["path"] == str(moved / "checkpoints" / "a" / "round=2")


def _damaged(store: str, experiment: str, round: int) -> str:
    with pytest.raises(checkpoints.CheckpointDamaged) as caught:
        checkpoints.checked(store, experiment, round)
    return str(caught.value)


def test_a_damaged_checkpoint_is_refused_with_its_rebuild_command(tmp_path):
    store = str(tmp_path)
    folder = _checkpoint(store, "a", 3)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    assert checkpoints.checked(store, "a", 3)["path"] == str(folder)

    weights.write_bytes(good[:-100])  # truncated
    message = _damaged(store, "a", 3)
    assert "checkpoint 3 of experiment 'a'" in message and str(folder) in message
    assert "model.safetensors is truncated (100 bytes short" in message
    assert "`asymre run CONFIG --from-stage train --round 2`" in message
    with pytest.raises(checkpoints.CheckpointDamaged):
        checkpoints.lookup(store, "a", 3)  # what a stage gets its checkpoint through

    weights.write_bytes(good[:-4] + bytes(b ^ 0xFF for b in good[-4:]))  # other bytes, same size
    assert "content hash differs" in _damaged(store, "a", 3)

    weights.write_bytes(good)
    (folder / "config.json").unlink()
    assert "file config.json is missing" in _damaged(store, "a", 3)

    zero = _checkpoint(store, "a", 0)
    shutil.rmtree(zero)
    message = _damaged(store, "a", 0)
    assert "its folder is missing" in message and "--from-stage base --round 0" in message
    assert checkpoints.lookup(store, "a", 0) is None
    assert "not registered" in _damaged(store, "a", 7)


def test_a_checkpoint_is_hashed_once_while_its_files_stay_the_same(tmp_path, monkeypatch):
    store = str(tmp_path)
    folder = _checkpoint(store, "a", 1)  # registering hashed it
    hashed = []
    real = checkpoints.folder_sha256
    monkeypatch.setattr(checkpoints, "folder_sha256", lambda path: hashed.append(path) or real(path))
    for _ in range(5):
        checkpoints.lookup(store, "a", 1)
    assert hashed == []
    (folder / "config.json").write_text('{"hidden": 9}')  # same size, new mtime
    with pytest.raises(checkpoints.CheckpointDamaged):
        checkpoints.lookup(store, "a", 1)
    assert len(hashed) == 1


# ---- through the flow: one tiny round -------------------------------------------------------------


def tiny(store: Path, *extra: str):
    return load_config(None, [*TINY, f"store={store}", "name=tiny", "rounds=1", *extra])


@pytest.fixture(scope="module")
def one_round(tmp_path_factory, prefect_harness):
    from flows.iterate import experiment_flow

    store = tmp_path_factory.mktemp("one-round") / "store"
    experiment_flow(tiny(store))
    return store


def _copy(store: Path, to: Path) -> Path:
    shutil.copytree(store, to)
    return to


def _versions(store: Path) -> dict[str, int | None]:
    return {name: tables.version(str(store), name) for name in SCHEMAS}


@pytest.mark.slow
def test_a_moved_store_recomputes_the_same_rows(one_round, tmp_path):
    from flows.iterate import experiment_flow
    from flows.materialize import Plan

    original = _copy(one_round, tmp_path / "original")
    before = {t: tables.read(str(original), t) for t in ("rollouts", "rewards", "evals")}
    assert set(tables.read(str(original), "checkpoints")["path"]) == {
        "checkpoints/tiny/round=0",
        "checkpoints/tiny/round=1",
    }
    moved = _copy(original, tmp_path / "moved")
    shutil.rmtree(original)

    experiment_flow(tiny(moved), plan=Plan("rollouts", 0))

    runs = lineage.runs(str(moved), "tiny")
    assert runs.filter((pl.col("stage") == "rollouts") & (pl.col("status") == "done")).height == 2  # ran again
    key = ["round", "prompt_id", "sample_idx", "mode"]
    for table, rows in before.items():
        after = tables.read(str(moved), table)
        sort = [c for c in key if c in rows.columns]
        assert after.sort(sort).equals(rows.sort(sort)), table


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "same size"])
def test_the_stage_that_loads_a_damaged_checkpoint_fails_and_writes_nothing(one_round, tmp_path, damage):
    from flows.iterate import experiment_flow

    store = _copy(one_round, tmp_path / "store")
    weights = store / "checkpoints" / "tiny" / "round=1" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1000] if damage == "truncated" else data[:-8] + bytes(8))
    versions = _versions(store)
    started = lineage.runs(str(store), "tiny")["created_at"].max()

    with pytest.raises(checkpoints.CheckpointDamaged) as caught:
        experiment_flow(tiny(store, "rounds=2"))  # round 1 samples from checkpoint 1
    message = str(caught.value)
    assert f"checkpoint 1 of experiment 'tiny' ({weights.parent})" in message
    assert ("truncated (1000 bytes short" if damage == "truncated" else "content hash differs") in message
    assert "`asymre run CONFIG --from-stage train --round 0`" in message

    assert {t: v for t, v in _versions(store).items() if t != "stage_runs"} == {
        t: v for t, v in versions.items() if t != "stage_runs"
    }
    runs = lineage.runs(str(store), "tiny").filter(pl.col("created_at") > started)
    assert runs.filter(pl.col("status") == "done").is_empty()  # the rest of the rerun was skipped: nothing new
    failed = runs.filter(pl.col("status") == "failed")  # once per try: rollouts has Prefect retries
    assert set(failed["stage"]) == {"rollouts"} and set(failed["round"]) == {1}
    assert all("CheckpointDamaged" in m for m in failed["message"])


@pytest.mark.slow
def test_check_lists_every_problem_of_a_damaged_store(one_round, tmp_path):
    store = _copy(one_round, tmp_path / "store")
    runner = CliRunner()
    clean = runner.invoke(app, ["check", "--store", str(store)])
    assert clean.exit_code == 0, clean.output
    assert "2 checkpoints" in clean.output and clean.output.strip().endswith("no problems"), clean.output

    weights = store / "checkpoints" / "tiny" / "round=1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    deleted = Path(tables.files(str(store), "evals", where={"round": 1})[0].removeprefix("file://"))
    deleted.unlink()
    rewards = tables.read(str(store), "rewards", experiment="tiny", round=0)
    tables.write_partition(
        str(store), "rewards", rewards.drop("stage_key").with_columns(reward=pl.col("reward") + 5.0),
        partition={"experiment": "tiny", "round": 0}, stage_key=rewards["stage_key"][0],
    )  # fmt: skip

    damaged = runner.invoke(app, ["check", "--store", str(store)])
    assert damaged.exit_code == 1, damaged.output
    lines = damaged.output.strip().splitlines()
    assert lines[-1].endswith("3 problem(s)"), damaged.output
    problems = "\n".join(lines[:-1])
    assert f"checkpoint tiny round=1 ({weights.parent}): file model.safetensors is truncated" in problems
    assert "--from-stage train --round 0" in problems
    assert f"table evals (experiment=tiny round=1): data file {deleted.name} of version" in problems
    assert "is missing; rebuild with `asymre run CONFIG --from-stage eval --round 0`" in problems
    assert "check tiny round=0: reward_out_of_range returns" in problems
    assert "--from-stage rewards --round 0" in problems


def test_check_refuses_a_store_without_tables(tmp_path):
    result = CliRunner().invoke(app, ["check", "--store", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "holds no tables" in result.output


def test_check_reports_lineage_that_names_missing_versions(tmp_path):
    store = str(tmp_path)
    _checkpoint(store, "a", 0)
    checkpoints.register(
        store, experiment="a", round=1, path=_checkpoint(store, "b", 1), parent_version="a/round=0@gone",
        loss=None, stage_key="K",
    )  # fmt: skip
    lineage.record_run(
        store, experiment="a", round=0, stage="rollouts", key="K", config={}, code_version="c", rows=1, wall_s=0.0,
        status="done", output_version=5,
    )  # fmt: skip
    from storage.doctor import check_store

    report = check_store(store, {"rollouts": "checkpoints"})  # rollouts' output: a table that exists here
    messages = [str(p) for p in report.problems]
    assert any("names version 5 of checkpoints, which the table does not hold" in m for m in messages), messages
    assert any("trained from a/round=0@gone, which is no longer registered" in m for m in messages), messages
    assert len(messages) == 2, messages


def test_check_goes_on_past_a_table_that_cannot_be_opened(tmp_path):
    from storage.doctor import check_store

    store = str(tmp_path)
    _checkpoint(store, "a", 1)
    weights = Path(checkpoints.checked(store, "a", 1)["path"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    lineage.record_run(
        store, experiment="a", round=0, stage="rollouts", key="K", config={}, code_version="c", rows=1, wall_s=0.0,
        status="done", output_version=0,
    )  # fmt: skip
    log = Path(tables.table_uri(store, "stage_runs")) / "_delta_log" / f"{0:020d}.json"
    log.write_text(log.read_text()[:40])  # a truncated commit

    messages = [str(p) for p in check_store(store, {"rollouts": "rollouts"}).problems]
    assert messages[0].startswith("table stage_runs: cannot be opened"), messages
    assert any(m.startswith("checkpoint a round=1") and "truncated (10 bytes short" in m for m in messages), messages
    assert any(m.startswith("lineage stage_runs: not checked") for m in messages), messages
