"""Flow tests under one Prefect harness: a run killed inside training resumes to the same result as an
uninterrupted one, --from-stage recomputes only downstream stages, and stage_runs tells the story."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest
from frames import TINY

from flows.config import load_config
from storage import lineage, tables

DATA_TABLES = ["rollouts", "rewards", "advantages", "train_set", "evals"]

pytestmark = pytest.mark.slow


def tiny(store: Path, *extra: str):
    return load_config(None, [*TINY, f"store={store}", "name=tiny", *extra])


def api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def comparable(store: Path, table: str) -> pl.DataFrame:
    frame = tables.read(str(store), table)
    return frame.sort([c for c in ("round", "prompt_id", "sample_idx", "mode") if c in frame.columns])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prefect_harness):
    from flows.iterate import experiment_flow

    store = tmp_path_factory.mktemp("uninterrupted")
    summaries = experiment_flow(tiny(store))
    return store, summaries


def test_round_summaries_and_checks(uninterrupted):
    store, summaries = uninterrupted
    assert [s["round"] for s in summaries] == [0, 1]
    assert all(s["test_greedy"] is not None and s["mean_reward"] is not None for s in summaries)
    for table in DATA_TABLES:
        assert tables.read(str(store), table).height > 0, table
    # every check of every round passes on the stored data
    from storage.checks import run_checks

    for k in (0, 1):
        assert run_checks(str(store), experiment="tiny", round=k) == {}
    ckpts = tables.read(str(store), "checkpoints").sort("round")
    assert ckpts["round"].to_list() == [0, 1, 2]
    assert ckpts["parent_version"].to_list()[1:] == ckpts["policy_version"].to_list()[:2]


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import stages.train as train
    from flows.config import load_config
    from flows.iterate import experiment_flow

    original = train.train_round

    def killing(model, rows, config, **kw):
        if kw["round"] == 1:  # die inside the train stage of round 1, after its first optimizer step
            progress = kw.get("progress")
            def die(step, total, loss):
                os.kill(os.getpid(), signal.SIGKILL)
            kw["progress"] = die
        return original(model, rows, config, **kw)

    import flows.pipeline

    flows.pipeline.train_round = killing  # the name the train stage calls
    experiment_flow(load_config(None, sys.argv[1:]))
    """
)


def test_killed_in_training_resumes_to_identical_result(uninterrupted, tmp_path):
    from flows.iterate import experiment_flow

    reference, _ = uninterrupted
    store = tmp_path / "killed"
    env = {**os.environ, "PREFECT_API_URL": api_url()}
    args = [*TINY, f"store={store}", "name=tiny"]
    killed = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    runs = lineage.runs(str(store), "tiny")
    assert not runs.filter((pl.col("round") == 1) & (pl.col("stage") == "train")).height  # died before recording
    assert tables.read(str(store), "checkpoints").height == 2  # checkpoints 0 and 1 only: none for round 2

    experiment_flow(tiny(store))

    for table in [*DATA_TABLES, "train_steps", "checkpoints"]:
        drop = ["tokens_per_s", "created_at", "path"]
        left = comparable(store, table).drop(drop, strict=False)
        right = comparable(reference, table).drop(drop, strict=False)
        assert left.equals(right), table
    final = tables.read(str(store), "checkpoints", round=2).row(0, named=True)
    assert final["sha256"] == tables.read(str(reference), "checkpoints", round=2)["sha256"][0]

    rerun = lineage.runs(str(store), "tiny").filter(pl.col("created_at") > runs["created_at"].max())
    status = {(r["round"], r["stage"]): r["status"] for r in rerun.iter_rows(named=True)}
    for stage in ("base", "rollouts", "rewards", "advantages", "curation", "train"):
        assert status[(0, stage)] == "skipped", stage
    for stage in ("rollouts", "rewards", "advantages", "curation"):
        assert status[(1, stage)] == "skipped", stage
    assert status[(1, "train")] == "done"
    assert status[(2, "eval")] == "done"


