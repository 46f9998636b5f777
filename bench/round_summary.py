"""round_summary over many rounds: 1M synthetic rollouts/rewards/advantages rows per round written to a
Delta store, then `storage.catalog.connect(store)` and the sql/views/round_summary.sql query timed apart,
and `storage.catalog.round_summaries` (the same query over one experiment's partitions: of every round,
`summaries`, and of the last one, `last_round`, as a flow asks after each round), at 1, 4, 10 and 16
rounds (target: the query under 1 s at 10 rounds = 10M rows per table).

    python bench/round_summary.py [--quick] [--reps N] [--rounds 1,4,10,16] [--prompts 62500]

Token lists are 1 id long (round_summary reads only scalar columns; this saves disk), every scalar column
is realistic. Each repetition opens a fresh connection (connect) and runs the view twice: `query_cold` is
the first query on that connection, `query_warm` the second. Baseline: the same aggregation in DuckDB
straight over the Parquet files' columns with no views (`direct`), and in polars over the scanned files
(both cover the rollouts/rewards/advantages columns: this store has no train_steps or evals).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import polars as pl
import synthetic
from measure import print_machine, print_table

VIEW = "select * from round_summary"


def write_round(store: str, k: int, n_prompts: int) -> float:
    from stages.advantage import advantages
    from stages.config import AdvantageConfig
    from storage import tables

    started = time.perf_counter()
    part = {"experiment": synthetic.EXPERIMENT, "round": k}
    rewards = synthetic.rewards(k, n_prompts)
    tables.write_partition(
        store, "rollouts", synthetic.rollouts(k, n_prompts, realistic=False), partition=part, stage_key="r"
    )
    tables.write_partition(store, "rewards", rewards, partition=part, stage_key="w")
    tables.write_partition(store, "advantages", advantages(rewards, AdvantageConfig()), partition=part, stage_key="a")
    return time.perf_counter() - started


def direct_sql(store: str) -> str:
    """round_summary's aggregation over the three tables' current Parquet files, without the catalog views."""
    from storage.tables import open_table

    def files(name: str) -> str:
        return "[" + ", ".join(f"'{f}'" for f in sorted(open_table(store, name).file_uris())) + "]"

    hp = "hive_partitioning = true, hive_types = {'experiment': VARCHAR, 'round': INTEGER}"
    return f"""
    with r as (select experiment, round, count(*) as rollouts, avg(num_tokens) as mean_completion_tokens
               from read_parquet({files("rollouts")}, {hp}) group by all),
         w as (select experiment, round, avg(reward) as mean_reward, avg((outcome = 'correct')::int) as share_correct
               from read_parquet({files("rewards")}, {hp}) group by all),
         a as (select experiment, round, avg(abs(advantage)) as mean_abs_advantage
               from read_parquet({files("advantages")}, {hp}) group by all)
    select * from r left join w using (experiment, round) left join a using (experiment, round)
    order by experiment, round"""


def polars_summary(store: str) -> pl.DataFrame:
    from storage.tables import open_table

    def scan(name: str, cols: list[str]) -> pl.LazyFrame:
        return pl.scan_parquet(sorted(open_table(store, name).file_uris()), hive_partitioning=True).select(cols)

    keys = ["experiment", "round"]
    r = (
        scan("rollouts", [*keys, "num_tokens"])
        .group_by(keys)
        .agg(pl.len().alias("rollouts"), pl.col("num_tokens").mean().alias("mean_completion_tokens"))
    )
    w = (
        scan("rewards", [*keys, "reward", "outcome"])
        .group_by(keys)
        .agg(
            pl.col("reward").mean().alias("mean_reward"), (pl.col("outcome") == "correct").mean().alias("share_correct")
        )
    )
    a = (
        scan("advantages", [*keys, "advantage"])
        .group_by(keys)
        .agg(pl.col("advantage").abs().mean().alias("mean_abs_advantage"))
    )
    return r.join(w, on=keys, how="left").join(a, on=keys, how="left").sort(keys).collect()


def measure(store: str, reps: int) -> dict[str, float]:
    import duckdb

    from storage.catalog import connect, round_summaries

    cases = ["connect", "query_cold", "query_warm", "summaries", "last_round", "direct", "polars"]
    times: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(reps):  # alternating: views, round_summaries, direct DuckDB, polars
        started = time.perf_counter()
        con = connect(store)
        times["connect"].append(time.perf_counter() - started)
        for key in ("query_cold", "query_warm"):
            started = time.perf_counter()
            out = con.sql(VIEW).fetchall()
            times[key].append(time.perf_counter() - started)
        con.close()
        started = time.perf_counter()
        rounds = round_summaries(store, synthetic.EXPERIMENT)
        times["summaries"].append(time.perf_counter() - started)
        started = time.perf_counter()
        round_summaries(store, synthetic.EXPERIMENT, [int(rounds["round"].max())])
        times["last_round"].append(time.perf_counter() - started)
        sql = direct_sql(store)
        raw = duckdb.connect()
        started = time.perf_counter()
        raw.sql(sql).fetchall()
        times["direct"].append(time.perf_counter() - started)
        raw.close()
        started = time.perf_counter()
        polars_summary(store)
        times["polars"].append(time.perf_counter() - started)
    result = {k: statistics.median(v) for k, v in times.items()}
    result["result_rows"] = len(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two repetitions (smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5, quick 2)")
    parser.add_argument("--rounds", default=None, help="comma-separated round counts to measure at")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per round (×16 rows; default 62500)")
    args = parser.parse_args()
    reps = args.reps or (2 if args.quick else 5)
    checkpoints = [int(x) for x in (args.rounds or ("1,4" if args.quick else "1,4,10,16")).split(",")]
    n_prompts = args.prompts or (250 if args.quick else 62_500)
    print_machine()
    store = tempfile.mkdtemp(prefix="asymre-bench-summary-")
    rows, write_s = [], []
    try:
        for k in range(max(checkpoints)):
            write_s.append(write_round(store, k, n_prompts))
            if k + 1 in checkpoints:
                m = measure(store, reps)
                rows.append({"rounds": k + 1, "rows_per_table": (k + 1) * n_prompts * 16, **m})
                print(f"{k + 1} rounds measured", flush=True)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    print(f"\nwrite: {statistics.median(write_s):.1f} s per round (3 tables, {n_prompts * 16:,} rows each; setup)")
    print("\n# round_summary (medians, seconds); target: query under 1 s at 10 rounds")
    print_table(rows)
    print("\n# growth (time at k rounds / time at the first)")
    print_table(
        [
            {"rounds": r["rounds"], "row_ratio": r["rounds"] / rows[0]["rounds"]}
            | {
                k: r[k] / rows[0][k]
                for k in ("connect", "query_cold", "query_warm", "summaries", "last_round", "direct", "polars")
            }
            for r in rows
        ]
    )


if __name__ == "__main__":
    main()
