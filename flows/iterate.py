"""Rounds 0..N−1 of an experiment, each a subflow; stages whose output already holds their
stage_key are skipped, so re-running continues where the experiment stands."""

from __future__ import annotations

import contextlib
import os
import time

import polars as pl
from prefect import flow
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows import progress
from flows.materialize import Plan
from flows.round import experiment_start, round_flow, task_runner
from stages.config import ExperimentConfig
from storage import catalog, lineage, tables
from storage.lineage import completed_rounds


@flow(name="asymre-experiment", flow_run_name="{cfg.name}", persist_result=False, validate_parameters=False)
def experiment_flow(cfg: ExperimentConfig, rounds: int | None = None, plan: Plan = Plan()) -> list[dict]:
    """Run (or continue) rounds 0..rounds−1 and return one summary per round."""
    rounds = cfg.rounds if rounds is None else rounds
    progress.REPORTER.line(standing(cfg.store, cfg.name, rounds))
    summaries = []
    prompts, checkpoint = experiment_start(task_runner(cfg, plan))
    for k in range(rounds):
        started = time.perf_counter()
        with _round_heartbeats():
            checkpoint = round_flow(cfg, k, plan, checkpoint, prompts)
        seconds = time.perf_counter() - started
        if k == 0:  # round 0's subflow also evaluates checkpoint 0, which belongs to the start (see start_line)
            seconds -= this_run_seconds(cfg.store, cfg.name, "eval", 0) or 0.0
        summaries.append(round_summary(cfg.store, cfg.name, k, seconds))
        progress.REPORTER.line(format_summary(summaries[-1]))
    return summaries


def _round_heartbeats():
    """Round subflows run without a heartbeat thread of their own unless the user sets
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY: the experiment flow around them keeps its heartbeat (what tells a
    server that the process is alive), and Prefect 3.8's heartbeat thread sleeps in 1 s steps and is
    joined when its flow ends, which added a second or more to every round (bench/RESULTS.md §7)."""
    if "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" in os.environ:
        return contextlib.nullcontext()
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def standing(store: str, experiment: str, rounds: int) -> str:
    done = completed_rounds(store, experiment)
    if done == 0:
        return f"experiment {experiment}: new; running rounds 0..{rounds - 1}"
    if done >= rounds:
        return f"experiment {experiment}: rounds 0..{done - 1} complete (stage_runs); checking their keys"
    return f"experiment {experiment}: rounds 0..{done - 1} complete (stage_runs); continuing at round {done}"


def checkpoint_accuracy(store: str, experiment: str, k: int) -> tuple[float | None, float | None]:
    """Greedy and sampled test accuracy of checkpoint k (None where not evaluated)."""
    evals = tables.read(store, "evals", experiment=experiment, round=k, columns=["mode", "correct"])

    def accuracy(mode: str) -> float | None:
        picked = evals.filter(pl.col("mode") == mode)["correct"]
        return float(picked.mean()) if picked.len() else None

    return accuracy("greedy"), accuracy("sampled")


def round_summary(store: str, experiment: str, k: int, seconds: float) -> dict:
    """Round k in numbers (the round_summary view: μ_k's reward on its prompts, test accuracy of μ_{k+1},
    p and p̃) and its wall time."""
    rows = catalog.round_summaries(store, experiment, [k]).to_dicts()
    return {"experiment": experiment, "round": k, **(rows[0] if rows else {}), "seconds": seconds}


def this_run_seconds(store: str, experiment: str, stage: str, k: int) -> float | None:
    """Wall time of the last run of `stage` in round k if it computed (None: it was skipped, its output
    stored, or it never ran)."""
    runs = lineage.runs(store, experiment).filter((pl.col("stage") == stage) & (pl.col("round") == k))
    if runs.is_empty():
        return None
    last = runs.sort("created_at").row(-1, named=True)
    return float(last["wall_s"]) if last["status"] == "done" else None


def start_line(store: str, experiment: str) -> str | None:
    """Checkpoint 0 (μ_0) in one line: its test accuracy and what this run spent on it (the warm start and
    its evaluation, which no round's time includes). None before checkpoint 0 is evaluated."""
    greedy, sampled = checkpoint_accuracy(store, experiment, 0)
    if greedy is None:
        return None
    spent = [
        f"{what} {progress.duration(s)}" if s is not None else f"{what} stored"
        for what, s in (("base", this_run_seconds(store, experiment, "base", 0)),
                        ("eval", this_run_seconds(store, experiment, "eval", 0)))
    ]  # fmt: skip
    accuracy = f"test greedy {greedy:.3f}" + (f", T=1 {sampled:.3f}" if sampled is not None else "")
    return f"checkpoint 0 (μ_0): {accuracy}; {', '.join(spent)}"


def _fmt(value: float | None, spec: str = ".3f") -> str:
    shown = format(value, spec) if value is not None else "–"
    return shown.rjust(len(format(0.0, spec)))


def format_summary(s: dict) -> str:
    """One round in one line of at most 80 columns (round numbers below 1000, rewards down to −9.999), which
    an 80-column terminal does not wrap: p and p̃ at two decimals (the final table shows three)."""
    return (
        f"round {s['round']}: train reward {_fmt(s.get('mean_reward'))}  "
        f"test greedy {_fmt(s.get('test_greedy'))} T=1 {_fmt(s.get('test_sampled'))}  "
        f"p {_fmt(s.get('p'), '.2f')} p̃ {_fmt(s.get('p_eff'), '.2f')}  {progress.duration(s['seconds'])}"
    )
