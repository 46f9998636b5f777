"""Policies: the built-in tokenizer and model, a short warm start, the builtin:tiny cache, load errors."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from transformers import AutoTokenizer

from stages.config import ModelConfig, PromptsConfig
from stages.models import (
    PolicyLoadError,
    build_tiny_model,
    build_tiny_tokenizer,
    builtin_policy,
    load_policy,
    warm_start,
)
from stages.prompts import builtin_prompts

PROMPTS = PromptsConfig(n_train=2000, n_test=20)


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
        PROMPTS,
        seed=0,
        device="cpu",
        progress=lambda step, total, loss: losses.append(loss),
    )
    assert len(losses) == 30 and stats["final_loss"] == losses[-1] and stats["seconds"] > 0
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert not model.training


def test_builtin_policy_caches_and_checks_settings(tmp_path, train_prompts):
    config = ModelConfig(warm_start_steps=2, warm_start_batch_size=8)
    folder = builtin_policy(tmp_path / "tiny", config, PROMPTS, train_prompts, seed=0, device="cpu")
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert json.loads((folder / "warm_start.json").read_text())["stats"]["steps"] == 2
    calls = []
    again = builtin_policy(folder, config, PROMPTS, train_prompts, seed=0, device="cpu", progress=calls.append)
    assert again == folder and calls == []  # reused, no training
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no staging leftovers
    with pytest.raises(ValueError, match="remove the folder"):
        builtin_policy(folder, config, PROMPTS, train_prompts, seed=1, device="cpu")
    model, tok = load_policy(str(folder), "float32", "cpu")
    assert tok.eos_token == "<eos>" and model.config.model_type == "qwen2"


def test_load_policy_errors(tmp_path):
    with pytest.raises(PolicyLoadError, match="no model at"):
        load_policy(str(tmp_path / "missing"), "float32", "cpu")
    with pytest.raises(PolicyLoadError, match="builtin_policy"):
        load_policy("builtin:tiny", "float32", "cpu")
    with pytest.raises(PolicyLoadError, match=r"could not load model 'nobody-here/no-such-model'.*model\.name"):
        load_policy("nobody-here/no-such-model", "float32", "cpu")  # tests run with HF_HUB_OFFLINE=1


def test_greedy_exact_match_equals_generation():
    """The teacher-forced check the warm start stops on agrees with real greedy decoding, row by row."""
    from stages.models import _exact_match_batch, greedy_exact_match
    from stages.prompts import render_prompts

    easy = PromptsConfig(ops=["+"], max_operand=9, n_train=400, n_test=10)
    rows = builtin_prompts(easy, seed=0).filter(pl.col("split") == "train")
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0)
    config = ModelConfig(warm_start_steps=40, warm_start_batch_size=16, warm_start_lr=3e-3, warm_start_target=None)
    warm_start(model, tok, rows, config, easy, seed=0, device="cpu")
    rows = rows.head(64)
    enc = tok(render_prompts(rows, tok, easy)["text"].to_list(), return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    decoded = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    exact = [d.strip() == a for d, a in zip(decoded, rows["answer"].to_list())]
    per_row = [greedy_exact_match(model, _exact_match_batch(tok, rows[i : i + 1], easy)) for i in range(64)]
    assert per_row == [float(e) for e in exact]
    assert greedy_exact_match(model, _exact_match_batch(tok, rows, easy)) == pytest.approx(sum(exact) / 64)
    assert 0 < sum(exact) < 64  # the comparison covers both hits and misses


def test_warm_start_stops_at_its_target(train_prompts, monkeypatch):
    """The rule: check every CHECK_EVERY steps, stop at the first check that reaches the target."""
    import stages.models as models

    seen = iter([0.0, 0.04, 0.12, 0.5])
    monkeypatch.setattr(models, "greedy_exact_match", lambda model, batch: next(seen))
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0)
    config = ModelConfig(warm_start_steps=400, warm_start_batch_size=8, warm_start_target=0.1)
    stats = warm_start(model, tok, train_prompts, config, PROMPTS, seed=0, device="cpu")
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
