"""Policies: the built-in tokenizer and model, a short warm start and its lr warmup, the builtin:tiny policy,
load errors."""

from __future__ import annotations

import polars as pl
import pytest
import torch
from transformers import AutoTokenizer

from stages.config import ModelConfig, PromptsConfig
from stages.logprobs import greedy_exact_match, left_pad_batch, warmup_lr
from stages.models import (
    WARMUP_STEPS,
    PolicyLoadError,
    build_tiny_model,
    build_tiny_tokenizer,
    load_policy,
    warm_start,
    warm_started_policy,
)
from stages.prompts import builtin_prompts, render_prompts
from stages.rollout import encode_prompts

PROMPTS = PromptsConfig(n_train=2000, n_test=20)
TEMPLATE = (PROMPTS.template, PROMPTS.use_chat_template)


@pytest.fixture(scope="module")
def train_prompts():
    return builtin_prompts(PROMPTS, seed=0).filter(pl.col("split") == "train")


def test_tokenizer_is_character_level_and_round_trips(tmp_path):
    tok = build_tiny_tokenizer()
    assert len(tok) == 22 and tok.padding_side == "left"
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "<eos>", "<unk>")
    text = "Q: 12+34=? A:-7*0"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert again.get_vocab() == tok.get_vocab()
    assert (again.padding_side, again.pad_token_id, again.eos_token_id) == ("left", tok.pad_token_id, tok.eos_token_id)
    batch = again(["Q: 1+1=? A:", "Q: 10+10=? A:"], padding=True)
    assert batch["input_ids"][0][:2] == [again.pad_token_id] * 2  # left padding


def test_tiny_model_shape_and_save_load(tmp_path):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0)
    n = sum(p.numel() for p in model.parameters())
    assert 750_000 < n < 850_000
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (128, 3, 4, 4)
    assert c.hidden_size // c.num_attention_heads == 32 and model.model.layers[0].self_attn.head_dim == 32
    assert c.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32
    assert torch.equal(build_tiny_model(tok, seed=0).lm_head.weight, model.lm_head.weight)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_policy(str(tmp_path), "float32", "cpu")
    ids = torch.tensor([tok("Q: 1+2=? A:")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)
    assert loaded_tok.padding_side == "left"


def test_short_warm_start_lowers_loss(train_prompts):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0)
    losses = []
    stats = warm_start(
        model,
        tok,
        train_prompts,
        ModelConfig(warm_start_steps=30, warm_start_batch_size=32),
        *TEMPLATE,
        seed=0,
        device="cpu",
        progress=lambda step, total, loss: losses.append(loss),
    )
    assert len(losses) == 30 and stats["final_loss"] == losses[-1] and stats["seconds"] > 0
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert not model.training


def test_warm_start_on_a_pool_too_small_to_hold_out_runs_its_steps(train_prompts):
    """Fewer than 4 training prompts: nothing is held out for the target check, the steps run (no IndexError)."""
    tok = build_tiny_tokenizer()
    stats = warm_start(
        build_tiny_model(tok, seed=0), tok, train_prompts.head(1), ModelConfig(warm_start_steps=3, warm_start_batch_size=4),
        *TEMPLATE, seed=0, device="cpu",
    )  # fmt: skip
    assert stats["steps"] == 3 and stats["held_out_accuracy"] is None


def test_warm_started_policy_is_reproducible_and_saves(tmp_path, train_prompts):
    config = ModelConfig(warm_start_steps=2, warm_start_batch_size=8)
    model, tok, stats = warm_started_policy(config, train_prompts, *TEMPLATE, seed=0, device="cpu")
    assert stats["steps"] == 2 and not model.training and next(model.parameters()).device.type == "cpu"
    assert list(tmp_path.iterdir()) == []  # storing it is the caller's
    again, _, _ = warm_started_policy(config, train_prompts, *TEMPLATE, seed=0, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_policy(str(tmp_path), "float32", "cpu")
    assert loaded_tok.eos_token == "<eos>" and loaded.config.model_type == "qwen2"
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), loaded.parameters()))


