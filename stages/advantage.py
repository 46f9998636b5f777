"""Advantages: the baseline V of each rollout and A = r − V, computed by sql/advantages.sql.

AsymRE's point is that off-policy the baseline matters: keep V below the behaviour mean (δV < 0).
"""

from __future__ import annotations

import polars as pl

from stages.config import AdvantageConfig
from storage.sql import run_file

KEYS = ["experiment", "round", "prompt_id", "sample_idx"]


def advantages(rewards: pl.DataFrame, config: AdvantageConfig) -> pl.DataFrame:
    """One row per reward row: group size, group mean, baseline, δV, advantage, baseline mode."""
    needed = {*KEYS, "reward"}
    missing = needed - set(rewards.columns)
    if missing:
        raise ValueError(f"advantages need columns {sorted(missing)} in the rewards frame")
    params = {"mode": config.baseline_mode, "delta_v": config.delta_v, "constant": config.constant}
    out = run_file("advantages.sql", {"rewards": rewards.select(*KEYS, "reward")}, params)
    return out.with_columns(pl.col("round").cast(pl.Int32), pl.col("sample_idx").cast(pl.Int32))
