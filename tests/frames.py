"""Small frames for every asymre table, in exactly the types its schema wants (Int32 round and sample_idx,
List(Int32) token ids, List(Float32) log-probs, UTC timestamps). Test data only; nothing here writes."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pyarrow as pa

from storage.schemas import PARTITIONS

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _keys(experiment: str, round: int, n_prompts: int, G: int) -> dict[str, pa.Array]:
    n = n_prompts * G
    return {
        "experiment": pa.array([experiment] * n, pa.string()),
        "round": pa.array(np.full(n, round, np.int32)),
        "prompt_id": pa.array([f"p{i}" for i in range(n_prompts) for _ in range(G)], pa.string()),
        "sample_idx": pa.array(np.tile(np.arange(G, dtype=np.int32), n_prompts)),
    }


def _lists(lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _rewards(n: int, seed: int) -> np.ndarray:
    """The rewards of a round (0 or 1); rewards_frame and advantages_frame with the same seed agree."""
    return np.random.default_rng(seed + 1000).integers(0, 2, n).astype(np.float64)


def rollouts_frame(
    experiment: str = "exp",
    round: int = 0,
    n_prompts: int = 2,
    G: int = 3,
    seed: int = 0,
    *,
    max_tokens: int = 8,
    lengths: list[int] | None = None,
    stage_key: str = "key-rollouts",
) -> pl.DataFrame:
    """n_prompts × G rollouts; completion lengths uniform in 1..max_tokens unless `lengths` gives them."""
    rng = np.random.default_rng(seed)
    n = n_prompts * G
    lens = np.asarray(lengths, np.int64) if lengths is not None else rng.integers(1, max_tokens + 1, n)
    total = int(lens.sum())
    logprobs = -rng.random(total, dtype=np.float32)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    sums = np.add.reduceat(logprobs.astype(np.float64), starts) if total else np.zeros(n)
    table = pa.table(
        {
            **_keys(experiment, round, n_prompts, G),
            "policy_version": pa.array([f"{experiment}/round={round}@abc"] * n),
            "prompt": pa.array(["What is 2+2?"] * n),
            "completion": pa.array([f"answer {i}" for i in range(n)]),
            "prompt_token_ids": _lists(np.full(n, 4), rng.integers(0, 1000, 4 * n, dtype=np.int32)),
            "completion_token_ids": _lists(lens, rng.integers(0, 50_000, total, dtype=np.int32)),
            "behaviour_logprobs": _lists(lens, logprobs),
            "behaviour_logprob": pa.array(sums, pa.float64()),
            "num_tokens": pa.array(lens.astype(np.int32)),
            "finish_reason": pa.array(["length" if k == max_tokens else "stop" for k in lens.tolist()]),
            "engine": pa.array(["hf"] * n),
            "temperature": pa.array(np.ones(n)),
            "top_p": pa.array(np.ones(n)),
            "top_k": pa.array(np.zeros(n, np.int32)),
            "max_new_tokens": pa.array(np.full(n, max_tokens, np.int32)),
            "seed": pa.array(np.full(n, seed, np.int64)),
            "stage_key": pa.array([stage_key] * n),
        }
    )
    return pl.from_arrow(table)


def rewards_frame(
    experiment: str = "exp",
    round: int = 0,
    n_prompts: int = 2,
    G: int = 3,
    seed: int = 0,
    *,
    rewards: list[float] | None = None,
    stage_key: str = "key-rewards",
) -> pl.DataFrame:
    """Rewards 0/1 (random from `seed`, or given); every 5th wrong row is unparsable with a null answer."""
    n = n_prompts * G
    values = np.asarray(rewards, np.float64) if rewards is not None else _rewards(n, seed)
    unparsable = [(i % 5 == 4 and values[i] != 1.0) for i in range(n)]
    outcome = ["correct" if r == 1.0 else "unparsable" if u else "incorrect" for r, u in zip(values, unparsable)]
    table = pa.table(
        {
            **_keys(experiment, round, n_prompts, G),
            "extracted_answer": pa.array([None if u else "4" for u in unparsable], pa.string()),
            "reward": pa.array(values, pa.float64()),
            "outcome": pa.array(outcome),
            "verifier": pa.array(["numeric"] * n),
            "verifier_version": pa.array(["1"] * n),
            "stage_key": pa.array([stage_key] * n),
        }
    )
    return pl.from_arrow(table)


def advantages_frame(
    experiment: str = "exp",
    round: int = 0,
    n_prompts: int = 2,
    G: int = 3,
    seed: int = 0,
    *,
    rewards: list[float] | None = None,
    delta_v: float = 0.0,
    stage_key: str = "key-advantages",
) -> pl.DataFrame:
    """Group-mean baseline plus δV over the same rewards as rewards_frame(seed=seed)."""
    n = n_prompts * G
    values = np.asarray(rewards, np.float64) if rewards is not None else _rewards(n, seed)
    means = np.repeat(values.reshape(n_prompts, G).mean(axis=1), G)  # (n,)
    baseline = means + delta_v
    table = pa.table(
        {
            **_keys(experiment, round, n_prompts, G),
            "group_size": pa.array(np.full(n, G, np.int32)),
            "group_mean_reward": pa.array(means),
            "baseline": pa.array(baseline),
            "delta_v": pa.array(np.full(n, delta_v)),
            "advantage": pa.array(values - baseline),
            "baseline_mode": pa.array(["group_mean"] * n),
            "stage_key": pa.array([stage_key] * n),
        }
    )
    return pl.from_arrow(table)


def train_set_frame(
    experiment: str = "exp", round: int = 0, n_prompts: int = 2, G: int = 3, seed: int = 0, *, stage_key: str = "key-ts"
) -> pl.DataFrame:
    n = n_prompts * G
    selected = np.random.default_rng(seed).random(n) < 0.7
    table = pa.table(
        {
            **_keys(experiment, round, n_prompts, G),
            "selected": pa.array(selected),
            "weight": pa.array(np.where(selected, 1.0, 0.0)),
            "reason": pa.array(["kept" if s else "zero_advantage" for s in selected.tolist()]),
            "stage_key": pa.array([stage_key] * n),
        }
    )
    return pl.from_arrow(table)


def train_steps_frame(experiment: str = "exp", round: int = 0, n_steps: int = 3, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    ratio = rng.uniform(0.5, 1.5, (n_steps, 3))
    return pl.DataFrame(
        {
            "experiment": [experiment] * n_steps,
            "round": [round] * n_steps,
            "step": list(range(n_steps)),
            "epoch": [0] * n_steps,
            "loss": rng.normal(size=n_steps),
            "ratio_mean": ratio.mean(axis=1),
            "ratio_min": ratio.min(axis=1),
            "ratio_max": ratio.max(axis=1),
            "ratio_clipped": rng.uniform(0, 1, n_steps),
            "positive_share": rng.uniform(0, 1, n_steps),
            "effective_positive_share": rng.uniform(0, 1, n_steps),
            "grad_norm": rng.uniform(0, 3, n_steps),
            "lr": [1e-6] * n_steps,
            "tokens": rng.integers(100, 1000, n_steps),
            "tokens_per_s": rng.uniform(100, 1000, n_steps),
            "logprob_gap": [0.01] * n_steps,
            "stage_key": ["key-train"] * n_steps,
        },
        schema_overrides={"round": pl.Int32, "step": pl.Int32, "epoch": pl.Int32, "tokens": pl.Int64},
    )


def checkpoints_frame(experiment: str = "exp", round: int = 1, *, parent_version: str | None = None) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "experiment": [experiment],
            "round": [round],
            "policy_version": [f"{experiment}/round={round}@0123456789ab"],
            "parent_version": [parent_version],
            "path": [f"/ckpt/{experiment}/round={round}"],
            "loss": [0.25],
            "sha256": ["0123456789ab" + "0" * 52],
            "created_at": [T0 + timedelta(hours=round)],
            "stage_key": ["key-train"],
        },
        schema_overrides={"round": pl.Int32, "parent_version": pl.String, "created_at": pl.Datetime("us", "UTC")},
    )


def evals_frame(
    experiment: str = "exp", round: int = 0, n_prompts: int = 3, seed: int = 0, *, mode: str = "greedy"
) -> pl.DataFrame:
    correct = np.random.default_rng(seed).random(n_prompts) < 0.5
    return pl.DataFrame(
        {
            "experiment": [experiment] * n_prompts,
            "round": [round] * n_prompts,
            "policy_version": [f"{experiment}/round={round}@abc"] * n_prompts,
            "prompt_id": [f"t{i}" for i in range(n_prompts)],
            "sample_idx": [0] * n_prompts,
            "completion": [f"the answer is {i}" for i in range(n_prompts)],
            "extracted_answer": [None if i == 0 else str(i) for i in range(n_prompts)],
            "correct": correct.tolist(),
            "mode": [mode] * n_prompts,
            "stage_key": ["key-eval"] * n_prompts,
        },
        schema_overrides={"round": pl.Int32, "sample_idx": pl.Int32, "extracted_answer": pl.String},
    )


def stage_runs_frame(experiment: str = "exp", n_runs: int = 2) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "experiment": [experiment] * n_runs,
            "round": list(range(n_runs)),
            "stage": ["rollouts"] * n_runs,
            "stage_key": [f"k{i}" for i in range(n_runs)],
            "input_versions": [json.dumps({"prompts": 0})] * n_runs,
            "config": [json.dumps({"G": 8})] * n_runs,
            "code_version": ["1"] * n_runs,
            "rows": [16] * n_runs,
            "wall_s": [1.5] * n_runs,
            "status": ["done"] * n_runs,
            "message": [None] * n_runs,
            "output_version": [i for i in range(n_runs)],
            "created_at": [T0 + timedelta(minutes=i) for i in range(n_runs)],
        },
        schema_overrides={
            "round": pl.Int32,
            "rows": pl.Int64,
            "message": pl.String,
            "output_version": pl.Int64,
            "created_at": pl.Datetime("us", "UTC"),
        },
    )


def prompts_frame(dataset: str = "toy", n: int = 4, split: str = "train") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "dataset": [dataset] * n,
            "split": [split] * n,
            "prompt_id": [f"p{i}" for i in range(n)],
            "prompt": [f"What is {i}+{i}?" for i in range(n)],
            "answer": [str(2 * i) for i in range(n)],
            "source": ["generator"] * n,
            "meta": [json.dumps({"operator": "+"})] * n,
            "stage_key": ["key-prompts"] * n,
        }
    )


# One small valid frame per table (test_storage checks that this covers every schema).
SMALL = {
    "prompts": prompts_frame,
    "rollouts": rollouts_frame,
    "rewards": rewards_frame,
    "advantages": advantages_frame,
    "train_set": train_set_frame,
    "train_steps": train_steps_frame,
    "checkpoints": checkpoints_frame,
    "evals": evals_frame,
    "stage_runs": stage_runs_frame,
    "bandit_limits": lambda experiment="bandit": bandit_limits_frame(experiment),
    "bandit_iterations": lambda experiment="bandit": bandit_iterations_frame(experiment),
}


def bandit_limits_frame(experiment: str = "bandit", n: int = 3) -> pl.DataFrame:
    """A small limit study: V below V^μ has a closed form, V above it does not (nulls)."""
    v = [0.2 + 0.3 * i for i in range(n)]
    below = [x < 0.6 for x in v]
    return pl.DataFrame(
        {
            "experiment": [experiment] * n,
            "seed": [0] * n,
            "V": v,
            "v_mu": [0.6] * n,
            "limit_reward": [0.7 + 0.05 * i for i in range(n)],
            "limit_support": [10 - 4 * i if b else 1 for i, b in enumerate(below)],
            "closed_form_reward": [0.7 + 0.05 * i if b else None for i, b in enumerate(below)],
            "closed_form_support": [10 - 4 * i if b else None for i, b in enumerate(below)],
            "max_abs_diff": [1e-6 if b else None for b in below],
            "steps": [1000 * (i + 1) for i in range(n)],
        },
        schema_overrides={
            "closed_form_reward": pl.Float64,
            "closed_form_support": pl.Int64,
            "max_abs_diff": pl.Float64,
        },
    )


def bandit_iterations_frame(experiment: str = "bandit", rounds: int = 3) -> pl.DataFrame:
    rows = [
        (experiment, 0, v, mode, k, 0.5 + 0.1 * k, 100 - k, 4.0 - k)
        for v in (0.3, 0.8)
        for mode in ("expected", "sampled")
        for k in range(rounds)
    ]
    columns = ["experiment", "seed", "V", "mode", "round", "expected_reward", "support", "entropy"]
    return pl.DataFrame(rows, schema=columns, orient="row")


def partition_of(table: str, frame: pl.DataFrame) -> dict:
    """The partition values of `frame` (all its rows share them) for tables.write_partition."""
    return {col: frame[col][0] for col in PARTITIONS[table]}


# A whole experiment small enough for flow tests: 2 rounds of 16 prompts × 4 samples, a 20-step warm start.
TINY = [
    "prompts.n_train=300",
    "prompts.n_test=24",
    "prompts.per_round=16",
    "rollout.samples_per_prompt=4",
    "model.warm_start_steps=20",
    "model.warm_start_batch_size=32",
    "train.batch_size=32",
    "train.micro_batch_size=16",
    "eval.sampled=1",
    "rounds=2",
]

# The tables a resumed or rerun experiment must reproduce, compared without what differs by run (wall times,
# timestamps, the checkpoint folder's path).
COMPARED = ["prompts", "rollouts", "rewards", "advantages", "train_set", "train_steps", "evals", "checkpoints"]


def comparable(store, table: str):
    from storage import tables

    frame = tables.read(str(store), table).drop(["created_at", "path", "tokens_per_s"], strict=False)
    return frame.sort([c for c in ("round", "prompt_id", "sample_idx", "mode", "step") if c in frame.columns])
