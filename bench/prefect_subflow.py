"""What one Prefect subflow costs a round, with and without its flow-run heartbeat thread.

    python bench/prefect_subflow.py [--reps 6] [--tasks 8]

Prefect 3.8's flow engine starts a heartbeat thread per flow run that sleeps in 1 s steps; when the run
ends it sets a stop flag and joins the thread, so every flow run waits up to a second for it. The round
flows of `experiment_flow` run without it (`flows/iterate.py`, `_round_heartbeats`). This times a subflow
holding `--tasks` no-op tasks (the shape of a round: one task per stage) both ways, alternating, inside
one parent flow on the ephemeral server, and prints the medians and their ratio. (At exit the ephemeral
server may log a cancelled event flush on stderr: its shutdown, not the measurement.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="asymre-bench-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from measure import print_machine, print_table
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings


@task(cache_policy=NO_CACHE, persist_result=False)
def stage(i: int) -> int:
    return i


@flow(persist_result=False, validate_parameters=False)
def round_like(n_tasks: int) -> int:
    return sum(stage(i) for i in range(n_tasks))


@flow(persist_result=False, validate_parameters=False)
def parent(reps: int, n_tasks: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"heartbeat (Prefect default)": [], "no heartbeat (asymre's rounds)": []}
    round_like(n_tasks)  # warm-up: first calls create the flow and task records
    for _ in range(reps):
        started = time.perf_counter()
        round_like(n_tasks)
        times["heartbeat (Prefect default)"].append(time.perf_counter() - started)
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            started = time.perf_counter()
            round_like(n_tasks)
            times["no heartbeat (asymre's rounds)"].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--tasks", type=int, default=8, help="no-op tasks in the subflow")
    args = parser.parse_args()
    print_machine()
    times = parent(args.reps, args.tasks)
    base = statistics.median(times["heartbeat (Prefect default)"])
    rows = [
        {
            "case": case,
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "ratio_to_default": statistics.median(ts) / base,
        }
        for case, ts in times.items()
    ]
    print(f"\n# one subflow with {args.tasks} no-op tasks, {args.reps} alternating repetitions")
    print_table(rows)


if __name__ == "__main__":
    main()
