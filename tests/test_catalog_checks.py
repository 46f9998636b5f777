"""Tests of the DuckDB catalog, the SQL runner and the data checks: every check is empty on good data and
returns exactly the planted bad rows; run_checks runs the checks of the tables a stage wrote once the tables
they read are there; the views and round_summaries give hand-computed and naively computed numbers."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import duckdb
import polars as pl
import pytest
from frames import (
    advantages_frame,
    evals_frame,
    rewards_frame,
    rollouts_frame,
    train_set_frame,
    train_steps_frame,
)
from polars.testing import assert_frame_equal

from storage import catalog, tables
from storage.catalog import connect, connect_partition, round_summaries
from storage.checks import CheckFailed, duplicate_keys, load_checks, run_checks
from storage.schemas import ROW_KEYS
from storage.sql import SQL_DIR, query, run_file

# check → (the tables of the stage that writes what it checks, the tables upstream stages wrote)
STAGE_TABLES = {
    "duplicate_rollouts": (["rollouts"], ["prompts", "checkpoints"]),
    "duplicate_rewards": (["rewards"], ["rollouts"]),
    "duplicate_advantages": (["advantages"], ["rollouts", "rewards"]),
    "duplicate_train_set": (["train_set"], ["rollouts", "rewards", "advantages"]),
    "positive_logprobs": (["rollouts"], ["prompts", "checkpoints"]),
    "reward_out_of_range": (["rewards"], ["rollouts"]),
    "rollouts_without_reward": (["rewards"], ["rollouts"]),
    "nonfinite_advantages": (["advantages"], ["rollouts", "rewards"]),
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


def failures(store: str, experiment: str = "a", round: int = 0, **kw) -> dict[str, pl.DataFrame]:
    """What run_checks reports (every check of every table unless `tables=` says otherwise)."""
    try:
        return run_checks(store, experiment=experiment, round=round, **kw)
    except CheckFailed as err:
        return err.failures


def with_values(frame: pl.DataFrame, prompt_id: str, sample_idx: int, **values) -> pl.DataFrame:
    """`frame` with some columns of one row replaced (lists included)."""
    rows = frame.to_dicts()
    for row in rows:
        if (row["prompt_id"], row["sample_idx"]) == (prompt_id, sample_idx):
            row.update(values)
    return pl.DataFrame(rows, schema=frame.schema)


def keys_of(rows: pl.DataFrame) -> set[tuple]:
    return set(rows.select("experiment", "round", "prompt_id", "sample_idx").iter_rows())


# --- the SQL runner ------------------------------------------------------------------------------------


def test_query_binds_exactly_the_parameters_the_sql_uses():
    con = duckdb.connect()
    sql = "select $a + $b as s -- $c is only mentioned here\n, '$d' as text"
    assert query(con, sql, {"a": 1, "b": 2, "unused": 3}).rows() == [(3, "$d")]
    with pytest.raises(ValueError, match=r"uses \$b: pass a value"):
        query(con, sql, {"a": 1})
    assert query(con, "select 1 as one").rows() == [(1,)]


def test_run_file_sees_frames_as_tables():
    rewards = pl.DataFrame({"experiment": ["e"] * 3, "round": [0] * 3, "prompt_id": ["p"] * 3, "sample_idx": [0, 1, 2]})
    rewards = rewards.with_columns(reward=pl.Series([1.0, 0.0, 0.0]))
    out = run_file("advantages.sql", {"rewards": rewards}, {"mode": "group_mean", "delta_v": -0.1, "constant": 0.0})
    assert out["baseline"].to_list() == pytest.approx([1 / 3 - 0.1] * 3)
    assert (SQL_DIR / "advantages.sql").exists()


def test_tables_named_skips_comments_and_strings():
    assert catalog.tables_named("-- rewards\nselect 'advantages' as t, * from rollouts") == ["rollouts"]


# --- checks ------------------------------------------------------------------------------------------------


def test_checks_name_their_tables_and_no_stage():
    assert {check.name: set(check.tables) for check in load_checks()} == {
        "nonfinite_advantages": {"advantages"},
        "positive_logprobs": {"rollouts"},
        "reward_out_of_range": {"rewards"},
        "rollouts_without_reward": {"rollouts", "rewards"},
    }
    assert not any("stage:" in path.read_text() for path in (SQL_DIR / "checks").glob("*.sql"))


def test_checks_return_no_rows_on_good_data(store):
    write_round(store, good_round())
    assert failures(store) == {}
    for written, available in STAGE_TABLES.values():
        assert run_checks(store, experiment="a", round=0, tables=written, available=available) == {}


def test_checks_see_only_their_partition(store):
    """run_checks reads only the checked partition's files: a duplicate planted in a/1 (a commit that
    never went through a check) does not fail the checks of a/0, and the partition views hold a/0 alone."""
    write_round(store, good_round())
    bad = good_round("a", 1)["rollouts"]
    tables.write_partition(store, "rollouts", pl.concat([bad, bad.head(1)]), partition={"experiment": "a", "round": 1})
    assert run_checks(store, experiment="a", round=0, tables=["rollouts"]) == {}
    with pytest.raises(CheckFailed, match="duplicate_rollouts"):
        run_checks(store, experiment="a", round=1, tables=["rollouts"])
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
    found = failures(store)
    assert set(found) == {check}  # each defect trips only its own check
    assert keys_of(found[check]) == {("a", 0, p, s) for p, s in bad}
    if check.startswith("duplicate_"):
        assert found[check]["copies"].to_list() == [2]

    written, available = STAGE_TABLES[check]
    with pytest.raises(CheckFailed) as err:
        run_checks(store, experiment="a", round=0, tables=written, available=available)
    assert set(err.value.failures) == {check}
    assert f"check {check}: {len(bad)} bad rows" in str(err.value)
    for prompt_id, _ in bad:
        assert prompt_id in str(err.value)
    # the same checks on the other partitions of the store pass
    assert run_checks(store, experiment="a", round=1) == {}
    assert run_checks(store, experiment="b", round=0) == {}


def _two_modes(experiment: str, round: int, n_prompts: int = 4, seed: int = 0) -> pl.DataFrame:
    """Greedy and sampled evaluations of checkpoint `round` (the same test prompts)."""
    return pl.concat(
        [
            evals_frame(experiment, round, n_prompts, seed, mode="greedy"),
            evals_frame(experiment, round, n_prompts, seed + 1, mode="sampled"),
        ]
    )


@pytest.mark.parametrize(
    ("table", "frame", "key"),
    [
        ("train_steps", train_steps_frame("a", 0, n_steps=4), ["experiment", "round", "step"]),
        ("evals", _two_modes("a", 0), ["experiment", "round", "mode", "prompt_id", "sample_idx"]),
    ],
)
def test_duplicate_check_covers_every_keyed_table(store, table, frame, key):
    """One generic check from ROW_KEYS: a row repeated in train_steps or evals is caught like in rollouts,
    and a row that differs only outside the key is a duplicate too."""
    assert ROW_KEYS[table] == key
    tables.write_partition(store, table, frame, partition={"experiment": "a", "round": 0})
    assert run_checks(store, experiment="a", round=0, tables=[table]) == {}
    changed = frame.head(1).with_columns(pl.lit("another").alias("stage_key"))
    tables.write_partition(store, table, pl.concat([frame, changed]), partition={"experiment": "a", "round": 0})
    with pytest.raises(CheckFailed) as err:
        run_checks(store, experiment="a", round=0, tables=[table])
    rows = err.value.failures[f"duplicate_{table}"]
    assert rows.columns == [*key, "copies"]
    assert rows.select(key).rows() == frame.head(1).select(key).rows() and rows["copies"].to_list() == [2]
    assert_frame_equal(rows, duplicate_keys(store, table, experiment="a", round=0))
    assert duplicate_keys(store, table, experiment="a", round=1).height == 0


def test_a_check_that_reads_a_table_not_yet_available_does_not_run(store):
    """rollouts_without_reward names rollouts and rewards: after the rollouts stage (no rewards yet, every
    rollout lacks its reward) it does not run; after the rewards stage it does."""
    frames = good_round()
    tables.write_partition(store, "rollouts", frames["rollouts"], partition={"experiment": "a", "round": 0})
    assert run_checks(store, experiment="a", round=0, tables=["rollouts"], available=["prompts"]) == {}
    assert set(failures(store, tables=["rollouts"], available=["rewards"])) == {"rollouts_without_reward"}
    _rollout_without_reward(frames)
    tables.write_partition(store, "rewards", frames["rewards"], partition={"experiment": "a", "round": 0})
    assert run_checks(store, experiment="a", round=0, tables=["rewards"]) == {}  # rollouts not declared available
    assert set(failures(store, tables=["rewards"], available=["rollouts"])) == {"rollouts_without_reward"}


def test_run_checks_runs_only_the_checks_of_the_tables_written(store):
    frames = good_round()
    _positive_logprobs(frames)
    _nonfinite_advantages(frames)
    write_round(store, frames)
    assert run_checks(store, experiment="a", round=0, tables=["rewards"], available=["rollouts"]) == {}
    assert run_checks(store, experiment="a", round=0, tables=["train_set"], available=["advantages"]) == {}
    for written, expected in [
        (["rollouts"], {"positive_logprobs"}),
        (["advantages"], {"nonfinite_advantages"}),
        (None, {"positive_logprobs", "nonfinite_advantages"}),
    ]:
        assert set(failures(store, tables=written, available=["rewards"])) == expected, written
    with pytest.raises(KeyError, match="unknown tables \\['rolouts'\\]"):
        run_checks(store, experiment="a", round=0, tables=["rolouts"])


def test_reward_range_is_a_bound_parameter(store):
    frames = good_round()
    frames["rewards"] = with_values(frames["rewards"], "p1", 0, reward=-0.5)
    write_round(store, frames)
    with pytest.raises(CheckFailed):
        run_checks(store, experiment="a", round=0, tables=["rewards"])
    assert run_checks(store, experiment="a", round=0, tables=["rewards"], reward_range=(-1.0, 1.0)) == {}


# --- views on a hand-made round ----------------------------------------------------------------------------


def with_column(frame: pl.DataFrame, **columns: list) -> pl.DataFrame:
    return frame.with_columns(pl.Series(name, values, dtype=frame.schema[name]) for name, values in columns.items())


def write_at(store: str, table: str, frame: pl.DataFrame) -> None:
    tables.write_partition(
        store, table, frame, partition={"experiment": frame["experiment"][0], "round": frame["round"][0]}
    )


@pytest.fixture
def hand_store(tmp_path) -> str:
    """a/0: 2 prompts × 3, trained 2 steps, checkpoint 1 evaluated; a/1: 1 prompt × 2, no advantages,
    training or evaluation yet; b/0: 1 prompt × 4 with a half reward. views.sql written once at the end."""
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
    steps = with_column(
        train_steps_frame("a", 0, n_steps=2), positive_share=[0.2, 0.4], effective_positive_share=[0.1, 0.3]
    )
    write_at(root, "train_steps", steps)
    evals = _two_modes("a", 1, n_prompts=4)
    # checkpoint 1: greedy 3 of 4 correct, sampled 1 of 4
    write_at(root, "evals", with_column(evals, correct=[True, True, False, True, False, True, False, False]))
    write_at(root, "evals", with_column(evals_frame("a", 0, 2), correct=[False, False]))  # checkpoint 0: round −1
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
    catalog.write_views_sql(root)
    return root


def test_hand_made_round_frames_are_what_the_view_expectations_assume(hand_store):
    rewards = tables.read(hand_store, "rewards", experiment="a", round=0).sort("prompt_id", "sample_idx")
    assert rewards["outcome"].to_list() == ["correct", "correct", "incorrect", "incorrect", "unparsable", "incorrect"]
    advantages = tables.read(hand_store, "advantages", experiment="a", round=0).sort("prompt_id", "sample_idx")
    assert advantages["baseline"].to_list() == pytest.approx([2 / 3 - 0.1] * 3 + [-0.1] * 3)


SUMMARY_COLUMNS = [
    "experiment", "round", "rollouts", "mean_reward", "share_correct", "mean_completion_tokens",
    "mean_abs_advantage", "test_greedy", "test_sampled", "p", "p_eff", "steps",
]  # fmt: skip


def test_round_summary(hand_store):
    summary = query(connect(hand_store), "select * from round_summary")
    assert summary.columns == SUMMARY_COLUMNS
    # a/0: |A| = 1 − (2/3 − 0.1) twice, 0 − (2/3 − 0.1) once, 0.1 three times
    abs_a0 = (2 * (1 - (2 / 3 - 0.1)) + (2 / 3 - 0.1) + 3 * 0.1) / 6
    # b/0: group mean 0.375, |A| = 0.625, 0.125, 0.375, 0.375
    # what a round has not got yet (advantages, training, the next checkpoint's evals) is null; steps 0
    expected = [
        ("a", 0, 6, 2 / 6, 2 / 6, (2 + 4 + 6 + 1 + 3 + 5) / 6, abs_a0, 3 / 4, 1 / 4, 0.3, 0.2, 2),
        ("a", 1, 2, 1.0, 1.0, 8.0, None, None, None, None, None, 0),
        ("b", 0, 4, 1.5 / 4, 1 / 4, 1.0, 1.5 / 4, None, None, None, None, 0),
    ]
    assert summary.height == len(expected)
    for row, values in zip(summary.iter_rows(), expected):
        assert row[:3] == values[:3] and row[-1] == values[-1]
        for got, want in zip(row[3:-1], values[3:-1]):
            assert got is None if want is None else got == pytest.approx(want)


def test_prompt_difficulty(hand_store):
    rows = query(connect(hand_store), "select * from prompt_difficulty").rows()
    assert [r[:4] for r in rows] == [("a", "p0", 0, 3), ("a", "p0", 1, 2), ("a", "p1", 0, 3), ("b", "p0", 0, 4)]
    # a half reward is not "correct": b/p0 succeeds once in four
    assert [r[4] for r in rows] == pytest.approx([2 / 3, 1.0, 0.0, 1 / 4])


def naive_round_summary(store: str, experiment: str, round: int) -> dict:
    """round k of an experiment from tables.read and Python loops, as flows/iterate.py used to compute it."""

    def rows(table: str, k: int = round) -> list[dict]:
        return tables.read(store, table, experiment=experiment, round=k).to_dicts()

    def mean(values: list) -> float | None:
        return sum(values) / len(values) if values else None

    rollouts, rewards, advantages, steps = rows("rollouts"), rows("rewards"), rows("advantages"), rows("train_steps")
    evals = rows("evals", round + 1)
    return {
        "experiment": experiment,
        "round": round,
        "rollouts": len(rollouts),
        "mean_reward": mean([r["reward"] for r in rewards]),
        "share_correct": mean([r["outcome"] == "correct" for r in rewards]),
        "mean_completion_tokens": mean([r["num_tokens"] for r in rollouts]),
        "mean_abs_advantage": mean([abs(r["advantage"]) for r in advantages]),
        "test_greedy": mean([r["correct"] for r in evals if r["mode"] == "greedy"]),
        "test_sampled": mean([r["correct"] for r in evals if r["mode"] == "sampled"]),
        "p": mean([r["positive_share"] for r in steps]),
        "p_eff": mean([r["effective_positive_share"] for r in steps]),
        "steps": len(steps),
    }


def assert_summaries_equal(got: list[dict], expected: list[dict]) -> None:
    assert [(r["experiment"], r["round"]) for r in got] == [(r["experiment"], r["round"]) for r in expected]
    for row, want in zip(got, expected):
        assert list(row) == SUMMARY_COLUMNS
        for column in SUMMARY_COLUMNS:
            if want[column] is None:
                assert row[column] is None, (row, column)
            else:
                assert row[column] == pytest.approx(want[column]), (row, column)


def test_round_summary_matches_a_python_loop(hand_store):
    """The same numbers computed row by row from tables.read, for every (experiment, round)."""
    view = query(connect(hand_store), "select * from round_summary").to_dicts()
    assert_summaries_equal(view, [naive_round_summary(hand_store, r["experiment"], r["round"]) for r in view])
    assert len(view) == 3


def test_views_sql_shows_the_store_as_of_its_last_rewrite(hand_store):
    views_sql = Path(hand_store) / "views.sql"

    def count_in_fresh_connection() -> int:
        con = duckdb.connect()
        con.execute(views_sql.read_text())
        return con.sql("select count(*) from advantages").fetchall()[0][0]

    assert count_in_fresh_connection() == 10
    tables.write_partition(
        hand_store, "advantages", advantages_frame("a", 1, n_prompts=1, G=2), partition={"experiment": "a", "round": 1}
    )
    assert count_in_fresh_connection() == 10  # a write alone leaves views.sql as it was
    catalog.write_views_sql(hand_store)  # what a flow does after each stage
    assert count_in_fresh_connection() == 12
    con = duckdb.connect()
    con.execute(views_sql.read_text())
    summary = dict(con.sql("select round, mean_abs_advantage from round_summary where experiment = 'a'").fetchall())
    assert summary[1] is not None and not math.isnan(summary[1])


def test_views_sql_follows_a_moved_store(hand_store, tmp_path, monkeypatch):
    """views.sql names files relative to the store: after a move (the original gone) it still works, from the
    store's parent folder (`duckdb -init store/views.sql`) and from inside the store."""
    first = tmp_path / "first" / "store"
    shutil.copytree(hand_store, first)
    catalog.write_views_sql(str(first))
    moved = tmp_path / "elsewhere" / "store"
    moved.parent.mkdir()
    first.rename(moved)
    assert str(first) not in (moved / "views.sql").read_text().split("file_search_path", 1)[1].split(";", 1)[1]
    for cwd in (moved.parent, moved):
        monkeypatch.chdir(cwd)
        con = duckdb.connect()
        con.execute((moved / "views.sql").read_text())
        assert con.sql("select count(*) from advantages").fetchall()[0][0] == 10


