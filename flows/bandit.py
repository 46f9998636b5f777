"""The AsymRE bandit study (paper §5.1) as a flow: limit policies over V (Figure 1b) and policy
iteration (Figure 2), as tables in the store with their figures and a printed summary."""

from __future__ import annotations

import numpy as np
import polars as pl
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from stages import bandit
from storage import catalog, object_store, tables

TASK = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="bandit-limits", **TASK)
def limits_table(store: str, name: str, seed: int, arms: int, grid: int) -> pl.DataFrame:
    r, logits = bandit.make_bandit(seed, arms)
    v_mu = float(bandit.value(bandit.softmax(logits), r))
    frame = bandit.limit_study(seed, arms, v_mu + np.linspace(-1.0, 0.3, grid))
    tables.write_partition(
        store, "bandit_limits", frame.with_columns(experiment=pl.lit(name)), partition={"experiment": name}
    )
    return frame


@task(name="bandit-iterations", **TASK)
def iterations_table(store: str, name: str, seed: int, arms: int, rounds: int, steps: int, batch: int) -> pl.DataFrame:
    exact = bandit.iteration_study(seed, arms, rounds=rounds, steps=steps)
    sampled = bandit.iteration_study(seed, arms, rounds=rounds, steps=steps, sampled_batch=batch)
    frame = pl.concat([exact, sampled]).with_columns(experiment=pl.lit(name))
    tables.write_partition(store, "bandit_iterations", frame, partition={"experiment": name})
    return frame


@flow(name="asymre-bandit", persist_result=False, validate_parameters=False)
def bandit_flow(
    store: str, seed: int = 0, arms: int = 100, grid: int = 41, rounds: int = 40, steps: int = 500, batch: int = 32
) -> dict:
    """Both studies for one reward draw; returns the summary and the figure paths."""
    name = f"bandit-seed{seed}-arms{arms}"
    limits = limits_table(store, name, seed, arms, grid)
    iterations = iterations_table(store, name, seed, arms, rounds, steps, batch)
    catalog.write_views_sql(store)
    reports = object_store.local_root(tables.resolve_store(store)) / "reports"  # on S3: here, then uploaded
    reports.mkdir(parents=True, exist_ok=True)
    bandit.plot_limits(limits, reports / f"{name}-limits.png")
    bandit.plot_iterations(iterations, reports / f"{name}-iterations.png")
    object_store.publish(
        tables.resolve_store(store), [reports / f"{name}-{f}.png" for f in ("limits", "iterations")], "reports"
    )
    return {
        **bandit.summary(limits),
        "experiment": name,
        "figures": [str(reports / f"{name}-limits.png"), str(reports / f"{name}-iterations.png")],
    }
