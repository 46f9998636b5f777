"""Data stages: advantages + curation + their data checks over synthetic rounds (16 samples per prompt,
realistic token lists) written to a Delta store, against the same computation done directly in polars
on in-memory frames; seconds, peak memory, the ratio, and how both grow with rows (1×, 4×, 16×).

    python bench/data_stages.py [--quick] [--reps N] [--prompts 3906,15625,62500] [--profile]

Pipeline path (as the flows run them): read rewards → advantages() → write_partition → run_checks →
write_views_sql; read rewards + rollouts' meta columns → curate() → write_partition → run_checks →
write_views_sql. Baseline: the same outputs from polars expressions on frames already in memory (loading
them is not timed), plus the same checks (duplicate keys over rollouts/rewards/advantages/train_set,
non-finite advantages). Every measurement is a fresh child process with the libraries imported before the
clock starts (as in a long-lived flow process); peak memory is its VmHWM (`peak_mb`, imports included) and
that peak above the RSS right after the imports (`above_imports_mb`: for the baseline, the loaded frames +
the work). The baseline's outputs are compared with what the pipeline stored (`equal`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import polars as pl
import synthetic
from measure import alternate, child, current_rss_mb, median, peak_rss_mb, print_machine, print_table, reset_peak

KEYS = ["experiment", "round", "prompt_id", "sample_idx"]
GROUP = ["experiment", "round", "prompt_id"]
META = ["experiment", "round", "prompt_id", "sample_idx", "num_tokens", "finish_reason"]
PARTITION = {"experiment": synthetic.EXPERIMENT, "round": 0}


def build_store(store: str, n_prompts: int) -> dict[str, float]:
    """Write one round's rollouts and rewards (16 samples per prompt); returns the setup times."""
    from storage import tables

    out = {}
    started = time.perf_counter()
    rollouts = synthetic.rollouts(0, n_prompts)
    rewards = synthetic.rewards(0, n_prompts)
    out["synthesise_s"] = time.perf_counter() - started
    started = time.perf_counter()
    tables.write_partition(store, "rollouts", rollouts, partition=PARTITION, stage_key="rollouts")
    out["write_rollouts_s"] = time.perf_counter() - started
    started = time.perf_counter()
    tables.write_partition(store, "rewards", rewards, partition=PARTITION, stage_key="rewards")
    out["write_rewards_s"] = time.perf_counter() - started
    return out


# ---------------------------------------------------------------- the pipeline path


def pipeline(store: str) -> dict[str, float]:
    """The two stages as the round runs them, with read/compute/write/views.sql/checks timed apart."""
    from stages.advantage import advantages
    from stages.config import AdvantageConfig, CurationConfig
    from stages.curate import curate
    from storage import catalog, tables
    from storage.checks import run_checks

    spent: dict[str, float] = defaultdict(float)

    def step(name, fn, *args, **kw):
        started = time.perf_counter()
        result = fn(*args, **kw)
        spent[name] += time.perf_counter() - started
        return result

    where = dict(PARTITION)
    rewards = step("read", tables.read, store, "rewards", **where)
    adv = step("compute", advantages, rewards, AdvantageConfig())
    step("write", tables.write_partition, store, "advantages", adv, partition=PARTITION, stage_key="advantages")
    step("checks", run_checks, store, tables=["advantages"], available=["rollouts", "rewards"], **where)
    step("views_sql", catalog.write_views_sql, store)  # once after each stage's commits, as the flows do
    rewards = step("read", tables.read, store, "rewards", **where)
    meta = step("read", tables.read, store, "rollouts", columns=META, **where)
    train_set = step("compute", curate, rewards, meta, CurationConfig())
    step("write", tables.write_partition, store, "train_set", train_set, partition=PARTITION, stage_key="curation")
    step("checks", run_checks, store, tables=["train_set"], available=["rollouts", "rewards", "advantages"], **where)
    step("views_sql", catalog.write_views_sql, store)
    return dict(spent)


# ---------------------------------------------------------------- the same computation in polars


