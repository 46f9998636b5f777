"""Advantages against a naive Python loop (random data, groups of size 1), and each curation rule."""

from __future__ import annotations

import random

import polars as pl
import pytest

from stages.advantage import advantages
from stages.config import AdvantageConfig, CurationConfig
from stages.curate import curate

KEYS = ["experiment", "round", "prompt_id", "sample_idx"]


def random_rewards(seed: int) -> pl.DataFrame:
    rng = random.Random(seed)
    rows = []
    for round_ in (0, 1):
        for p in range(15):
            for s in range(rng.choice([1, 1, 2, 4, 8])):  # plenty of groups of size 1
                rows.append(("e", round_, f"p{p}", s, rng.choice([0.0, 1.0, 0.5, -1.0])))
    return pl.DataFrame(rows, schema=[*KEYS, "reward"], orient="row").with_columns(
        pl.col("round").cast(pl.Int32), pl.col("sample_idx").cast(pl.Int32)
    )


def naive(rewards: pl.DataFrame, mode: str, delta_v: float, constant: float) -> dict:
    rows = rewards.to_dicts()
    out = {}
    for r in rows:
        group = [x["reward"] for x in rows if (x["round"], x["prompt_id"]) == (r["round"], r["prompt_id"])]
        batch = [x["reward"] for x in rows if x["round"] == r["round"]]
        if mode == "constant":
            v, used = constant, "constant"
        elif mode == "batch_mean" or len(group) == 1:
            v, used = sum(batch) / len(batch) + delta_v, "batch_mean"
        else:
            v, used = sum(group) / len(group) + delta_v, "group_mean"
        key = (r["round"], r["prompt_id"], r["sample_idx"])
        out[key] = (len(group), sum(group) / len(group), v, r["reward"] - v, used)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["group_mean", "constant", "batch_mean"])
def test_advantages_match_naive_loop(seed, mode):
    rewards = random_rewards(seed)
    cfg = AdvantageConfig(baseline_mode=mode, delta_v=-0.13, constant=0.25)
    got = advantages(rewards, cfg)
    expected = naive(rewards, mode, cfg.delta_v, cfg.constant)
    assert got.height == rewards.height
    for r in got.iter_rows(named=True):
        size, mean, v, adv, used = expected[(r["round"], r["prompt_id"], r["sample_idx"])]
        assert r["group_size"] == size
        assert r["group_mean_reward"] == pytest.approx(mean, abs=1e-12)
        assert r["baseline"] == pytest.approx(v, abs=1e-12)
        assert r["advantage"] == pytest.approx(adv, abs=1e-12)
        assert r["baseline_mode"] == used
        assert r["delta_v"] == (0.0 if mode == "constant" else cfg.delta_v)
    assert got.schema["round"] == pl.Int32 and got.schema["group_size"] == pl.Int32


def candidates():
    keys = {
        "experiment": ["e"] * 9,
        "round": [0] * 9,
        "prompt_id": ["a", "a", "a", "a", "b", "b", "b", "c", "c"],
        "sample_idx": [0, 1, 2, 3, 0, 1, 2, 0, 1],
    }
    outcome = [
        "incorrect",
        "correct",
        "correct",
        "incorrect",
        "incorrect",
        "incorrect",
        "incorrect",
        "correct",
        "correct",
    ]
    rewards = pl.DataFrame(
        {**keys, "reward": [1.0 if o == "correct" else 0.0 for o in outcome], "outcome": outcome},
        schema_overrides={"round": pl.Int32, "sample_idx": pl.Int32},
    )
    rollouts = pl.DataFrame(
        {**keys, "num_tokens": [3, 3, 7, 3, 3, 6, 3, 3, 3], "finish_reason": ["stop"] * 5 + ["length"] + ["stop"] * 3},
        schema_overrides={"round": pl.Int32, "sample_idx": pl.Int32},
    )
    return rewards, rollouts


def reasons(frame: pl.DataFrame) -> list[str]:
    return frame.sort(KEYS)["reason"].to_list()


def test_curation_defaults_keep_everything():
    out = curate(*candidates(), CurationConfig())
    assert out.height == 9 and out["selected"].all() and set(out["reason"]) == {"kept"}
    assert out["weight"].to_list() == [1.0] * 9


def test_each_curation_rule():
    rw, ro = candidates()
    assert reasons(curate(rw, ro, CurationConfig(drop_uniform_groups=True))) == ["kept"] * 4 + ["uniform_group"] * 5
    assert reasons(curate(rw, ro, CurationConfig(anna_karenina=True))) == [
        "kept", "kept", "anna_karenina", "kept", "kept", "kept", "kept", "kept", "anna_karenina",
    ]  # fmt: skip
    assert reasons(curate(rw, ro, CurationConfig(max_completion_tokens=5))).count("too_long") == 2
    truncated = curate(rw, ro, CurationConfig(drop_truncated=True))
    assert truncated.filter(pl.col("reason") == "truncated")["sample_idx"].to_list() == [1]
    capped = curate(rw, ro, CurationConfig(max_per_prompt=2))
    per_prompt = capped.filter(pl.col("selected")).group_by("prompt_id").len().sort("prompt_id")["len"].to_list()
    assert per_prompt == [2, 2, 2]
    # dropped rows are kept in the table, unselected, with weight 0
    assert capped.height == 9 and capped.filter(~pl.col("selected"))["weight"].to_list() == [0.0] * 3


@pytest.mark.parametrize("share", [0.2, 0.5, 0.8])
def test_target_positive_share(share):
    rw, ro = candidates()
    out = curate(rw, ro, CurationConfig(target_positive_share=share, seed=3)).join(rw, on=KEYS)
    kept = out.filter(pl.col("selected"))
    got = (kept["outcome"] == "correct").mean()
    assert abs(got - share) <= 0.15, got  # 9 rows: the closest reachable share
    assert out.height == 9
    again = curate(rw, ro, CurationConfig(target_positive_share=share, seed=3))
    assert reasons(again) == reasons(out.select(*KEYS, "reason"))


def test_rules_compose_first_reason_wins():
    rw, ro = candidates()
    out = curate(rw, ro, CurationConfig(drop_uniform_groups=True, max_completion_tokens=5))
    assert out.sort(KEYS)["reason"].to_list()[5] == "too_long"  # b/1 is long and in a uniform group
