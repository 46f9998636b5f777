"""What a user reads: `asymre --version`, `run --help`'s stage names, `asymre status` within 100 columns in
the stage/table vocabulary, the per-round line within 80, a line for stages that draw no bar, the warm-start
bar ending where it stopped, round 0's time without checkpoint 0's, and the report naming the rounds whose
config differs from round 0's. Stores are written by the tests (stage_runs rows, a few evals)."""

from __future__ import annotations

import io
import json
import re
import types
from importlib.metadata import version

import polars as pl
import pytest
from frames import evals_frame
from rich.cells import cell_len
from rich.console import Console
from typer.testing import CliRunner

from flows import iterate, progress
from flows.cli import app
from storage import lineage, tables

CLI = CliRunner()

CONFIGS = {  # what each stage's stage_runs row records (Settings.as_dict), shortened
    "prompts": {"prompts": {"n_train": 300}, "seed": 0},
    "base": {"model": {"name": "builtin:tiny", "warm_start_steps": 1000}, "seed": 0},
    "rollouts": {"rollout": {"samples_per_prompt": 8, "temperature": 1.0}, "seed": 0},
    "rewards": {"reward": {"verifier": "numeric"}, "seed": 0},
    "advantages": {"advantage": {"delta_v": -0.1, "mode": "group_mean"}},
    "curation": {"curation": {"rule": "all"}},
    "train": {"train": {"lr": 3e-5}, "rollout": {"temperature": 1.0}, "seed": 0},
    "eval": {"eval": {"sampled": 1}, "rollout": {"temperature": 1.0}, "seed": 0},
}


def record(store, experiment: str, k: int, stage: str, *, config=None, rows=64, wall=1.5, status="done", msg=None):
    lineage.record_run(
        str(store), experiment=experiment, round=k, stage=stage, key=f"{stage[:4]}{k:04d}feedbeef",
        config=CONFIGS[stage] if config is None else config, code_version="c0", rows=rows, wall_s=wall,
        status=status, message=msg,
    )  # fmt: skip


def experiment_runs(store, experiment: str, rounds: int, changed_from: int | None = None, delta_v: float = 0.0):
    """stage_runs as a run of `rounds` rounds writes them; with `changed_from`, advantages of that round on
    recomputed with advantage.delta_v = `delta_v`, as `--from-stage advantages --round k --set …` does."""
    record(store, experiment, 0, "prompts", rows=324, wall=0.1)
    record(store, experiment, 0, "base", rows=1, wall=75.2)
    record(store, experiment, 0, "eval", rows=1000, wall=3.1)
    for k in range(rounds):
        for stage in ("rollouts", "rewards", "advantages", "curation", "train"):
            record(store, experiment, k, stage, rows=4096 if stage != "train" else 8, wall=12.5)
        record(store, experiment, k + 1, "eval", rows=1000, wall=3.1)
    if changed_from is not None:
        changed = {"advantage": {"delta_v": delta_v, "mode": "group_mean"}}
        for k in range(changed_from):  # what --from-stage records for the rounds it reuses: ignored
            record(store, experiment, k, "advantages", config=changed, status="skipped")
        for k in range(changed_from, rounds):
            record(store, experiment, k, "advantages", config=changed, rows=4096, wall=0.2)
            for stage in ("curation", "train"):
                record(store, experiment, k, stage, rows=4096 if stage != "train" else 8, wall=12.5)
            record(store, experiment, k + 1, "eval", rows=1000, wall=3.1)


# ---- --version, --help --------------------------------------------------------------------------


def test_version_prints_the_package_version():
    result = CLI.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"asymre {version('asymre')}\n"


def test_run_help_lists_the_from_stage_choices():
    from flows.pipeline import STAGES

    result = CLI.invoke(app, ["run", "--help"], env={"COLUMNS": "300"}, terminal_width=300)
    assert result.exit_code == 0
    line = next(li for li in result.output.splitlines() if li.lstrip("│ ").startswith("--from-stage"))
    named = re.findall(r"[a-z]+", line.split("upstream:", 1)[1])
    assert [n for n in named if n != "or"] == STAGES


# ---- asymre status ------------------------------------------------------------------------------


