"""The rollouts stage on a tiny random Qwen2: behaviour log-probs match the forward pass, seeds reproduce,
rows have the table's shape."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from stages.config import RolloutConfig
from stages.logprobs import LeftPadBatch, completion_logprobs, left_pad_batch, recompute_logprobs
from stages.models import build_tiny_model, build_tiny_tokenizer
from stages.rollout import _cut_at_eos, encode_prompts, generate_rollouts, sampled_logprobs
from storage.schemas import SCHEMAS

# different lengths, so every generate batch and forward pass is left-padded
QUESTIONS = ["1+1=?", "12+34=?", "99*9=?", "7-80=?"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def prompts():
    return pl.DataFrame(
        {"prompt_id": [f"p{i}" for i in range(len(QUESTIONS))], "text": [f"Q: {q} A:" for q in QUESTIONS]}
    )


def rollouts(model, tokenizer, prompts, seed=0, **overrides):
    config = RolloutConfig(**{"samples_per_prompt": 8, "batch_size": 16, **overrides})
    return generate_rollouts(
        model, tokenizer, prompts, config, experiment="t", round=2, policy_version="v2", seed=seed, device="cpu"
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_match_forward_pass(model, tokenizer, prompts, temperature):
    rows = rollouts(model, tokenizer, prompts, temperature=temperature)
    recomputed = recompute_logprobs(
        model, rows["prompt_token_ids"].to_list(), rows["completion_token_ids"].to_list(), temperature, 7
    )
    gaps = [
        abs(a - b)
        for lp, rc in zip(rows["behaviour_logprobs"], recomputed, strict=True)
        for a, b in zip(lp, rc, strict=True)
    ]
    assert len(gaps) == rows["num_tokens"].sum()
    assert max(gaps) < 1e-4


def test_sampled_logprobs_exact_over_a_large_vocabulary():
    """A real tokenizer's vocabulary (49k, SmolLM2): the log-prob of the sampled token within 2e-5 of float64.
    transformers' compute_transition_scores (log_softmax across a strided dimension) was off by 1e-4 here."""
    g = torch.Generator().manual_seed(0)
    vocab, batch, steps = 49152, 8, 6
    scores = tuple(torch.randn(batch, vocab, generator=g) * 4 for _ in range(steps))
    tokens = torch.randint(0, vocab, (batch, steps), generator=g)
    exact = torch.stack(
        [torch.log_softmax(s.double(), -1).gather(1, tokens[:, t : t + 1])[:, 0] for t, s in enumerate(scores)], 1
    )
    got = sampled_logprobs(scores, tokens)
    assert got.shape == (batch, steps) and got.dtype == torch.float32
    assert (got.double() - exact).abs().max().item() < 2e-5


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_recompute_logprobs_matches_unpadded_loop(model, tokenizer, batch_size):
    """Naive twin: one unpadded forward pass per row, no position_ids games. Rows are not in length order
    (they go through sorted and must come back in place); a batch of only empty completions gives []."""
    prompt_ids = encode_prompts(tokenizer, [f"Q: {q} A:" for q in [*QUESTIONS, "5+5=?"]])
    completion_ids = [[5, 6, 1], [4], [7, 8, 9, 10, 11], [], []]
    batched = recompute_logprobs(model, prompt_ids, completion_ids, 0.7, batch_size, pad_id=tokenizer.pad_token_id)
    for p, c, got in zip(prompt_ids, completion_ids, batched, strict=True):
        if not c:
            assert got == []
            continue
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1]  # (len(c), V)
        want = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        assert np.allclose(got, want.tolist(), atol=1e-5)


def test_left_pad_batch_layout():
    batch = left_pad_batch([[1, 2, 3], [4]], [[5], [6, 7]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 5], [0, 4, 6, 7]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]
    assert batch.completion_mask.tolist() == [[False, True], [True, True]]


def test_completion_logprobs_has_gradients(model, tokenizer):
    batch = LeftPadBatch(*left_pad_batch([[19, 18], [19]], [[5, 1], [6]]))
    logp = completion_logprobs(model, batch)
    (logp * batch.completion_mask).sum().backward()
    assert model.model.embed_tokens.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_same_seed_same_rows_other_seed_other_rows(model, tokenizer, prompts):
    rng_before = torch.get_rng_state()
    first = rollouts(model, tokenizer, prompts, seed=5)
    assert torch.equal(rng_before, torch.get_rng_state())  # sampling leaves the caller's RNG alone
    assert first.equals(rollouts(model, tokenizer, prompts, seed=5))
    other = rollouts(model, tokenizer, prompts, seed=6)
    assert first["completion_token_ids"].to_list() != other["completion_token_ids"].to_list()


