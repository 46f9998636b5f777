"""The train stage: parameters move, micro-batching changes neither the gradient nor the logged statistics,
step and token counts follow the config, μ's recomputed log-probs match the model, and a non-finite loss
stops the round."""

from __future__ import annotations

import copy
import math

import numpy as np
import polars as pl
import pytest
import torch

from stages.config import TrainConfig
from stages.logprobs import recompute_logprobs, token_logprobs, warmup_lr
from stages.losses import LOSSES
from stages.models import build_tiny_model, build_tiny_tokenizer
from stages.train import NonFiniteError, RoundData, _row_tensors, accumulate_gradients, train_round


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer, seed=0), tokenizer


def rows_for(tokenizer, n: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    prompts, completions = [], []
    for i in range(n):
        a, b = rng.integers(0, 99, size=2)
        prompts.append(tokenizer(f"Q: {a}+{b}=? A:")["input_ids"])
        completions.append(tokenizer(str(a + b + (i % 3)))["input_ids"] + [tokenizer.eos_token_id])
    return pl.DataFrame(
        {
            "prompt_token_ids": prompts,
            "completion_token_ids": completions,
            "behaviour_logprobs": [[-1.0] * len(c) for c in completions],
            "advantage": rng.normal(size=n),
            "weight": np.ones(n),
            "positive": rng.random(n) < 0.3,
        }
    )


def recompute(model, rows: pl.DataFrame, temperature: float, batch_size: int, pad_id: int) -> list[list[float]]:
    prompts, completions = rows["prompt_token_ids"].to_list(), rows["completion_token_ids"].to_list()
    return recompute_logprobs(model, prompts, completions, temperature, batch_size, pad_id)


def test_token_logprobs_match_a_plain_forward_pass(tiny):
    model, tokenizer = tiny
    rows = rows_for(tokenizer, 5)
    prompts, completions = rows["prompt_token_ids"].to_list(), rows["completion_token_ids"].to_list()
    with torch.no_grad():
        got, mask = token_logprobs(model, prompts, completions, 0.7, tokenizer.pad_token_id)
    assert mask.sum(1).tolist() == [len(c) for c in completions] and mask[:, 0].all()
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(rows["prompt_token_ids"], rows["completion_token_ids"])):
            ids = torch.tensor([list(p) + list(c)])
            logp = torch.log_softmax(model(input_ids=ids).logits[0] / 0.7, -1)
            want = [logp[len(p) - 1 + j, tok].item() for j, tok in enumerate(c)]
            assert got[i, : len(c)].tolist() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("loss", ["asymre", "topr", "sft"])
def test_one_micro_batch_of_8_equals_8_of_1(tiny, loss):
    model, tokenizer = tiny
    rows = rows_for(tokenizer, 8, seed=1)
    config = TrainConfig(loss=loss, batch_size=8, micro_batch_size=8)
    mu = recompute(model, rows, 1.0, 8, tokenizer.pad_token_id)
    mu = [[x - 0.3 * (i % 2) for x in row] for i, row in enumerate(mu)]  # π ≠ μ so TOPR's clip matters
    data = RoundData(
        rows["prompt_token_ids"].to_list(), rows["completion_token_ids"].to_list(), mu, *_row_tensors(rows)
    )
    grads = []
    for split in ([np.arange(8)], [np.array([i]) for i in range(8)]):
        m = copy.deepcopy(model).train()
        accumulate_gradients(m, LOSSES[loss], data, split, config, 1.0, tokenizer.pad_token_id)
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def off_policy_rows(model, tokenizer) -> pl.DataFrame:
    """8 rows whose engine log μ is offset from the model's by a per-row constant (ratios on both sides of 1),
    with uneven weights: the per-micro-batch ratios of sums differ from the batch's."""
    rows = rows_for(tokenizer, 8, seed=3)
    mu = recompute(model, rows, 1.0, 8, tokenizer.pad_token_id)
    offsets = [0.2 * (-1) ** i * (1 + i % 3) for i in range(8)]  # log π − log μ = −offset per token
    mu = [[x + o for x in row] for row, o in zip(mu, offsets)]
    return rows.with_columns(
        pl.Series("behaviour_logprobs", mu, dtype=pl.List(pl.Float32)),
        pl.Series("weight", np.linspace(0.5, 2.0, 8)),
    )


def naive_step_stats(model, rows: pl.DataFrame) -> dict[str, float]:
    """ratio_clipped and p̃ of the whole batch by a loop over rows (float64)."""
    logp = recompute(model, rows, 1.0, 1, 0)
    clipped, positive_mass, mass = [], 0.0, 0.0
    for lp, mu, a, w in zip(logp, rows["behaviour_logprobs"], rows["advantage"], rows["weight"]):
        if a < 0:
            clipped.append(float(sum(lp) - sum(mu) > 0))
        mass += w * abs(a)
        positive_mass += w * abs(a) if a > 0 else 0.0
    return {"ratio_clipped": sum(clipped) / len(clipped), "effective_positive_share": positive_mass / mass}


