"""Tests of the DuckDB catalog and the data checks: every sql/checks/ query is empty on good data and returns
exactly the planted bad rows; run_checks runs the checks of one stage; the views give hand-computed numbers."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import duckdb
import polars as pl
import pytest
from frames import advantages_frame, rewards_frame, rollouts_frame, train_set_frame

from storage import tables
from storage.catalog import bind, connect, connect_partition, query
from storage.checks import CheckFailed, load_checks, run_checks

PARAMS = {"experiment": "a", "round": 0, "reward_min": 0.0, "reward_max": 1.0}
STAGES = {
    "duplicate_advantages": "advantages",
    "duplicate_rewards": "rewards",
    "duplicate_rollouts": "rollouts",
    "duplicate_train_set": "curation",
    "nonfinite_advantages": "advantages",
    "positive_logprobs": "rollouts",
    "reward_out_of_range": "rewards",
    "rollouts_without_reward": "rewards",
}


def good_round(experiment: str = "a", round: int = 0) -> dict[str, pl.DataFrame]:
    args = {"experiment": experiment, "round": round, "n_prompts": 2, "G": 3, "seed": round}
    return {
        "rollouts": rollouts_frame(**args),
        "rewards": rewards_frame(**args),
        "advantages": advantages_frame(**args, delta_v=-0.1),
        "train_set": train_set_frame(**args),
    }


def write_round(store: str, frames: dict[str, pl.DataFrame], experiment: str = "a", round: int = 0) -> None:
    for table, frame in frames.items():
        tables.write_partition(store, table, frame, partition={"experiment": experiment, "round": round})


@pytest.fixture(scope="module")
def other_partitions(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base") / "store"
    write_round(str(root), good_round("a", 1), "a", 1)
    write_round(str(root), good_round("b", 0), "b", 0)
    return root


@pytest.fixture
def store(other_partitions, tmp_path) -> str:
    """Good data for a/1 and b/0 (which the checks of a/0 must not look at); tests write a/0."""
    root = tmp_path / "store"
    shutil.copytree(other_partitions, root)  # Delta logs hold relative paths, so a copy is a store
    return str(root)


def run_all_queries(store: str, params: dict = PARAMS) -> dict[str, pl.DataFrame]:
    con = connect(store)
    return {check.name: query(con, check.query, bind(check.query, params)) for check in load_checks()}


def with_values(frame: pl.DataFrame, prompt_id: str, sample_idx: int, **values) -> pl.DataFrame:
    """`frame` with some columns of one row replaced (lists included)."""
    rows = frame.to_dicts()
    for row in rows:
        if (row["prompt_id"], row["sample_idx"]) == (prompt_id, sample_idx):
            row.update(values)
    return pl.DataFrame(rows, schema=frame.schema)


def keys_of(rows: pl.DataFrame) -> set[tuple]:
    return set(rows.select("experiment", "round", "prompt_id", "sample_idx").iter_rows())


def test_checks_and_their_stage_headers():
    assert {check.name: check.stage for check in load_checks()} == STAGES


def test_checks_return_no_rows_on_good_data(store):
    write_round(store, good_round())
    results = run_all_queries(store)
    assert set(results) == set(STAGES)
    for name, rows in results.items():
        assert rows.height == 0, (name, rows)
    for stage in (None, "rollouts", "rewards", "advantages", "curation"):
        assert run_checks(store, experiment="a", round=0, stage=stage) == {}


def test_checks_see_only_their_partition(store):
    """run_checks reads only the checked partition's files: a duplicate planted in a/1 (a commit that
    never went through a check) does not fail the checks of a/0, and the partition views hold a/0 alone."""
    write_round(store, good_round())
    bad = good_round("a", 1)["rollouts"]
    tables.write_partition(store, "rollouts", pl.concat([bad, bad.head(1)]), partition={"experiment": "a", "round": 1})
    assert run_checks(store, experiment="a", round=0, stage="rollouts") == {}
    with pytest.raises(CheckFailed, match="duplicate_rollouts"):
        run_checks(store, experiment="a", round=1, stage="rollouts")
    con = connect_partition(store, ["rollouts", "rewards", "evals"], {"experiment": "a", "round": 0})
    seen = query(
        con, "select distinct experiment, round from rollouts union select distinct experiment, round from rewards"
    )
    assert seen.rows() == [("a", 0)]
    assert query(con, "select count(*) as n from evals")["n"][0] == 0  # never written: an empty typed view
    assert query(con, "select count(*) as n from rollouts")["n"][0] == good_round()["rollouts"].height


def _duplicate(table: str):
    def plant(frames):
        frames[table] = pl.concat([frames[table], frames[table].filter(pl.col("prompt_id") == "p1").head(1)])

    return plant


def _positive_logprobs(frames):
    rollouts = frames["rollouts"]
    rollouts = with_values(rollouts, "p0", 1, behaviour_logprob=0.5, behaviour_logprobs=[0.2, 0.3], num_tokens=2)
    rollouts = with_values(rollouts, "p1", 0, behaviour_logprob=float("nan"))
    # every token but one is fine and the sum is negative: only the positive token gives it away
    rollouts = with_values(rollouts, "p1", 2, behaviour_logprob=-2.5, behaviour_logprobs=[-3.0, 0.5], num_tokens=2)
    frames["rollouts"] = rollouts


def _rewards_out_of_range(frames):
    rewards = with_values(frames["rewards"], "p0", 2, reward=1.5)
    rewards = with_values(rewards, "p1", 0, reward=-0.5)
    frames["rewards"] = with_values(rewards, "p1", 1, reward=float("nan"))


def _rollout_without_reward(frames):
    rewards = frames["rewards"]
    frames["rewards"] = rewards.filter(~((pl.col("prompt_id") == "p1") & (pl.col("sample_idx") == 1)))


def _nonfinite_advantages(frames):
    advantages = with_values(frames["advantages"], "p0", 0, advantage=float("nan"))
    frames["advantages"] = with_values(advantages, "p1", 1, baseline=float("inf"))


DEFECTS = {
    # defect: (plant, the check that must see it, the bad rows' (prompt_id, sample_idx))
    "duplicate rollouts": (_duplicate("rollouts"), "duplicate_rollouts", {("p1", 0)}),
    "duplicate rewards": (_duplicate("rewards"), "duplicate_rewards", {("p1", 0)}),
    "duplicate advantages": (_duplicate("advantages"), "duplicate_advantages", {("p1", 0)}),
    "duplicate train_set": (_duplicate("train_set"), "duplicate_train_set", {("p1", 0)}),
    "positive or NaN log-probs": (_positive_logprobs, "positive_logprobs", {("p0", 1), ("p1", 0), ("p1", 2)}),
    "reward out of range or NaN": (_rewards_out_of_range, "reward_out_of_range", {("p0", 2), ("p1", 0), ("p1", 1)}),
    "rollout without reward": (_rollout_without_reward, "rollouts_without_reward", {("p1", 1)}),
    "NaN advantage, inf baseline": (_nonfinite_advantages, "nonfinite_advantages", {("p0", 0), ("p1", 1)}),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_check_returns_exactly_the_planted_rows(store, defect):
    plant, check, bad = DEFECTS[defect]
    frames = good_round()
    plant(frames)
    write_round(store, frames)
    results = run_all_queries(store)
    assert keys_of(results[check]) == {("a", 0, p, s) for p, s in bad}
    for name, rows in results.items():
        if name != check:
            assert rows.height == 0, (name, rows)  # each defect trips only its own check
    if check.startswith("duplicate_"):
        table = defect.split()[-1]
        assert results[check]["tbl"].to_list() == [table] and results[check]["copies"].to_list() == [2]

    with pytest.raises(CheckFailed) as err:
        run_checks(store, experiment="a", round=0, stage=STAGES[check])
    assert set(err.value.failures) == {check}
    assert f"check {check}: {len(bad)} bad rows" in str(err.value)
    for prompt_id, _ in bad:
        assert prompt_id in str(err.value)
    # the same checks on the other partitions of the store pass
    assert run_checks(store, experiment="a", round=1) == {}
    assert run_checks(store, experiment="b", round=0) == {}


def test_run_checks_runs_only_the_checks_of_its_stage(store):
    frames = good_round()
    _positive_logprobs(frames)
    _nonfinite_advantages(frames)
    write_round(store, frames)
    assert run_checks(store, experiment="a", round=0, stage="rewards") == {}
    assert run_checks(store, experiment="a", round=0, stage="curation") == {}
    for stage, expected in [
        ("rollouts", {"positive_logprobs"}),
        ("advantages", {"nonfinite_advantages"}),
        (None, {"positive_logprobs", "nonfinite_advantages"}),
    ]:
        with pytest.raises(CheckFailed) as err:
            run_checks(store, experiment="a", round=0, stage=stage)
        assert set(err.value.failures) == expected, stage


def test_reward_range_is_a_bound_parameter(store):
    frames = good_round()
    frames["rewards"] = with_values(frames["rewards"], "p1", 0, reward=-0.5)
    write_round(store, frames)
    with pytest.raises(CheckFailed):
        run_checks(store, experiment="a", round=0, stage="rewards")
    assert run_checks(store, experiment="a", round=0, stage="rewards", reward_range=(-1.0, 1.0)) == {}


# --- views on a hand-made round ----------------------------------------------------------------------------


@pytest.fixture
def hand_store(tmp_path) -> str:
    """a/0: 2 prompts × 3, a/1: 1 prompt × 2 (no advantages yet), b/0: 1 prompt × 4 with a half reward."""
    root = str(tmp_path / "store")
    a0 = {"experiment": "a", "round": 0, "n_prompts": 2, "G": 3}
    rewards_a0 = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    write_round(
        root,
        {
            "rollouts": rollouts_frame(**a0, lengths=[2, 4, 6, 1, 3, 5]),
            "rewards": rewards_frame(**a0, rewards=rewards_a0),
            "advantages": advantages_frame(**a0, rewards=rewards_a0, delta_v=-0.1),
        },
        "a",
        0,
    )
    a1 = {"experiment": "a", "round": 1, "n_prompts": 1, "G": 2}
    write_round(
        root,
        {"rollouts": rollouts_frame(**a1, lengths=[8, 8]), "rewards": rewards_frame(**a1, rewards=[1.0, 1.0])},
        "a",
        1,
    )
    b0 = {"experiment": "b", "round": 0, "n_prompts": 1, "G": 4}
    rewards_b0 = [1.0, 0.5, 0.0, 0.0]
    write_round(
        root,
        {
            "rollouts": rollouts_frame(**b0, lengths=[1, 1, 1, 1]),
            "rewards": rewards_frame(**b0, rewards=rewards_b0),
            "advantages": advantages_frame(**b0, rewards=rewards_b0),
        },
        "b",
        0,
    )
    return root


def test_hand_made_round_frames_are_what_the_view_expectations_assume(hand_store):
    rewards = tables.read(hand_store, "rewards", experiment="a", round=0).sort("prompt_id", "sample_idx")
    assert rewards["outcome"].to_list() == ["correct", "correct", "incorrect", "incorrect", "unparsable", "incorrect"]
    advantages = tables.read(hand_store, "advantages", experiment="a", round=0).sort("prompt_id", "sample_idx")
    assert advantages["baseline"].to_list() == pytest.approx([2 / 3 - 0.1] * 3 + [-0.1] * 3)


def test_round_summary(hand_store):
    rows = query(connect(hand_store), "select * from round_summary").to_dicts()
    # a/0: |A| = 1 − (2/3 − 0.1) twice, 0 − (2/3 − 0.1) once, 0.1 three times
    abs_a0 = (2 * (1 - (2 / 3 - 0.1)) + (2 / 3 - 0.1) + 3 * 0.1) / 6
    # b/0: group mean 0.375, |A| = 0.625, 0.125, 0.375, 0.375
    expected = [
        ("a", 0, 6, 2 / 6, 2 / 6, (2 + 4 + 6 + 1 + 3 + 5) / 6, abs_a0),
        ("a", 1, 2, 1.0, 1.0, 8.0, None),  # no advantages yet: the left join leaves a null
        ("b", 0, 4, 1.5 / 4, 1 / 4, 1.0, 1.5 / 4),
    ]
    assert len(rows) == len(expected)
    for row, (experiment, round, n, reward, correct, tokens, abs_adv) in zip(rows, expected):
        assert (row["experiment"], row["round"], row["rollouts"]) == (experiment, round, n)
        assert row["mean_reward"] == pytest.approx(reward)
        assert row["share_correct"] == pytest.approx(correct)
        assert row["mean_completion_tokens"] == pytest.approx(tokens)
        if abs_adv is None:
            assert row["mean_abs_advantage"] is None
        else:
            assert row["mean_abs_advantage"] == pytest.approx(abs_adv)


def test_prompt_difficulty(hand_store):
    rows = query(connect(hand_store), "select * from prompt_difficulty").rows()
    assert [r[:4] for r in rows] == [("a", "p0", 0, 3), ("a", "p0", 1, 2), ("a", "p1", 0, 3), ("b", "p0", 0, 4)]
    # a half reward is not "correct": b/p0 succeeds once in four
    assert [r[4] for r in rows] == pytest.approx([2 / 3, 1.0, 0.0, 1 / 4])


def test_round_summary_matches_a_python_loop(hand_store):
    """The same numbers computed row by row from tables.read, for every (experiment, round)."""
    rollouts, rewards, advantages = (tables.read(hand_store, t) for t in ("rollouts", "rewards", "advantages"))
    view = {
        (r["experiment"], r["round"]): r for r in query(connect(hand_store), "select * from round_summary").to_dicts()
    }
    for (experiment, round), row in view.items():
        tokens = [r["num_tokens"] for r in rollouts.to_dicts() if (r["experiment"], r["round"]) == (experiment, round)]
        rw = [r for r in rewards.to_dicts() if (r["experiment"], r["round"]) == (experiment, round)]
        adv = [r["advantage"] for r in advantages.to_dicts() if (r["experiment"], r["round"]) == (experiment, round)]
        assert row["rollouts"] == len(tokens)
        assert row["mean_completion_tokens"] == pytest.approx(sum(tokens) / len(tokens))
        assert row["mean_reward"] == pytest.approx(sum(r["reward"] for r in rw) / len(rw))
        assert row["share_correct"] == pytest.approx(sum(r["outcome"] == "correct" for r in rw) / len(rw))
        if adv:
            assert row["mean_abs_advantage"] == pytest.approx(sum(abs(a) for a in adv) / len(adv))
    assert len(view) == 3


def test_views_sql_follows_every_commit(hand_store):
    views_sql = Path(hand_store) / "views.sql"

    def count_in_fresh_connection() -> int:
        con = duckdb.connect()
        con.execute(views_sql.read_text())
        return con.sql("select count(*) from advantages").fetchall()[0][0]

    assert count_in_fresh_connection() == 10
    tables.write_partition(
        hand_store, "advantages", advantages_frame("a", 1, n_prompts=1, G=2), partition={"experiment": "a", "round": 1}
    )
    assert count_in_fresh_connection() == 12
    con = duckdb.connect()
    con.execute(views_sql.read_text())
    summary = dict(con.sql("select round, mean_abs_advantage from round_summary where experiment = 'a'").fetchall())
    assert summary[1] is not None and not math.isnan(summary[1])