# --- round_summaries: one experiment's rounds ----------------------------------------------------------------


def write_summary_round(store: str, experiment: str, k: int, *, trained: bool, evals: str | None) -> None:
    """Round k's rollouts, rewards and advantages (random, 3 prompts × 4), its training if `trained`, and the
    evaluation of checkpoint k + 1 in `evals` modes ("greedy", "both" or None)."""
    args = {"experiment": experiment, "round": k, "n_prompts": 3, "G": 4, "seed": 10 * k + len(experiment)}
    for table, build in (("rollouts", rollouts_frame), ("rewards", rewards_frame), ("advantages", advantages_frame)):
        write_at(store, table, build(**args))
    if trained:
        write_at(store, "train_steps", train_steps_frame(experiment, k, n_steps=k + 2, seed=k))
    if evals == "both":
        write_at(store, "evals", _two_modes(experiment, k + 1, n_prompts=5, seed=k))
    elif evals == "greedy":
        write_at(store, "evals", evals_frame(experiment, k + 1, 5, seed=k))


@pytest.fixture(scope="module")
def summary_store(tmp_path_factory) -> str:
    """a: rounds 0–3; round 2 evaluated greedy only, round 3 neither trained nor evaluated. b: rounds 0–1."""
    root = str(tmp_path_factory.mktemp("summaries") / "store")
    write_at(root, "evals", _two_modes("a", 0))  # checkpoint 0's evaluation belongs to no round's summary
    for k, trained, evals in [(0, True, "both"), (1, True, "both"), (2, True, "greedy"), (3, False, None)]:
        write_summary_round(root, "a", k, trained=trained, evals=evals)
    for k in range(2):
        write_summary_round(root, "b", k, trained=True, evals="both")
    return root


