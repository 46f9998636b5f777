"""Verifiers: a table of numeric cases, adversarial inputs against the clock, the box scanner against a naive
twin, math_verify equivalences and time limits, and the rewards frame that `score` builds."""

from __future__ import annotations

import os
import random
import re
import signal
import time

import numpy as np
import polars as pl
import pytest

from stages.config import RewardConfig
from stages.verify import (
    OUTCOMES,
    POOL_GRACE_S,
    VERIFIER_VERSION,
    BadGold,
    _last_box,
    check,
    map_with_timeout,
    score,
    verify_batch,
)
from storage.schemas import SCHEMAS

BIG = "filler text with no digits at all. " * 30_000  # ~1 MB
# Linear scanning takes ~0.3 s on 1 MB here; catastrophic backtracking would take minutes. The bound is loose
# because these tests share their CPUs with whatever else runs.
FAST_S = 5.0

# (completion, gold, outcome, extracted_answer)
NUMERIC_CASES = [
    ("", "1", "unparsable", None),
    ("no numbers here", "1", "unparsable", None),
    ("The answer is \\boxed{42}.", "42", "correct", "42"),
    ("\\boxed{41}", "42", "incorrect", "41"),
    ("first \\boxed{1} then \\boxed{2}", "2", "correct", "2"),
    ("first \\boxed{2} then \\boxed{1}", "2", "incorrect", "1"),
    ("\\boxed{\\frac{1}{2}}", "0.5", "correct", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", "correct", "\\dfrac{3}{4}"),
    ("\\boxed{\\tfrac{3}{4}}", "3/4", "correct", "\\tfrac{3}{4}"),
    ("\\boxed{\\frac12}", "0.5", "correct", "\\frac12"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", "correct", "-\\frac{1}{2}"),
    ("\\boxed{\\frac{-1}{2}}", "-1/2", "correct", "\\frac{-1}{2}"),
    ("so it is 3/4", "0.75", "correct", "3/4"),
    ("x = \u22125", "-5", "correct", "-5"),  # U+2212 minus
    ("\\boxed{\u22127}", "-7", "correct", "\u22127"),
    ("the change is \u20137", "-7", "correct", "-7"),  # en dash
    ("5-3", "3", "correct", "3"),  # subtraction, not -3
    ("The answer is -3", "-3", "correct", "-3"),
    ("\\boxed{1,000}", "1000", "correct", "1,000"),
    ("about 1,000 people", "1000", "correct", "1,000"),
    ("\\boxed{1000}", "1,000", "correct", "1000"),
    ("\\boxed{10{,}000}", "10000", "correct", "10{,}000"),
    ("\\boxed{1,2}", "12", "unparsable", "1,2"),  # not a thousands separator
    ("\\boxed{50\\%}", "50", "correct", "50\\%"),
    ("It grew by 50%", "50", "correct", "50"),
    ("\\boxed{50}", "50%", "correct", "50"),
    ("\\boxed{2.50}", "2.5", "correct", "2.50"),
    ("\\boxed{.5}", "1/2", "correct", ".5"),
    ("answer 0.333", "1/3", "incorrect", "0.333"),
    ("#### 42", "42", "correct", "42"),
    ("12 apples\n#### 42\n", "42", "correct", "42"),
    ("#### Step 2\nSo the answer is 7", "7", "correct", "7"),  # a markdown heading is not the marker
    ("2 apples and 3 pears make 5", "5", "correct", "5"),
    ("2 apples and 3 pears make 5", "3", "incorrect", "5"),
    ("Total: $1,234.00", "1234", "correct", "$1,234.00"),
    ("\\boxed{\\$1,234.00}", "1234", "correct", "\\$1,234.00"),
    ("The answer is 18.", "18", "correct", "18"),
    ("\\boxed{3.}", "3", "correct", "3."),
    ("The answer is 12 apples", "12", "correct", "12"),
    ("\\boxed{12 \\text{ apples}}", "12", "correct", "12 \\text{ apples}"),
    ("\\boxed{5\\text{cm}}", "5", "correct", "5\\text{cm}"),
    ("\\boxed{90^\\circ}", "90", "correct", "90^\\circ"),
    ("\\boxed{x = 5}", "5", "correct", "x = 5"),
    ("\\boxed{-0}", "0", "correct", "-0"),
    ("\\boxed{0}", "-0", "correct", "0"),
    ("\\boxed{" + "9" * 150 + "}", "9" * 150, "correct", "9" * 150),
    ("\\boxed{" + "9" * 300 + "}", "1", "unparsable", "9" * 200),  # over MAX_NUMBER_CHARS, and truncated
    ("\\boxed{", "1", "unparsable", None),
    ("\\boxed{42", "42", "correct", "42"),  # never closed: no box, so the last number
    ("\\boxed{}", "1", "unparsable", ""),
    ("\\boxed{\\boxed{5}}", "5", "correct", "5"),
    ("\\boxed{{5}}", "5", "correct", "{5}"),
    ("} } stray closers \\boxed{3} }", "3", "correct", "3"),
    ("\\boxed{\\{1\\} x}", "1", "unparsable", "\\{1\\} x"),  # escaped braces do not close the box
    ("\\boxed{5x}", "5", "unparsable", "5x"),
    ("\\boxed{2 \\times 3}", "6", "unparsable", "2 \\times 3"),
    ("\\boxed{1/0}", "1", "unparsable", "1/0"),
    ("\\boxed{\\text{seven}}", "7", "unparsable", "\\text{seven}"),
    ("First \\boxed{3}, finally \\boxed{5}", "5", "correct", "5"),  # the last box is the answer
    ("First \\boxed{5}, finally \\boxed{3}", "5", "incorrect", "3"),
    ("\\boxed{\\left(\\frac{1}{2}\\right)}", "0.5", "correct", "\\left(\\frac{1}{2}\\right)"),
    ("\\boxed{(-3)}", "-3", "correct", "(-3)"),
    ("\\boxed{(1)(2)}", "2", "unparsable", "(1)(2)"),  # a product, not a value in parentheses
    (BIG + "\\boxed{7}", "7", "correct", "7"),
    (BIG, "7", "unparsable", None),
]


@pytest.mark.parametrize(("completion", "gold", "outcome", "extracted"), NUMERIC_CASES)
def test_numeric(completion, gold, outcome, extracted):
    start = time.perf_counter()
    assert check(completion, gold) == (outcome, extracted)
    assert time.perf_counter() - start < FAST_S


ADVERSARIAL = {
    "1 MB of letters": "a" * 2**20,
    "1 MB of numbers": "1 " * 2**19,
    "1 MB of digits": "9" * 2**20,
    "1 MB of opening braces, then a box": "{" * 2**20 + "\\boxed{1}",
    "unclosed boxes": "\\boxed{" * 150_000,
    "closed boxes": "\\boxed{1}" * 100_000,
    "nested boxes": "\\boxed{" * 100_000 + "}" * 100_000,
    "stray closers": "}" * 2**20 + "\\boxed{1" + "}" * 2**20,
    "hashes": "#### " * 200_000,
    "dashes": "-" * 2**20,
    "dashes and spaces": "- " * 2**19,
    "dollars": "$" * 2**20,
    "comma runs": "1," * 2**19,
    "thousands": "1,000" * 200_000,
    "fractions": "\\frac{" * 150_000,
    "spaces in a box": "\\boxed{5" + " " * 2**20 + "x}",
    "backslashes": "\\" * 2**20,
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_numeric_adversarial_inputs_stay_fast(name):
    start = time.perf_counter()
    outcome, extracted = check(ADVERSARIAL[name], "1")
    assert time.perf_counter() - start < FAST_S
    assert outcome in OUTCOMES
    assert extracted is None or len(extracted) <= 200


def naive_last_box(text: str) -> str | None:
    """Each \\boxed{ scanned on its own to its matching brace (quadratic); the one opened last wins."""
    tokens = re.compile(r"\\\\|\\[{}]|\\boxed\s*\{|[{}]")
    best = None
    for opener in re.finditer(r"\\boxed\s*\{", text):
        depth = 1
        for m in tokens.finditer(text, opener.end()):
            depth += {"{": 1, "}": -1}.get(m.group(), 1 if m.group().startswith("\\boxed") else 0)
            if depth == 0:
                best = text[opener.end() : m.start()]
                break
    return best


def test_last_box_matches_naive_twin():
    rng = random.Random(0)
    pieces = ["\\boxed{", "\\boxed {", "{", "}", "\\{", "\\}", "\\\\", "1", "x", " ", "\\boxed"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert _last_box(text) == naive_last_box(text), text


def test_numeric_gold_must_be_a_number():
    with pytest.raises(BadGold, match="math_verify"):
        check("\\boxed{1}", "\\frac{\\sqrt{3}}{2}")
    with pytest.raises(ValueError, match="unknown verifier"):
        check("1", "1", verifier="sympy")


# ---------------------------------------------------------------- math_verify

MATH_CASES = [
    ("\\boxed{\\frac{1}{2}}", "0.5", "correct"),
    ("\\boxed{0.5}", "\\frac{1}{2}", "correct"),
    ("The answer is $2x + x^2$.", "x^2+2x", "correct"),
    ("\\boxed{x^2 - 2x}", "x^2+2x", "incorrect"),
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", "correct"),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", "correct"),
    ("\\boxed{3}", "4", "incorrect"),
    ("First \\boxed{3}, finally \\boxed{5}", "5", "correct"),  # the last box, not the set {3, 5}
    ("First \\boxed{5}, finally \\boxed{3}", "5", "incorrect"),
    ("\\boxed{\\left(\\frac{1}{2}\\right)}", "0.5", "correct"),
    ("I do not know.", "4", "unparsable"),
]


@pytest.fixture(scope="module")
def forkserver():
    """Start the forkserver (it imports math_verify once) outside the timed tests."""
    assert check("\\boxed{1}", "1", "math_verify") == ("correct", "1")


def test_math_verify_equivalences(forkserver):
    completions, golds, expected = zip(*MATH_CASES)
    verdicts = verify_batch(list(completions), list(golds), "math_verify", timeout_s=5, workers=2)
    assert [o for o, _ in verdicts] == list(expected)
    assert verdicts[0][1] == "\\frac{1}{2}"
    assert check("\\boxed{\\frac{1}{2}}", "0.5", "math_verify") == ("correct", "\\frac{1}{2}")


def test_math_verify_pathological_expression_times_out(forkserver, caplog):
    # Without time limits math_verify is still busy with this after 60 s (sympy evaluates the tower).
    # math_verify's own alarm, set to the item's time left, stops it inside the worker: no pool is killed.
    timeout_s = 1.0
    start = time.perf_counter()
    verdicts = verify_batch(
        ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{4}"], ["1", "4"], "math_verify", timeout_s=timeout_s, workers=2
    )
    elapsed = time.perf_counter() - start
    assert verdicts[0][0] == "timeout"
    assert verdicts[1] == ("correct", "4")
    assert elapsed < timeout_s + POOL_GRACE_S + 5.0  # 5 s for starting the pool
    assert "killing the worker pool" not in caplog.text


def stuck_where_signals_cannot_reach(text: str, timeout_s: float) -> tuple[str, str | None]:
    """A stand-in for a worker stuck in C code: no alarm can interrupt it, only killing the process."""
    if text == "stuck":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGINT})
        time.sleep(3600)
    if text == "crash":
        os._exit(1)
    return "correct", text


def test_pool_kills_a_stuck_worker_and_carries_on(forkserver, caplog):
    timeout_s = 1.0
    items = [("a",), ("stuck",), ("b",), ("c",), ("d",)]
    start = time.perf_counter()
    verdicts = map_with_timeout(stuck_where_signals_cannot_reach, items, timeout_s, workers=2)
    elapsed = time.perf_counter() - start
    assert verdicts == [("correct", "a"), ("timeout", None), ("correct", "b"), ("correct", "c"), ("correct", "d")]
    assert elapsed < timeout_s + POOL_GRACE_S + 5.0  # 5 s for starting two pools
    assert "item 1 still running after 1.0s; killing the worker pool" in caplog.text


def test_pool_survives_a_crashing_worker():
    items = [("a",), ("crash",), ("b",), ("c",)]
    verdicts = map_with_timeout(stuck_where_signals_cannot_reach, items, 5.0, workers=2)
    assert verdicts == [("correct", "a"), ("timeout", None), ("correct", "b"), ("correct", "c")]


def test_math_verify_rejects_empty_gold_before_any_work():
    with pytest.raises(ValueError, match="empty gold"):
        verify_batch(["\\boxed{1}"], [" "], "math_verify")


# ---------------------------------------------------------------- score


def rollouts(rows: list[tuple[str, int, str]]) -> pl.DataFrame:
    """(prompt_id, sample_idx, completion) rows, with the other rollouts columns a stage would see."""
    return pl.DataFrame(
        {
            "experiment": ["exp"] * len(rows),
            "round": pl.Series([3] * len(rows), dtype=pl.Int32),
            "prompt_id": [r[0] for r in rows],
            "sample_idx": pl.Series([r[1] for r in rows], dtype=pl.Int32),
            "completion": [r[2] for r in rows],
            "num_tokens": pl.Series([7] * len(rows), dtype=pl.Int32),
        }
    )


PROMPTS = pl.DataFrame(
    {
        "dataset": ["d"] * 3,
        "prompt_id": ["p0", "p1", "p2"],
        "prompt": ["q0", "q1", "q2"],
        "answer": ["4", "10", "0.5"],
    }
)


def round_rows(n_per_prompt: int = 6, seed: int = 0) -> list[tuple[str, int, str]]:
    rng = random.Random(seed)
    rows = []
    for pid, right in (("p0", "4"), ("p1", "10"), ("p2", "\\frac{1}{2}")):
        for s in range(n_per_prompt):
            rows.append((pid, s, rng.choice([f"so \\boxed{{{right}}}", "so \\boxed{7}", "no idea"])))
    rng.shuffle(rows)  # the stage keeps whatever order it gets
    return rows


def expected_schema() -> dict:
    return dict(pl.from_arrow(SCHEMAS["rewards"].empty_table()).drop("stage_key").schema)


def test_score_frame_schema_order_and_rewards():
    rows = round_rows()
    out = score(rollouts(rows), PROMPTS, RewardConfig(correct=1.0, incorrect=-1.0))
    assert list(out.schema.items()) == list(expected_schema().items())
    assert out.select("prompt_id", "sample_idx").rows() == [(p, s) for p, s, _ in rows]
    want = [
        "correct" if "7" not in c and "idea" not in c else "unparsable" if "idea" in c else "incorrect"
        for _, _, c in rows
    ]
    assert out["outcome"].to_list() == want
    assert out["reward"].to_list() == [1.0 if o == "correct" else -1.0 for o in want]
    assert out["extracted_answer"].null_count() == want.count("unparsable")
    assert set(out["verifier"]) == {"numeric"} and set(out["verifier_version"]) == {VERIFIER_VERSION}
    assert set(out["experiment"]) == {"exp"} and set(out["round"]) == {3}


def test_score_missing_gold_names_the_prompt():
    frame = rollouts([("p0", 0, "4"), ("p9", 0, "4"), ("p9", 1, "5")])
    with pytest.raises(ValueError, match="p9"):
        score(frame, PROMPTS, RewardConfig())
    no_answer = PROMPTS.with_columns(
        pl.when(pl.col("prompt_id") == "p0").then(None).otherwise("answer").alias("answer")
    )
    with pytest.raises(ValueError, match="p0"):
        score(rollouts([("p0", 0, "4")]), no_answer, RewardConfig())


def test_score_numeric_gold_that_is_not_a_number_names_the_prompt():
    prompts = PROMPTS.with_columns(pl.Series("answer", ["4", "\\sqrt{2}", "1"]))
    with pytest.raises(BadGold, match=r"p1.*math_verify"):
        score(rollouts([("p1", 0, "\\boxed{2}")]), prompts, RewardConfig())


def test_score_shuffle_keeps_the_rewards_but_not_their_rows():
    frame = rollouts(round_rows(n_per_prompt=10, seed=1))
    plain = score(frame, PROMPTS, RewardConfig())
    shuffled = score(frame, PROMPTS, RewardConfig(shuffle=True), seed=5)
    again = score(frame, PROMPTS, RewardConfig(shuffle=True), seed=5)
    other = score(frame, PROMPTS, RewardConfig(shuffle=True), seed=6)
    assert shuffled.equals(again)
    assert sorted(shuffled["reward"]) == sorted(plain["reward"])
    assert shuffled["reward"].to_list() != plain["reward"].to_list()
    assert shuffled["reward"].to_list() != other["reward"].to_list()
    # reward and outcome travel together; what the completion said stays on its row
    assert (shuffled["reward"] == 1.0).to_list() == (shuffled["outcome"] == "correct").to_list()
    assert shuffled["extracted_answer"].equals(plain["extracted_answer"])
    assert shuffled.select("prompt_id", "sample_idx").equals(plain.select("prompt_id", "sample_idx"))
    order = np.random.default_rng(5).permutation(frame.height)
    assert shuffled["outcome"].to_list() == [plain["outcome"][int(i)] for i in order]


def test_score_empty_and_math_verify():
    empty = score(rollouts([]), PROMPTS, RewardConfig())
    assert empty.height == 0 and list(empty.schema.items()) == list(expected_schema().items())
    frame = rollouts([("p2", 0, "\\boxed{\\frac{1}{2}}"), ("p1", 1, "\\boxed{9}")])
    out = score(frame, PROMPTS, RewardConfig(verifier="math_verify", timeout_s=5, workers=1))
    assert out["outcome"].to_list() == ["correct", "incorrect"]
    assert set(out["verifier"]) == {"math_verify"}
    assert list(out.schema.items()) == list(expected_schema().items())