def test_logged_statistics_do_not_depend_on_the_micro_batch_split(tiny):
    """p̃ and ratio_clipped are ratios of sums: micro-batches add their sums; a mean of per-micro-batch
    ratios (weighted by rows) would give another number for each split."""
    model, tokenizer = tiny
    rows = off_policy_rows(model, tokenizer)
    negatives = rows["advantage"] < 0
    assert 0 < negatives.sum() < 8
    want = naive_step_stats(model, rows)
    assert 0 < want["ratio_clipped"] < 1
    logged = []
    for micro in (8, 4, 2, 1):
        config = TrainConfig(loss="topr", batch_size=8, micro_batch_size=micro, behaviour_logprobs="engine")
        result = train_round(
            copy.deepcopy(model), rows, config, experiment="e", round=0, temperature=1.0,
            pad_id=tokenizer.pad_token_id, seed=0,
        )  # fmt: skip
        logged.append(result.steps.row(0, named=True))
    for step in logged:
        for key in ("ratio_clipped", "effective_positive_share"):
            assert step[key] == pytest.approx(want[key], rel=1e-6)
        for key in ("ratio_mean", "ratio_min", "ratio_max", "positive_share"):
            assert step[key] == pytest.approx(logged[0][key], rel=1e-6)

    # an uneven split, straight through accumulate_gradients
    config = TrainConfig(loss="topr", batch_size=8, micro_batch_size=8)
    data = RoundData(
        rows["prompt_token_ids"].to_list(), rows["completion_token_ids"].to_list(),
        rows["behaviour_logprobs"].to_list(), *_row_tensors(rows),
    )  # fmt: skip
    for split in ([np.arange(8)], [np.arange(5), np.array([5]), np.array([6, 7])], [np.array([i]) for i in range(8)]):
        _, stats = accumulate_gradients(
            copy.deepcopy(model).train(), LOSSES["topr"], data, split, config, 1.0, tokenizer.pad_token_id
        )
        assert stats == pytest.approx({k: logged[0][k] for k in stats}, rel=1e-6)


def test_warmup_lr():
    assert [warmup_lr(s, 1e-3, 4) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert warmup_lr(0, 1e-3, 0) == 1e-3


def test_steps_tokens_and_parameters(tiny):
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    rows = rows_for(tokenizer, 37)
    config = TrainConfig(batch_size=8, micro_batch_size=4, epochs=2, warmup_steps=3, lr=1e-3)
    result = train_round(
        model, rows, config, experiment="e", round=0, temperature=1.0, pad_id=tokenizer.pad_token_id, seed=0
    )
    assert result.steps.height == 2 * math.ceil(37 / 8)
    assert result.steps["tokens"].sum() == 2 * rows["completion_token_ids"].list.len().sum()
    assert result.steps["lr"].to_list()[:4] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])
    assert result.steps["epoch"].to_list() == [0] * 5 + [1] * 5
    assert result.optimizer_state["global_step"] == 10
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the engine's log μ (−1 everywhere here) differs from the model's: the gap is measured, not assumed
    assert result.logprob_gap > 0.1


def test_optimizer_state_carries_the_warmup_clock(tiny):
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    rows = rows_for(tokenizer, 16)
    config = TrainConfig(batch_size=8, micro_batch_size=8, warmup_steps=4, lr=1e-3)
    first = train_round(model, rows, config, experiment="e", round=0, temperature=1.0, pad_id=0, seed=0)
    second = train_round(
        model, rows, config, experiment="e", round=1, temperature=1.0, pad_id=0, seed=0,
        optimizer_state=first.optimizer_state,
    )  # fmt: skip
    assert second.steps["lr"].to_list() == pytest.approx([3e-3 / 4, 1e-3])


def test_recomputed_mu_matches_model_exactly(tiny):
    model, tokenizer = tiny
    rows = rows_for(tokenizer, 6)
    mu = recompute(model, rows, 1.0, 4, tokenizer.pad_token_id)
    rows = rows.with_columns(pl.Series("behaviour_logprobs", mu, dtype=pl.List(pl.Float32)))
    result = train_round(
        copy.deepcopy(model), rows, TrainConfig(batch_size=8, micro_batch_size=8), experiment="e", round=0,
        temperature=1.0, pad_id=tokenizer.pad_token_id, seed=0,
    )  # fmt: skip
    assert result.logprob_gap < 1e-6
    # on the first step π = μ, so every ratio is 1
    first = result.steps.row(0, named=True)
    assert first["ratio_min"] == pytest.approx(1.0, abs=1e-5) and first["ratio_max"] == pytest.approx(1.0, abs=1e-5)


def test_non_finite_loss_stops_the_round(tiny):
    model, tokenizer = tiny
    rows = rows_for(tokenizer, 8).with_columns(pl.lit(float("nan")).alias("advantage"))
    with pytest.raises(NonFiniteError, match="loss is nan"):
        train_round(copy.deepcopy(model), rows, TrainConfig(batch_size=8, micro_batch_size=8), experiment="e",
                    round=0, temperature=1.0, pad_id=0, seed=0)  # fmt: skip