def test_warm_start_lr_is_the_lambda_lr_warmup():
    """warmup_lr gives, step by step, the lr that LambdaLR(min(1, (step + 1) / WARMUP_STEPS)) set."""
    peak, steps = 1e-3, WARMUP_STEPS + 20
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))
    scheduled = []
    for _ in range(steps):
        scheduled.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [warmup_lr(step, peak, WARMUP_STEPS) for step in range(steps)] == scheduled  # exactly


def test_load_policy_errors(tmp_path):
    with pytest.raises(PolicyLoadError, match="no model at"):
        load_policy(str(tmp_path / "missing"), "float32", "cpu")
    with pytest.raises(PolicyLoadError, match="warm_started_policy"):
        load_policy("builtin:tiny", "float32", "cpu")
    with pytest.raises(PolicyLoadError, match=r"could not load model 'nobody-here/no-such-model'.*model\.name"):
        load_policy("nobody-here/no-such-model", "float32", "cpu")  # tests run with HF_HUB_OFFLINE=1


def test_greedy_exact_match_equals_generation():
    """The teacher-forced check the warm start stops on agrees with real greedy decoding, row by row."""
    easy = PromptsConfig(ops=["+"], max_operand=9, n_train=400, n_test=10)
    rows = builtin_prompts(easy, seed=0).filter(pl.col("split") == "train")
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0)
    config = ModelConfig(warm_start_steps=40, warm_start_batch_size=16, warm_start_lr=3e-3, warm_start_target=None)
    warm_start(model, tok, rows, config, easy.template, easy.use_chat_template, seed=0, device="cpu")
    rows = rows.head(64)
    texts = render_prompts(rows, tok, easy.template, easy.use_chat_template)["text"].to_list()
    enc = tok(texts, return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    decoded = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    exact = [d.strip() == a for d, a in zip(decoded, rows["answer"].to_list())]
    prompt_ids = encode_prompts(tok, texts)
    answer_ids = [[*a, tok.eos_token_id] for a in tok(rows["answer"].to_list(), add_special_tokens=False)["input_ids"]]
    per_row = [
        greedy_exact_match(model, left_pad_batch(prompt_ids[i : i + 1], answer_ids[i : i + 1], tok.pad_token_id))
        for i in range(64)
    ]
    assert per_row == [float(e) for e in exact]
    everything = left_pad_batch(prompt_ids, answer_ids, tok.pad_token_id)
    assert greedy_exact_match(model, everything) == pytest.approx(sum(exact) / 64)
    assert 0 < sum(exact) < 64  # the comparison covers both hits and misses


def test_warm_start_stops_at_its_target(train_prompts, monkeypatch):
    """The rule: check every CHECK_EVERY steps, stop at the first check that reaches the target."""
    import stages.models as models

    seen = iter([0.0, 0.04, 0.12, 0.5])
    monkeypatch.setattr(models, "greedy_exact_match", lambda model, batch: next(seen))
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0)
    config = ModelConfig(warm_start_steps=400, warm_start_batch_size=8, warm_start_target=0.1)
    stats = warm_start(model, tok, train_prompts, config, *TEMPLATE, seed=0, device="cpu")
    assert stats["steps"] == 3 * models.CHECK_EVERY and stats["held_out_accuracy"] == 0.12


def test_policy_folder_reloads_the_same_tokenizer(tmp_path):
    """Saved next to a qwen2 config.json, the tokenizer must come back as saved (transformers 5 would
    otherwise rebuild it with Qwen2's byte-level pre-tokenizer and drop the spaces)."""
    tok = build_tiny_tokenizer()
    build_tiny_model(tok, seed=0).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, loaded = load_policy(str(tmp_path), "float32", "cpu")
    text = "Q: 12+34=? A:"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert " " in loaded.convert_ids_to_tokens(loaded(text)["input_ids"])