def test_from_stage_recomputes_only_downstream(uninterrupted, tmp_path):
    import io
    import re
    import shutil

    from rich.console import Console

    from flows import progress
    from flows.iterate import experiment_flow
    from flows.materialize import Plan

    store = tmp_path / "copy"
    shutil.copytree(uninterrupted[0], store)
    before = lineage.runs(str(store), "tiny")["created_at"].max()
    old_rollouts = tables.version(str(store), "rollouts")

    shown = io.StringIO()  # what a user watching the recompute sees
    progress.use(progress.RichReporter(Console(file=shown)))
    try:
        experiment_flow(tiny(store, "advantage.delta_v=-0.3"), plan=Plan("advantages", 1))
    finally:
        progress.use(progress.Reporter())
    for stage in ("advantages", "curation"):  # stages without a bar of their own still say they ran
        assert re.search(rf"round 1: {stage} +\d+ rows", shown.getvalue()), shown.getvalue()

    rerun = lineage.runs(str(store), "tiny").filter(pl.col("created_at") > before)
    ran = {(r["round"], r["stage"]) for r in rerun.iter_rows(named=True) if r["status"] == "done"}
    assert ran == {(1, "advantages"), (1, "curation"), (1, "train"), (2, "eval")}
    assert tables.version(str(store), "rollouts") == old_rollouts  # no regeneration
    adv = tables.read(str(store), "advantages")
    assert set(adv.filter(pl.col("round") == 1)["delta_v"].to_list()) == {-0.3}
    assert set(adv.filter(pl.col("round") == 0)["delta_v"].to_list()) == {-0.1}


def test_cli_run_status_and_report(uninterrupted, tmp_path):
    """The real command continues a finished experiment (everything skipped) and prints its tables."""
    store, _ = uninterrupted
    env = {**os.environ, "PREFECT_API_URL": api_url()}
    sets = [a for s in TINY for a in ("--set", s)]
    done = subprocess.run(
        ["asymre", "run", *sets, "--set", "name=tiny", "--store", str(store)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped" in done.stderr and "round 1" in done.stderr
    assert (store / "reports" / "report.png").stat().st_size > 10_000
    assert "checkpoint 0 (μ_0): test greedy" in done.stdout and "base stored, eval stored" in done.stdout
    status = subprocess.run(["asymre", "status", "tiny", "--store", str(store)], capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100
    header = next(line for line in lines if line.startswith("stage "))
    row0 = next(line for line in lines if line.startswith("    0 "))
    assert row0[header.index(" rollouts") + 1 :].startswith("64 ")  # 16 prompts × 4 samples


def test_bad_config_fails_before_work(tmp_path):
    bad = subprocess.run(
        ["asymre", "run", "--set", "train.ratio_level=bogus", "--store", str(tmp_path)], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "train.ratio_level" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "tables").exists()


def test_config_errors_name_the_field():
    from flows.config import ConfigError

    for sets, needle in [
        (["rollout.samples_per_prompt=0"], "G must be"),
        (["advantage.delta_v=.nan"], "finite"),
        (["train.nope=1"], "unknown key"),
        (["train.batch_size=10", "train.micro_batch_size=4"], "multiple"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            load_config(None, sets)


def test_configs_folder_loads():
    for path in sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name == path.stem, path
    assert json.dumps(load_config(None).model_dump(mode="json"))


def test_round_subflows_run_without_their_own_heartbeat(monkeypatch):
    """experiment_flow calls each round's subflow with flow heartbeats off (Prefect 3.8 joins a thread
    that sleeps in 1 s steps at the end of every flow), unless the user asked for heartbeats."""
    from prefect.settings import get_current_settings

    from flows import iterate

    seen = []

    def fake_round(cfg, k, plan, checkpoint, prompts):
        seen.append(get_current_settings().flows.heartbeat_frequency)
        return checkpoint

    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    monkeypatch.setattr(iterate, "round_flow", fake_round)
    monkeypatch.setattr(iterate, "experiment_start", lambda run: (None, None))
    monkeypatch.setattr(iterate, "round_summary", lambda store, name, k, seconds: {"round": k})
    monkeypatch.setattr(iterate, "format_summary", lambda summary: "")
    cfg = load_config(None, [*TINY, "store=unused", "name=hb"])
    monkeypatch.setattr(iterate, "standing", lambda store, name, rounds: "")
    iterate.experiment_flow.fn(cfg, 2)  # the body alone: no Prefect engine needed to see the settings
    assert seen == [None, None]
    default = get_current_settings().flows.heartbeat_frequency
    assert default is not None  # outside the rounds, Prefect's own setting is untouched

    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(default))
    seen.clear()
    iterate.experiment_flow.fn(cfg, 1)
    assert seen == [default]
