"""The comparison experiments of configs/ on the built-in task, over several seeds, in one store, and
their summary: final test accuracy per config as a mean ± std over seeds, plus one plot of the mean
curves with the spread over seeds.

    python bench/comparison.py [--store STORE] [--configs asymre,reinforce,...] [--seeds 0,1,2]
                               [--jobs 2] [--threads 1] [--summary-only]

Each (config, seed) is `asymre run configs/<config>.yaml --set seed=S --set name=<config>-sS --store STORE`
in its own process (log: <store>/logs/<config>-sS.log), `--jobs` at a time with `--threads` torch threads
each. A seed's first experiment runs before its others start, so the seed's warm start is computed once
and then taken from the store's cache by the rest. Re-running continues unfinished experiments and skips
finished ones (their stages hold their keys). The summary goes to <store>/reports/comparison.md and
comparison.png, and is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.catalog import connect  # noqa: E402
from storage.sql import query  # noqa: E402
from storage.tables import resolve_store  # noqa: E402

CONFIGS = ["asymre", "reinforce", "asymre-pos", "topr", "topr-baseline", "sft", "shuffled"]
DESCRIBE = {
    "asymre": "asymre (δV = −0.1, the default)",
    "reinforce": "reinforce (δV = 0)",
    "asymre-pos": "asymre-pos (δV = +0.1)",
    "topr": "topr (±1, c = 0, sequence ratio)",
    "topr-baseline": "topr-baseline (±1, group mean)",
    "sft": "sft (positives only)",
    "shuffled": "shuffled rewards (control)",
}

_PER_EXPERIMENT = """
with ev as (select * from eval_summary),
     rs as (select * from round_summary),
     last as (select experiment, least(max(round), $at) as k from ev group by experiment),
     first_rollouts as (select experiment, min(round) as r0, max(round) as r1 from rs group by experiment)
select
    l.experiment, l.k,
    e0.greedy_accuracy as greedy_0, ek.greedy_accuracy as greedy_k,
    e0.sampled_accuracy as sampled_0, ek.sampled_accuracy as sampled_k,
    s0.share_correct as success_0, s1.share_correct as success_last,
    s0.mean_completion_tokens as tokens_0, s1.mean_completion_tokens as tokens_last
from last as l
join ev as e0 on e0.experiment = l.experiment and e0.round = 0
join ev as ek on ek.experiment = l.experiment and ek.round = l.k
join first_rollouts as f on f.experiment = l.experiment
join rs as s0 on s0.experiment = l.experiment and s0.round = f.r0
join rs as s1 on s1.experiment = l.experiment and s1.round = least(f.r1, l.k - 1)
order by l.experiment
"""


def with_config(frame: pl.DataFrame) -> pl.DataFrame:
    """Add `config` and `seed`, parsed from experiment names of the form <config>-s<seed>."""
    parts = frame["experiment"].str.extract_groups(r"^(?<config>.+)-s(?<seed>\d+)$")
    return frame.with_columns(config=parts.struct.field("config"), seed=parts.struct.field("seed").cast(pl.Int64))


def run_one(store: str, config: str, seed: int, rounds: int | None, threads: int) -> tuple[str, int, float]:
    name = f"{config}-s{seed}"
    logs = Path(store) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # this checkout's code (not whichever asymre is installed), so a copy of the repo can run the comparison
    cmd = [sys.executable, "-m", "flows.cli", "run", str(ROOT / "configs" / f"{config}.yaml")]
    cmd += ["--store", store]
    cmd += ["--set", f"seed={seed}", "--set", f"name={name}"]
    if rounds is not None:
        cmd += ["--rounds", str(rounds)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    with open(logs / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    return name, rc, time.perf_counter() - started


def run_all(store: str, configs: list[str], seeds: list[int], jobs: int, rounds: int | None, threads: int) -> bool:
    """Every (config, seed), `jobs` at a time; a seed's first config finishes before its others start."""
    pending = [(c, s) for c in configs for s in seeds]
    warmed: set[int] = set()
    warming: set[int] = set()
    ok = True
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running: dict = {}
        while pending or running:
            while len(running) < jobs:
                # a seed not started yet first (its warm start is the long pole), else any warmed seed's run
                pick = next((p for p in pending if p[1] not in warming and p[1] not in warmed), None)
                pick = pick or next((p for p in pending if p[1] in warmed), None)
                if pick is None:
                    break
                pending.remove(pick)
                if pick[1] not in warmed:
                    warming.add(pick[1])
                running[pool.submit(run_one, store, *pick, rounds, threads)] = pick
                print(f"start {pick[0]}-s{pick[1]}", flush=True)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                _, seed = running.pop(fut)
                name, rc, seconds = fut.result()
                warming.discard(seed)
                warmed.add(seed)  # a failed first run still leaves the cache or fails again on its own
                ok &= rc == 0
                print(f"{'done  ' if rc == 0 else 'FAILED'} {name} in {seconds:.0f} s (rc {rc})", flush=True)
    return ok


def per_experiment(store: str, at: int | None = None) -> pl.DataFrame:
    """Per experiment: checkpoint 0 and checkpoint `at` (default: the last evaluated), and μ's success
    rate in round 0 and in the round that trained that checkpoint."""
    return with_config(query(connect(store), _PER_EXPERIMENT, {"at": 1_000_000 if at is None else at}))