def polars_advantages(rewards: pl.DataFrame, mode: str, delta_v: float, constant: float) -> pl.DataFrame:
    """sql/advantages.sql as polars expressions."""
    group_size = pl.len().over(GROUP).cast(pl.Int32)
    group_mean = pl.col("reward").mean().over(GROUP)
    batch_mean = pl.col("reward").mean().over("experiment", "round")
    if mode == "constant":
        baseline, dv, used = pl.lit(constant), 0.0, pl.lit(mode)
    elif mode == "batch_mean":
        baseline, dv, used = batch_mean + delta_v, delta_v, pl.lit(mode)
    else:
        single = group_size == 1
        baseline = pl.when(single).then(batch_mean).otherwise(group_mean) + delta_v
        dv, used = delta_v, pl.when(single).then(pl.lit("batch_mean")).otherwise(pl.lit(mode))
    return rewards.select(
        *KEYS,
        group_size.alias("group_size"),
        group_mean.alias("group_mean_reward"),
        baseline.alias("baseline"),
        pl.lit(dv).alias("delta_v"),
        (pl.col("reward") - baseline).alias("advantage"),
        used.alias("baseline_mode"),
    ).sort(KEYS)


def polars_curate(rewards: pl.DataFrame, meta: pl.DataFrame, config) -> pl.DataFrame:
    """sql/curation.sql as polars expressions (every rule evaluated, as the SQL does; max_per_prompt and
    target_positive_share are off in this benchmark and not reproduced)."""
    if config.max_per_prompt or config.target_positive_share is not None:
        raise NotImplementedError("the polars twin covers the default curation config only")
    cand = rewards.select(*KEYS, "reward", (pl.col("outcome") == "correct").alias("positive")).join(
        meta.select(*KEYS, "num_tokens", "finish_reason"), on=KEYS, how="left"
    )
    uniform = pl.col("reward").min().over(GROUP) == pl.col("reward").max().over(GROUP)
    first_correct = pl.col("sample_idx").filter(pl.col("positive")).min().over(GROUP)
    later_correct = pl.col("positive") & (pl.col("sample_idx") > first_correct).fill_null(False)
    max_tokens = config.max_completion_tokens or 0
    dropped = (
        pl.when(pl.lit(max_tokens > 0) & (pl.col("num_tokens") > max_tokens))
        .then(pl.lit("too_long"))
        .when(pl.lit(config.drop_truncated) & (pl.col("finish_reason") == "length"))
        .then(pl.lit("truncated"))
        .when(pl.lit(config.drop_uniform_groups) & uniform)
        .then(pl.lit("uniform_group"))
        .when(pl.lit(config.anna_karenina) & later_correct)
        .then(pl.lit("anna_karenina"))
    )
    return (
        cand.with_columns(dropped.alias("dropped_by"))
        .select(
            *KEYS,
            pl.col("dropped_by").is_null().alias("selected"),
            pl.when(pl.col("dropped_by").is_null()).then(1.0).otherwise(0.0).alias("weight"),
            pl.col("dropped_by").fill_null("kept").alias("reason"),
        )
        .sort(KEYS)
    )


def polars_checks(frames: list[pl.DataFrame], advantages: pl.DataFrame | None) -> int:
    """Bad rows: duplicate keys in any frame, non-finite advantages or baselines."""
    bad = sum(int(f.select(KEYS).is_duplicated().sum()) for f in frames)
    if advantages is not None:
        finite = pl.col("advantage").is_finite() & pl.col("baseline").is_finite()
        bad += advantages.filter(~finite).height
    return bad


