"""Curation: which rollouts of the round are trained on. Every row is kept in `train_set` with
`selected`, `weight` and the `reason` it was kept or dropped; all rules are off by default."""

from __future__ import annotations

import numpy as np
import polars as pl

from stages.config import CurationConfig
from storage.sql import run_file

KEYS = ["experiment", "round", "prompt_id", "sample_idx"]


def curate(rewards: pl.DataFrame, rollouts: pl.DataFrame, config: CurationConfig) -> pl.DataFrame:
    """`rewards` gives reward/outcome, `rollouts` num_tokens/finish_reason; returns train_set rows."""
    candidates = rewards.select(*KEYS, "reward", (pl.col("outcome") == "correct").alias("positive")).join(
        rollouts.select(*KEYS, "num_tokens", "finish_reason"), on=KEYS, how="left"
    )
    if candidates["num_tokens"].null_count():
        raise ValueError("curation: some rewards have no rollout row (join on the keys failed)")
    params = {
        "max_tokens": config.max_completion_tokens or 0,
        "drop_truncated": config.drop_truncated,
        "drop_uniform": config.drop_uniform_groups,
        "anna_karenina": config.anna_karenina,
        "max_per_prompt": config.max_per_prompt or 0,
        "seed": config.seed,
    }
    ruled = run_file("curation.sql", {"candidates": candidates}, params)
    if config.target_positive_share is not None:
        ruled = _target_share(ruled, config.target_positive_share, config.seed)
    return ruled.select(
        *KEYS,
        pl.col("dropped_by").is_null().alias("selected"),
        pl.when(pl.col("dropped_by").is_null()).then(1.0).otherwise(0.0).alias("weight"),
        pl.col("dropped_by").fill_null("kept").alias("reason"),
    ).with_columns(pl.col("round").cast(pl.Int32), pl.col("sample_idx").cast(pl.Int32))


def _target_share(ruled: pl.DataFrame, share: float, seed: int) -> pl.DataFrame:
    """Drop a seeded random subset of the over-represented side so positives make up `share`."""
    alive = ruled["dropped_by"].is_null().to_numpy()
    positive = ruled["positive"].to_numpy() & alive
    negative = ~ruled["positive"].to_numpy() & alive
    n_pos, n_neg = int(positive.sum()), int(negative.sum())
    if n_pos == 0 or n_neg == 0:
        return ruled  # nothing to rebalance against
    # keep all of the scarce side; cut the abundant side down to what the share implies
    if n_pos / (n_pos + n_neg) > share:
        side, keep = positive, round(share * n_neg / (1 - share))
    else:
        side, keep = negative, round((1 - share) * n_pos / share)
    idx = np.flatnonzero(side)
    drop = np.random.default_rng(seed).permutation(idx)[max(keep, 0) :]
    dropped = ruled["dropped_by"].to_list()
    for i in drop:
        dropped[i] = "positive_share"
    return ruled.with_columns(pl.Series("dropped_by", dropped, dtype=pl.String))