def _mean_std(values: list[float], scale: float = 100.0, signed: bool = False) -> str:
    values = [v * scale for v in values]
    spec = "+.1f" if signed else ".1f"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{statistics.mean(values):{spec}} ± {statistics.stdev(values):.1f}"


def summary_markdown(frame: pl.DataFrame, configs: list[str]) -> str:
    lines = [
        "| config | seeds | k | greedy k=0 → k | Δ greedy (points) | Δ T=1 (points) | μ's success rate, round 0 → k−1 | completion tokens, round k−1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for config in configs:
        rows = frame.filter(pl.col("config") == config).sort("seed")
        if rows.is_empty():
            continue
        d_greedy = (rows["greedy_k"] - rows["greedy_0"]).to_list()
        d_sampled = (rows["sampled_k"] - rows["sampled_0"]).to_list()
        ks = sorted(set(rows["k"].to_list()))
        lines.append(
            f"| {DESCRIBE.get(config, config)} | {', '.join(map(str, rows['seed'].to_list()))} "
            f"| {', '.join(map(str, ks))} "
            f"| {100 * rows['greedy_0'].mean():.1f} → {100 * rows['greedy_k'].mean():.1f} % "
            f"| **{_mean_std(d_greedy, signed=True)}** | {_mean_std(d_sampled, signed=True)} "
            f"| {rows['success_0'].mean():.3f} → {rows['success_last'].mean():.3f} "
            f"| {rows['tokens_last'].mean():.2f} |"
        )
    lines += [
        "",
        "Per experiment:",
        "",
        "| experiment | k | greedy k=0 → k | Δ greedy | T=1 k=0 → k | Δ T=1 | μ success round 0 → k−1 | completion tokens round 0 → k−1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in frame.sort("config", "seed").iter_rows(named=True):
        lines.append(
            f"| {r['experiment']} | {r['k']} | {100 * r['greedy_0']:.1f} → {100 * r['greedy_k']:.1f} "
            f"| {100 * (r['greedy_k'] - r['greedy_0']):+.1f} | {100 * r['sampled_0']:.1f} → {100 * r['sampled_k']:.1f} "
            f"| {100 * (r['sampled_k'] - r['sampled_0']):+.1f} | {r['success_0']:.3f} → {r['success_last']:.3f} "
            f"| {r['tokens_0']:.2f} → {r['tokens_last']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(store: str, configs: list[str], target: Path) -> None:
    """Per config, the mean over seeds by checkpoint k (band: min–max over seeds): greedy and sampled test
    accuracy of μ_k, and the success rate of μ_k's own samples on its round's training prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    con = connect(store)
    evals = query(con, "select experiment, round, greedy_accuracy, sampled_accuracy from eval_summary")
    behaviour = query(con, "select experiment, round, share_correct from round_summary")
    panels = [
        (evals, "greedy_accuracy", "test accuracy, greedy"),
        (evals, "sampled_accuracy", "test accuracy, sampled (T = 1)"),
        (behaviour, "share_correct", "μ_k's success rate on its round's prompts"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, (frame, col, title) in zip(axes, panels):
        frame = with_config(frame)
        for i, config in enumerate(configs):
            rows = frame.filter(pl.col("config") == config)
            if rows.is_empty():
                continue
            agg = (
                rows.group_by("round")
                .agg(mean=pl.col(col).mean(), lo=pl.col(col).min(), hi=pl.col(col).max())
                .sort("round")
            )
            seeds = rows["experiment"].n_unique()
            color = f"C{i}"
            ax.plot(agg["round"], agg["mean"] * 100, marker="o", ms=3, color=color, label=f"{config} ({seeds} seeds)")
            ax.fill_between(agg["round"], agg["lo"] * 100, agg["hi"] * 100, color=color, alpha=0.12)
        ax.set_title(title)
        ax.set_xlabel("checkpoint k")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle("built-in task: mean over seeds (band: min–max over seeds)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(target, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=str(ROOT / "store-comparison"))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per experiment")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per experiment (default: the config's)")
    parser.add_argument("--summary-only", action="store_true", help="summarise what the store holds; run nothing")
    parser.add_argument("--at", type=int, default=None, help="summarise checkpoint K (default: each one's last)")
    args = parser.parse_args()
    store = resolve_store(args.store)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    missing = [c for c in configs if not (ROOT / "configs" / f"{c}.yaml").is_file()]
    if missing:
        parser.error(f"no configs/{missing[0]}.yaml")
    seeds = [int(s) for s in args.seeds.split(",")]
    ok = True
    if not args.summary_only:
        started = time.perf_counter()
        ok = run_all(store, configs, seeds, args.jobs, args.rounds, args.threads)
        print(f"all runs: {time.perf_counter() - started:.0f} s", flush=True)
    frame = per_experiment(store, args.at)
    text = summary_markdown(frame, [c for c in configs if c in set(frame["config"].to_list())])
    reports = Path(store) / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    table = reports / f"comparison{'' if args.at is None else f'-k{args.at}'}.md"
    table.write_text(text)
    plot(store, configs, reports / "comparison.png")
    print(text)
    print(f"written: {table}, {reports / 'comparison.png'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