def in_memory(rewards: pl.DataFrame, meta: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    from stages.config import AdvantageConfig, CurationConfig

    a = AdvantageConfig()
    adv = polars_advantages(rewards, a.baseline_mode, a.delta_v, a.constant)
    bad = polars_checks([meta, rewards, adv], adv)
    train_set = polars_curate(rewards, meta, CurationConfig())
    bad += polars_checks([meta, rewards, adv, train_set], None)
    return adv, train_set, bad


def same(ours: pl.DataFrame, stored: pl.DataFrame) -> bool:
    from polars.testing import assert_frame_equal

    stored = stored.select(ours.columns).sort(KEYS)
    try:
        assert_frame_equal(ours, stored, check_dtypes=False, check_exact=False)
    except AssertionError:
        return False
    return True


# ---------------------------------------------------------------- children


def child_main(case: str, store: str, profile: bool) -> None:
    # what a long-lived flow process has imported already (pyarrow.dataset alone pulls in pandas: ~0.8 s)
    import pyarrow.dataset  # noqa: F401

    import flows.config  # noqa: F401
    import stages.advantage
    import stages.curate  # noqa: F401
    import storage.checks  # noqa: F401
    from storage import tables

    imports_mb = current_rss_mb()
    reset_peak()

    if case == "pipeline":
        if profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.002)
            profiler.start()
        started = time.perf_counter()
        spent = pipeline(store)
        seconds = time.perf_counter() - started
        if profile:
            profiler.stop()
            print(profiler.output_text(unicode=False, color=False, show_all=False), file=sys.stderr)
        peak = peak_rss_mb()
        print(json.dumps({"seconds": seconds, "peak_mb": peak, "above_imports_mb": peak - imports_mb, **spent}))
        return
    rewards = tables.read(store, "rewards", **PARTITION)
    meta = tables.read(store, "rollouts", columns=META, **PARTITION)
    loaded_mb = peak_rss_mb()
    started = time.perf_counter()
    adv, train_set, bad = in_memory(rewards, meta)
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    equal = same(adv, tables.read(store, "advantages", **PARTITION)) and same(
        train_set, tables.read(store, "train_set", **PARTITION)
    )
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_mb": peak,
                "above_imports_mb": peak - imports_mb,
                "loaded_mb": loaded_mb - imports_mb,
                "bad_rows": bad,
                "equal": equal,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two repetitions (smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per case (default 3, quick 2)")
    parser.add_argument("--prompts", default=None, help="comma-separated prompt counts (×16 rows)")
    parser.add_argument("--profile", action="store_true", help="pyinstrument the pipeline at the largest size")
    args = parser.parse_args()
    reps = args.reps or (2 if args.quick else 3)
    sizes = [int(x) for x in (args.prompts or ("250,1000" if args.quick else "3906,15625,62500")).split(",")]
    print_machine()
    rows, breakdown, setup = [], [], []
    for n_prompts in sizes:
        store = tempfile.mkdtemp(prefix="asymre-bench-data-")
        try:
            setup.append({"rows": n_prompts * 16, **build_store(store, n_prompts)})
            runs = alternate(
                {
                    "pipeline": lambda s=store: child("data_stages.py", "--child", "pipeline", s),
                    "polars": lambda s=store: child("data_stages.py", "--child", "polars", s),
                },
                reps,
            )
            for case, r in runs.items():
                rows.append(
                    {
                        "rows": n_prompts * 16,
                        "case": case,
                        "median_s": median(r),
                        "peak_mb": median(r, "peak_mb"),
                        "above_imports_mb": median(r, "above_imports_mb"),
                        "pipeline/polars_time": median(runs["pipeline"]) / median(runs["polars"])
                        if case == "polars"
                        else None,
                        "equal": r[-1].get("equal", ""),
                        "bad_rows": r[-1].get("bad_rows", ""),
                    }
                )
            parts = ["read", "compute", "write", "views_sql", "checks"]
            breakdown.append({"rows": n_prompts * 16, **{p + "_s": median(runs["pipeline"], p) for p in parts}})
            if args.profile and n_prompts == sizes[-1]:
                _profile(store)
        finally:
            shutil.rmtree(store, ignore_errors=True)
    print("\n# setup (not timed below)")
    print_table(setup)
    print("\n# advantages + curation + checks: pipeline (store) vs polars in memory (medians)")
    print_table(rows)
    print("\n# pipeline breakdown (medians, seconds)")
    print_table(breakdown)
    print("\n# growth with rows (time of size k / time of the smallest size; linear = the row ratio)")
    first = {c: next(r["median_s"] for r in rows if r["case"] == c) for c in ("pipeline", "polars")}
    print_table(
        [
            {
                "rows": r["rows"],
                "case": r["case"],
                "row_ratio": r["rows"] / rows[0]["rows"],
                "time_ratio": r["median_s"] / first[r["case"]],
            }
            for r in rows
        ]
    )


def _profile(store: str) -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, str(Path(__file__)), "--child", "pipeline", store, "--profile"],
        capture_output=True,
        text=True,
        check=True,
    )
    print("\n# pyinstrument of the pipeline (largest size)")
    print(out.stderr)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3], "--profile" in sys.argv)
    else:
        main()
