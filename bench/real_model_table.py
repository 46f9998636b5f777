"""The per-round table of a real-model experiment (README "A real pretrained model"), read from its store.

    python bench/real_model_table.py STORE EXPERIMENT [EXPERIMENT …]

For every experiment and checkpoint k: the greedy accuracy of checkpoint k on the held-out problems, and
for round k (μ = checkpoint k): the behaviour policy's success rate, mean completion length in tokens, the
share of completions that stop by eos, the mean engine-vs-trainer log-prob gap per token
(`train_steps.logprob_gap`, over the round's selected rows), and the wall time of each stage. Markdown on
stdout.
"""

from __future__ import annotations

import argparse

import polars as pl

from storage import tables

STAGE_COLUMNS = ("rollouts", "rewards", "train", "eval")


def experiment_rows(store: str, experiment: str) -> list[dict]:
    evals = tables.read(store, "evals", experiment=experiment).filter(pl.col("mode") == "greedy")
    rollouts = tables.read(store, "rollouts", experiment=experiment)
    rewards = tables.read(store, "rewards", experiment=experiment)
    steps = tables.read(store, "train_steps", experiment=experiment)
    runs = tables.read(store, "stage_runs", experiment=experiment).filter(pl.col("status") == "done")
    checkpoints = sorted(evals["round"].unique().to_list())
    out = []
    for k in checkpoints:
        e = evals.filter(pl.col("round") == k)
        ro, rw = rollouts.filter(pl.col("round") == k), rewards.filter(pl.col("round") == k)
        st = steps.filter(pl.col("round") == k)
        times = {}
        for stage in STAGE_COLUMNS:
            # eval of checkpoint k+1 closes round k; checkpoint 0's eval is its own line
            r = k + 1 if stage == "eval" else k
            done = runs.filter((pl.col("stage") == stage) & (pl.col("round") == r)).sort("created_at")
            times[stage] = done["wall_s"][-1] if done.height else None
        out.append(
            {
                "experiment": experiment,
                "k": k,
                "greedy_acc": e["correct"].mean() if e.height else None,
                "n_eval": e.height,
                "mu_success": (rw["outcome"] == "correct").mean() if rw.height else None,
                "mean_len": ro["num_tokens"].mean() if ro.height else None,
                "eos_share": (ro["finish_reason"] == "stop").mean() if ro.height else None,
                "gap_mean": st["logprob_gap"].mean() if st.height else None,
                **{f"{s}_s": times[s] for s in STAGE_COLUMNS},
            }
        )
    return out


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(rows: list[dict]) -> str:
    head = (
        "| experiment | k | greedy acc. of ckpt k | μ_k success | mean len | eos share | log-prob gap (mean/token) "
        "| rollouts s | rewards s | train s | eval of k+1 s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['experiment']} | {r['k']} | {_fmt(r['greedy_acc'], '.1%')} ({r['n_eval']}) | "
            f"{_fmt(r['mu_success'], '.1%')} | {_fmt(r['mean_len'], '.0f')} | {_fmt(r['eos_share'], '.0%')} | "
            f"{_fmt(r['gap_mean'], '.1e')} | {_fmt(r['rollouts_s'], '.0f')} | {_fmt(r['rewards_s'], '.0f')} | "
            f"{_fmt(r['train_s'], '.0f')} | {_fmt(r['eval_s'], '.0f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store")
    parser.add_argument("experiments", nargs="+")
    args = parser.parse_args()
    rows = [row for name in args.experiments for row in experiment_rows(args.store, name)]
    print(markdown(rows))


if __name__ == "__main__":
    main()
