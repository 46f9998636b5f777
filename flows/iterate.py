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
        summaries.append(round_summary(cfg.store, cfg.name, k, time.perf_counter() - started))
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


def completed_rounds(store: str, experiment: str) -> int:
    """Rounds whose last stage (eval of the next checkpoint) finished, by stage_runs."""
    done = lineage.runs(store, experiment).filter((pl.col("stage") == "eval") & (pl.col("status") == "done"))
    return int(done["round"].max()) if done.height else 0


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


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "  –  " if value is None else format(value, spec)


def format_summary(s: dict) -> str:
    return (
        f"[bold]round {s['round']}[/bold]  train reward {_fmt(s.get('mean_reward'))}  "
        f"test acc (greedy) {_fmt(s.get('test_greedy'))}  sampled {_fmt(s.get('test_sampled'))}  "
        f"p {_fmt(s.get('p'))}  p̃ {_fmt(s.get('p_eff'))}  {s['seconds']:.1f}s"
    )