def test_status_fits_100_columns_in_the_stage_and_table_names(tmp_path):
    experiment_runs(tmp_path, "default", rounds=12)
    record(tmp_path, "default", 11, "rollouts", rows=250_000, wall=5400.0)  # a long GPU round still fits
    record(tmp_path, "default", 12, "eval", status="failed", msg="RuntimeError: CUDA out of memory\nmore", wall=9.0)
    result = CLI.invoke(app, ["status", "default", "--store", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(cell_len(li) for li in lines) <= 100, "\n".join(li for li in lines if cell_len(li) > 100)
    stage_row = next(li for li in lines if li.startswith("stage "))
    table_row = next(li for li in lines if li.startswith("table "))
    from flows.pipeline import STAGES

    assert stage_row.split()[1:] == STAGES  # the names --from-stage takes
    assert table_row.split()[1:] == [
        "prompts", "checkpoints", "rollouts", "rewards", "advantages", "train_set", "train_steps", "evals"
    ]  # fmt: skip
    # each column starts where its stage name does
    col = {s: stage_row.index(f" {s}") + 1 for s in STAGES}
    row0 = next(li for li in lines if li.startswith("    0 "))
    assert row0[col["base"] :].startswith("1 75s ") and row0[col["rollouts"] :].startswith("4096 12s ")
    row11 = next(li for li in lines if li.startswith("   11 "))
    assert row11[col["rollouts"] :].startswith("250k 90m")
    row12 = next(li for li in lines if li.startswith("   12 "))
    assert row12[col["eval"] :].startswith("FAILED") and row12[col["rollouts"] :].startswith("·")
    assert "round 12 eval failed: RuntimeError: CUDA out of memory" in result.output
    assert "feedbeef" not in result.output and "rol0000f" not in result.output  # keys only with --keys

    keyed = CLI.invoke(app, ["status", "default", "--keys", "--store", str(tmp_path)])
    assert keyed.exit_code == 0
    assert max(cell_len(li) for li in keyed.output.splitlines()) <= 100
    key_row = keyed.output.splitlines()[keyed.output.splitlines().index(row0) + 1]
    assert key_row.split()[:3] == ["key", "prom0000", "base0000"]


# ---- progress -----------------------------------------------------------------------------------


def test_round_line_fits_80_columns():
    worst = {"round": 999, "mean_reward": -0.125, "test_greedy": 1.0, "test_sampled": 0.999, "p": 1.0, "p_eff": 1.0}
    for seconds, shown in [(9.94, "9.9s"), (12.6, "13s"), (412.0, "412s"), (5000.0, "83m"), (7200.0, "2.0h")]:
        line = iterate.format_summary({**worst, "seconds": seconds})
        assert cell_len(line) <= 80, line
        assert line.endswith(f"  {shown}")
    line = iterate.format_summary({"round": 3, "mean_reward": 0.2125, "test_greedy": 0.31, "seconds": 13.25})
    assert line.startswith("round 3: train reward 0.212  test greedy 0.310 T=1     –")


def reporter(terminal: bool) -> tuple[progress.RichReporter, io.StringIO]:
    out = io.StringIO()
    return progress.RichReporter(Console(file=out, force_terminal=terminal, width=100)), out


@pytest.mark.parametrize("terminal", [False, True])
def test_a_stage_without_a_bar_gets_one_line(terminal):
    r, out = reporter(terminal)
    with r.running("round 3: advantages") as ran:
        ran(4096)
    with r.running("round 3: rollouts") as ran, r.stage("round 3: rollouts", 64) as bar:
        bar(64)
        ran(64)
    text = out.getvalue()
    assert re.search(r"round 3: advantages +4096 rows +\d+\.\ds", text)
    assert text.count("round 3: rollouts") == (1 if not terminal else text.count("round 3: rollouts"))
    assert "64 rows" not in text  # the bar said it; no second line


def test_warm_start_bar_ends_at_the_step_it_stopped(monkeypatch):
    import stages.models as models
    from stages.config import ModelConfig, PromptsConfig
    from stages.prompts import builtin_prompts

    seen = iter([0.0, 0.3])  # held-out accuracy at the two checks: the target is reached at the second
    monkeypatch.setattr(models, "greedy_exact_match", lambda model, batch: next(seen))
    prompts = builtin_prompts(PromptsConfig(n_train=200, n_test=10), seed=0).filter(pl.col("split") == "train")
    tok = models.build_tiny_tokenizer()
    config = ModelConfig(warm_start_steps=1000, warm_start_batch_size=4, warm_start_target=0.25)
    r, out = reporter(terminal=False)
    with r.stage("warm start", config.warm_start_steps) as bar:
        stats = models.warm_start(
            models.build_tiny_model(tok, seed=0), tok, prompts, config, "Q: {question} A:", False, 0, "cpu",
            lambda step, n, loss: bar(step, n, f"loss {loss:.3f}"),
        )  # fmt: skip
    stopped = 2 * models.CHECK_EVERY
    assert stats["steps"] == stopped
    assert f"{stopped}/{stopped}" in out.getvalue() and "/1000" not in out.getvalue()


def test_round_zero_time_leaves_out_checkpoint_zero(tmp_path, monkeypatch):
    """Round 0's subflow also evaluates checkpoint 0; that time goes to the start line, not to round 0."""
    from flows.config import load_config

    clock = iter([0.0, 130.0, 200.0, 290.0])  # round 0 took 130 s in all, round 1 90 s
    monkeypatch.setattr(iterate, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))

    def fake_round(cfg, k, plan, checkpoint, prompts):
        if k == 0:
            record(tmp_path, "t", 0, "eval", rows=48, wall=40.0)
        return checkpoint

    monkeypatch.setattr(iterate, "round_flow", fake_round)
    monkeypatch.setattr(iterate, "experiment_start", lambda run: (None, None))
    monkeypatch.setattr(iterate, "standing", lambda store, name, rounds: "")
    monkeypatch.setattr(iterate, "round_summary", lambda store, name, k, seconds: {"round": k, "seconds": seconds})
    cfg = load_config(None, [f"store={tmp_path}", "name=t"])
    summaries = iterate.experiment_flow.fn(cfg, 2)
    assert [s["seconds"] for s in summaries] == [90.0, 90.0]

    record(tmp_path, "t", 0, "base", rows=1, wall=75.2)
    tables.write_partition(
        str(tmp_path), "evals", evals_frame("t", 0, n_prompts=4), partition={"experiment": "t", "round": 0}
    )
    line = iterate.start_line(str(tmp_path), "t")
    assert line.startswith("checkpoint 0 (μ_0): test greedy ") and line.endswith("; base 75s, eval 40s")
    record(tmp_path, "t", 0, "base", rows=1, wall=0.0, status="skipped")  # a later run found it stored
    assert iterate.start_line(str(tmp_path), "t").endswith("; base stored, eval 40s")


# ---- the report ---------------------------------------------------------------------------------


def evals_for(store, experiment: str, rounds: int) -> None:
    for k in range(rounds + 1):
        frame = pl.concat([evals_frame(experiment, k, seed=k), evals_frame(experiment, k, seed=k, mode="sampled")])
        tables.write_partition(str(store), "evals", frame, partition={"experiment": experiment, "round": k})


def test_report_names_the_rounds_whose_config_differs(tmp_path):
    from flows.report import config_changes, write_report

    experiment_runs(tmp_path, "default", rounds=6, changed_from=3, delta_v=0.0)
    experiment_runs(tmp_path, "steady", rounds=2)
    evals_for(tmp_path, "default", 6)
    evals_for(tmp_path, "steady", 2)

    changes = config_changes(str(tmp_path), "default")
    assert changes == [
        {"field": "advantage.delta_v", "before": "-0.1", "after": "0.0", "round": 3, "stage": "advantages",
         "rounds": [3, 4, 5]},
    ]  # fmt: skip
    assert config_changes(str(tmp_path), "steady") == []

    _, md = write_report(str(tmp_path))
    text = md.read_text()
    default, steady = text.split("## default", 1)[1].split("## steady")
    assert "Not one config throughout" in default
    assert "- rounds 3–5: `advantage.delta_v` -0.1 → 0.0 (from stage advantages of round 3 on" in default
    assert "--from-stage advantages --round 3" in default
    assert "Not one config throughout" not in steady


def test_report_config_change_read_by_several_stages_starts_at_the_first(tmp_path):
    """A field read by rollouts, train and eval (rollout.temperature) changed from round 2's rollouts on:
    one entry, rounds 2–3, first seen in rollouts; checkpoint k+1's evaluation counts as round k."""
    from flows.report import config_changes

    experiment_runs(tmp_path, "hot", rounds=4)
    hot = {s: json.loads(json.dumps(CONFIGS[s]).replace('"temperature": 1.0', '"temperature": 0.7'))
           for s in ("rollouts", "train", "eval")}  # fmt: skip
    for k in (2, 3):
        record(tmp_path, "hot", k, "rollouts", config=hot["rollouts"])
        record(tmp_path, "hot", k, "train", config=hot["train"])
        record(tmp_path, "hot", k + 1, "eval", config=hot["eval"])
    assert config_changes(str(tmp_path), "hot") == [
        {"field": "rollout.temperature", "before": "1.0", "after": "0.7", "round": 2, "stage": "rollouts",
         "rounds": [2, 3]},
    ]  # fmt: skip
