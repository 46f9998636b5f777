"""The eval stage: greedy and sampled rows of a briefly warm-started tiny policy, judged by an injected verifier."""

from __future__ import annotations

import polars as pl
import pytest

from stages.config import EvalConfig, ModelConfig, PromptsConfig
from stages.evaluate import evaluate
from stages.models import build_tiny_model, build_tiny_tokenizer, warm_start
from stages.prompts import builtin_prompts, render_prompts
from stages.rollout import Engine, Sampling
from storage.schemas import SCHEMAS

# 7 distinct sums that 40 steps memorise, so some answers come out right
TASK = PromptsConfig(ops=["+"], max_operand=2, n_train=200, n_test=2)


def same_string(completions, golds):
    return [
        ("correct" if c.strip() == g else "incorrect", c.strip() or None)
        for c, g in zip(completions, golds, strict=True)
    ]


@pytest.fixture(scope="module")
def policy():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    train = builtin_prompts(TASK, seed=0).filter(pl.col("split") == "train")
    config = ModelConfig(warm_start_steps=40, warm_start_batch_size=16, warm_start_lr=3e-3, warm_start_target=None)
    warm_start(model, tokenizer, train, config, TASK.template, TASK.use_chat_template, seed=0, device="cpu")
    questions = render_prompts(train.unique("prompt").sort("prompt"), tokenizer, TASK.template, TASK.use_chat_template)
    return model, tokenizer, questions


def accuracy(evals: pl.DataFrame, mode: str) -> float | None:
    return evals.filter(pl.col("mode") == mode)["correct"].mean()


def run(policy, config=None, seed=0, max_new_tokens=6):
    model, tokenizer, questions = policy
    return evaluate(
        model,
        tokenizer,
        questions,
        config or EvalConfig(sampled=3),
        sampling=Sampling(temperature=1.0, top_k=0, top_p=1.0),
        max_new_tokens=max_new_tokens,
        engine=Engine("hf", batch_size=2048, gpu_memory_utilization=0.85),
        verify_fn=same_string,
        experiment="e",
        round=1,
        policy_version="v1",
        seed=seed,
        device="cpu",
    )


def test_rows_modes_and_schema(policy):
    questions = policy[2]
    evals = run(policy)
    assert evals.schema == pl.from_arrow(SCHEMAS["evals"].empty_table()).drop("stage_key").schema
    greedy, sampled = evals.filter(pl.col("mode") == "greedy"), evals.filter(pl.col("mode") == "sampled")
    assert greedy["prompt_id"].to_list() == questions["prompt_id"].to_list()
    assert set(greedy["sample_idx"]) == {0}
    assert sampled.height == 3 * questions.height
    assert sampled["sample_idx"].to_list() == [0, 1, 2] * questions.height
    joined = evals.join(questions.select("prompt_id", "answer"), on="prompt_id")
    assert joined["correct"].to_list() == [c.strip() == g for c, g in joined.select("completion", "answer").iter_rows()]
    assert (joined["extracted_answer"] == joined["completion"].str.strip_chars()).all()


def test_warm_started_policy_gets_answers(policy):
    evals = run(policy)
    assert accuracy(evals, "greedy") > 0.5 and accuracy(evals, "sampled") > 0.2


def test_greedy_is_deterministic_sampling_follows_seed(policy):
    a, b = run(policy, seed=0), run(policy, seed=0)
    assert a.equals(b)
    greedy_other = run(policy, EvalConfig(sampled=0), seed=9)
    assert greedy_other.equals(a.filter(pl.col("mode") == "greedy"))


def test_modes_can_be_switched_off(policy):
    only_sampled = run(policy, EvalConfig(greedy=False, sampled=1))
    assert set(only_sampled["mode"]) == {"sampled"}
    nothing = run(policy, EvalConfig(greedy=False, sampled=0))
    assert nothing.height == 0


def test_max_new_tokens_limits_the_answers(policy):
    evals = run(policy, EvalConfig(sampled=2), max_new_tokens=1)
    tokenizer = policy[1]
    assert all(len(tokenizer(c, add_special_tokens=False)["input_ids"]) <= 1 for c in evals["completion"])