@pytest.mark.parametrize(("experiment", "rounds"), [("a", None), ("b", None), ("a", [2]), ("a", [3, 0]), ("a", [])])
def test_round_summaries_match_a_python_loop(summary_store, experiment, rounds):
    got = round_summaries(summary_store, experiment, rounds)
    every = {"a": range(4), "b": range(2)}[experiment]
    wanted = sorted(every if rounds is None else rounds)
    assert_summaries_equal(got.to_dicts(), [naive_round_summary(summary_store, experiment, k) for k in wanted])


def test_round_summaries_give_nulls_where_a_round_is_unfinished(summary_store):
    rows = {r["round"]: r for r in round_summaries(summary_store, "a").to_dicts()}
    assert rows[2]["test_greedy"] is not None and rows[2]["test_sampled"] is None
    assert rows[3]["test_greedy"] is None and rows[3]["p"] is None and rows[3]["steps"] == 0
    assert rows[3]["mean_reward"] is not None


def test_round_summaries_agree_with_the_catalog_view(summary_store):
    everything = query(connect(summary_store), "select * from round_summary")
    for experiment in ("a", "b"):
        assert_frame_equal(
            round_summaries(summary_store, experiment), everything.filter(pl.col("experiment") == experiment)
        )


def test_round_summaries_read_only_the_experiment_and_rounds_asked(summary_store, tmp_path):
    """The views hold only the experiment's partitions (and rounds k, k + 1 when rounds are given): with every
    other file gone from disk, the summaries are the same."""
    store = tmp_path / "store"
    shutil.copytree(summary_store, store)
    before = round_summaries(str(store), "a", [1, 2])
    for name in ("rollouts", "rewards", "advantages", "train_steps", "evals"):
        keep = set(tables.files(str(store), name, where={"experiment": "a", "round": [1, 2, 3]}))
        for path in set(tables.files(str(store), name)) - keep:
            Path(path).unlink()
    assert_frame_equal(round_summaries(str(store), "a", [1, 2]), before)
    for experiment, rounds in (("b", None), ("a", None), ("a", [0])):  # these do read the deleted files
        with pytest.raises(tables.DataFileMissing):
            round_summaries(str(store), experiment, rounds)