def test_rows_shape_and_invariants(model, tokenizer, prompts):
    G = 8
    rows = rollouts(model, tokenizer, prompts, samples_per_prompt=G, max_new_tokens=5, top_k=0)
    expected = pl.from_arrow(SCHEMAS["rollouts"].empty_table()).drop("stage_key").schema
    assert rows.schema == expected
    assert rows.height == G * len(QUESTIONS)
    assert rows["prompt_id"].to_list() == [f"p{i}" for i in range(len(QUESTIONS)) for _ in range(G)]
    assert rows["sample_idx"].to_list() == list(range(G)) * len(QUESTIONS)
    assert rows["prompt"].to_list() == [f"Q: {q} A:" for q in QUESTIONS for _ in range(G)]
    assert rows["seed"].n_unique() == 2  # batch_size 16 = 2 prompts × G per generate call
    eos = tokenizer.eos_token_id
    for row in rows.iter_rows(named=True):
        ids, lps = row["completion_token_ids"], row["behaviour_logprobs"]
        assert row["num_tokens"] == len(ids) == len(lps) >= 1
        assert row["behaviour_logprob"] == pytest.approx(sum(lps), abs=1e-5)
        assert all(lp <= 0 for lp in lps)
        assert eos not in ids[:-1]
        if row["finish_reason"] == "stop":
            assert ids[-1] == eos
        else:
            assert row["finish_reason"] == "length" and len(ids) == 5 and ids[-1] != eos
        assert row["completion"] == tokenizer.decode(ids, skip_special_tokens=True)
        assert row["prompt_token_ids"] == tokenizer(row["prompt"])["input_ids"]
    assert set(rows["finish_reason"]) == {"stop", "length"}
    assert (rows["engine"].unique().to_list(), rows["round"].unique().to_list()) == (["hf"], [2])


def test_top_k_renormalises(model, tokenizer, prompts):
    """With top-k the sampled distribution is renormalised over k tokens: log μ ≥ log-softmax of all logits."""
    rows = rollouts(model, tokenizer, prompts, top_k=3, samples_per_prompt=4)
    full = recompute_logprobs(
        model, rows["prompt_token_ids"].to_list(), rows["completion_token_ids"].to_list(), 1.0, 16
    )
    for lp, f in zip(rows["behaviour_logprobs"], full, strict=True):
        assert all(a >= b - 1e-5 for a, b in zip(lp, f, strict=True))
    assert rows["top_k"].unique().to_list() == [3]


def test_cut_at_eos():
    assert _cut_at_eos([5, 1, 0, 0], [-1.0, -2.0, 0.0, 0.0], [1]) == ([5, 1], [-1.0, -2.0], "stop")
    assert _cut_at_eos([5, 6], [-1.0, -2.0], [1]) == ([5, 6], [-1.0, -2.0], "length")


def test_prompt_too_long_for_model(model, tokenizer):
    long = pl.DataFrame({"prompt_id": ["x"], "text": ["Q: " + "1" * 60 + " A:"]})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        rollouts(model, tokenizer, long)


@pytest.mark.vllm
def test_vllm_logprobs_match_forward_pass(tmp_path, model, tokenizer, prompts):
    pytest.importorskip("vllm")
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    config = RolloutConfig(engine="vllm", samples_per_prompt=4, gpu_memory_utilization=0.3)
    rows = generate_rollouts(
        None,
        tokenizer,
        prompts,
        config,
        experiment="t",
        round=0,
        policy_version="v0",
        seed=0,
        device="cpu",
        model_path=str(tmp_path / "policy"),
    )
    assert rows.height == 4 * len(QUESTIONS) and rows["engine"].unique().to_list() == ["vllm"]
    assert (rows["num_tokens"] == rows["completion_token_ids"].list.len()).all()
    recomputed = recompute_logprobs(
        model, rows["prompt_token_ids"].to_list(), rows["completion_token_ids"].to_list(), 1.0, 16
    )
    gaps = np.array(
        [
            abs(a - b)
            for lp, rc in zip(rows["behaviour_logprobs"], recomputed, strict=True)
            for a, b in zip(lp, rc, strict=True)
        ]
    )
    # vLLM serves an fp32 checkpoint in half precision ("auto"): agree to a few hundredths of a nat per token
    assert gaps.mean() < 0.02 and gaps.max() < 0.15


def test_no_prompts_no_rows(model, tokenizer, prompts):
    rows = rollouts(model, tokenizer, prompts.head(0))
    assert rows.height == 0 and rows.schema == pl.from_arrow(SCHEMAS["rollouts"].empty_table()).drop("stage_key").schema
