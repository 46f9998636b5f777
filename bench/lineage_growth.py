"""Lineage growth: what each stage's bookkeeping costs as `stage_runs` fills up. Every stage run appends one
row as one Delta commit (one small Parquet file), and every stage starts with lineage.last_done, which
reads the whole experiment partition of stage_runs; so the per-stage cost grows with the history.

    python bench/lineage_growth.py [--quick] [--runs 25,100,200,400] [--reps N]

At each history length: last_done, record_run (one commit), catalog.connect and write_views_sql (which a
flow calls once per stage), medians of `reps`; then the same after compacting stage_runs
(DeltaTable.optimize.compact(), one file), the fix this benchmark argues for. A default round runs ~8 stages
(so ~8 × (last_done + record_run + write_views_sql)); `asymre run` on a finished experiment records one
`skipped` row per stage and round, so resumes add up.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from measure import print_machine, print_table


def record(store: str, k: int, stage: str = "rollouts") -> None:
    from storage import lineage

    lineage.record_run(
        store, experiment="bench", round=k // 8, stage=stage, key=f"{k:016x}", config={"lr": 1e-4},
        code_version="0123456789ab", rows=4096, wall_s=1.0, status="done",
    )  # fmt: skip


def timings(store: str, reps: int) -> dict[str, float]:
    from storage import catalog, lineage

    ops = {
        "last_done": lambda: lineage.last_done(store, "bench", 0, "rollouts"),
        "record_run": lambda: record(store, 0, "probe"),
        "connect": lambda: catalog.connect(store).close(),
        "views_sql": lambda: catalog.write_views_sql(store),
    }
    out: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(reps):  # A B C D alternating
        for name, op in ops.items():
            started = time.perf_counter()
            op()
            out[name].append(time.perf_counter() - started)
    return {name: statistics.median(v) for name, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short history, two repetitions (smoke test)")
    parser.add_argument("--runs", default=None, help="comma-separated history lengths (stage_runs rows)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per measurement (default 5, quick 2)")
    args = parser.parse_args()
    from deltalake import DeltaTable

    reps = args.reps or (2 if args.quick else 5)
    marks = [int(x) for x in (args.runs or ("10,40" if args.quick else "25,100,200,400")).split(",")]
    print_machine()
    store = tempfile.mkdtemp(prefix="asymre-bench-lineage-")
    rows = []
    try:
        written = 0
        for mark in marks:
            while written < mark:
                record(store, written)
                written += 1
            uri = str(Path(store) / "tables" / "stage_runs")
            files = len(DeltaTable(uri).file_uris())
            rows.append(
                {"stage_runs": written + reps * len(rows), "files": files, "compacted": False, **timings(store, reps)}
            )
        DeltaTable(uri).optimize.compact()
        files = len(DeltaTable(uri).file_uris())
        rows.append(
            {"stage_runs": rows[-1]["stage_runs"] + reps, "files": files, "compacted": True, **timings(store, reps)}
        )
    finally:
        shutil.rmtree(store, ignore_errors=True)
    for r in rows:
        r["est_per_round_s"] = 8 * (r["last_done"] + r["record_run"] + r["views_sql"])
    print(
        "\n# lineage bookkeeping vs history length (medians, seconds); "
        "est_per_round_s = 8 × (last_done + record_run + views_sql)"
    )
    print_table(rows)


if __name__ == "__main__":
    main()
