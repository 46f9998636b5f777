"""Policies: loading any causal LM, and the built-in `builtin:tiny` one (a character-level tokenizer and a
0.8M-parameter Qwen2 model, built and warm-started locally on the arithmetic task, no download).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import torch

from stages.config import ModelConfig
from stages.logprobs import completion_logprobs, greedy_exact_match, left_pad_batch, warmup_lr
from stages.prompts import render_prompts
from stages.rollout import encode_prompts

# 19 characters: everything the built-in task and its default template write.
TINY_CHARS = "0123456789+-*=?:QA "
TINY_SPECIALS = ("<pad>", "<eos>", "<unk>")
WARMUP_STEPS = 100  # linear lr warmup of the warm start (the prototype's)
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")  # saved without a model-specific class
HELD_OUT = 512  # training-pool rows (at most a quarter) kept out of the warm start to measure its accuracy
CHECK_EVERY = 25  # warm-start steps between accuracy checks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PolicyLoadError(ValueError):
    """A model or tokenizer cannot be loaded; the message names the fix."""


def build_tiny_tokenizer():
    """Character-level fast tokenizer (22 tokens): a BPE with no merges over single characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*TINY_SPECIALS, *TINY_CHARS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def build_tiny_model(tokenizer, seed: int):
    """Qwen2, hidden 128 × 3 layers, 4 heads of dim 32, tied embeddings, fp32: 0.79M params.

    4 × 32 rather than 2 × 64: with the same parameter count, the 2 × 64 layout learned about half as much
    per round from the reward (measured; bench/COMPARISON.md). vLLM's FlashAttention and CPU backends take
    head dim 32 (FlashInfer does not: pick another backend if it is forced).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        intermediate_size=512,
        tie_word_embeddings=True,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.float()


def warm_start(
    model,
    tokenizer,
    prompts_train: pl.DataFrame,
    config: ModelConfig,
    template: str,
    use_chat_template: bool,
    seed: int,
    device: str | torch.device,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Supervised steps on (templated question → gold answer + eos), loss on the completion tokens only.

    AdamW (betas 0.9/0.98, no weight decay), lr warm_start_lr after a 100-step linear warmup, batches of
    warm_start_batch_size drawn as shuffled passes over prompts_train (rows with prompt and answer), each
    question written with `template` or the tokenizer's chat template (as `render_prompts`).
    With `warm_start_target`, HELD_OUT rows of prompts_train are kept out of training and the warm start
    stops at the first check (every CHECK_EVERY steps) where their greedy accuracy reaches the target:
    the accuracy curve is steep here, so a fixed step count lands anywhere from 5 % to 30 %.
    """
    held_out = None
    if config.warm_start_target is not None and len(prompts_train) >= 4:  # fewer: nothing to hold out, no target
        shuffled = prompts_train.sample(fraction=1.0, shuffle=True, seed=seed)
        n_held = min(HELD_OUT, len(shuffled) // 4)  # small pools (tests) still keep most rows for training
        held_out, prompts_train = shuffled.head(n_held), shuffled.tail(-n_held)
        check = left_pad_batch(*_encode(tokenizer, held_out, template, use_chat_template), tokenizer.pad_token_id)
    prompt_ids, answer_ids = _encode(tokenizer, prompts_train, template, use_chat_template)
    held_out_accuracy = None
    steps, batch_size = config.warm_start_steps, config.warm_start_batch_size
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.warm_start_lr, betas=(0.9, 0.98), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    loss_value, start = math.nan, time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = warmup_lr(step, config.warm_start_lr, WARMUP_STEPS)
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(prompt_ids), generator=generator)])
        rows, order = order[:batch_size].tolist(), order[batch_size:]
        batch = left_pad_batch([prompt_ids[i] for i in rows], [answer_ids[i] for i in rows], tokenizer.pad_token_id)
        batch = type(batch)(*(t.to(device) for t in batch))
        logp = completion_logprobs(model, batch)  # (B, C)
        loss = -(logp * batch.completion_mask).sum() / batch.completion_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        if progress is not None:
            progress(step + 1, steps, loss_value)
        if held_out is not None and (step + 1) % CHECK_EVERY == 0:
            held_out_accuracy = greedy_exact_match(model, check)
            model.train()
            if held_out_accuracy >= config.warm_start_target:
                steps = step + 1
                if progress is not None:  # the bar ends full at the step it stopped, not at 400 of 1000
                    progress(steps, steps, loss_value)
                break
    model.eval()
    return {
        "steps": steps,
        "final_loss": loss_value,
        "held_out_accuracy": held_out_accuracy,
        "seconds": time.perf_counter() - start,
    }


def _encode(tokenizer, rows: pl.DataFrame, template: str, use_chat_template: bool):
    """Token ids of the templated questions, and of the gold answers followed by eos: the completions the
    warm start trains on and `greedy_exact_match` checks."""
    texts = render_prompts(rows, tokenizer, template, use_chat_template)["text"].to_list()
    answers = tokenizer(rows["answer"].to_list(), add_special_tokens=False)["input_ids"]
    return encode_prompts(tokenizer, texts), [[*ids, tokenizer.eos_token_id] for ids in answers]


def load_policy(name_or_path: str, dtype: str = "float32", device: str | torch.device = "cpu"):
    """(model, tokenizer) of any causal LM folder or hub id; tokenizer left-padded with a pad token."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    name = str(name_or_path)
    if name.startswith("builtin:"):
        raise PolicyLoadError(
            f"{name} is built locally: build it with warm_started_policy(...), save it, and load that folder"
        )
    if _looks_local(name) and not (Path(name) / "config.json").is_file():
        raise PolicyLoadError(
            f"no model at {name}: the folder must hold a save_pretrained model (config.json and weights); "
            "check model.name, or give a hub id"
        )
    try:
        tokenizer = load_tokenizer(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype])
    except (OSError, ValueError) as err:
        raise PolicyLoadError(
            f"could not load model {name!r}: {str(err).splitlines()[0].rstrip('.')}. Give a local save_pretrained folder, or a "
            "hub id that is reachable or already in the Hugging Face cache (model.name)"
        ) from None
    return model.to(device).eval(), tokenizer


def quiet_transformers() -> None:
    """No tqdm bars of transformers' own (loading, converting, writing shards): the stage shows its own line,
    and in logs every redraw of a bar would be a line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(name: str):
    """The policy's tokenizer, left-padded, with a pad token (its eos when it has none)."""
    tokenizer = _load_tokenizer(name)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PolicyLoadError(f"the tokenizer of {name} has neither a pad nor an eos token; add one and save it")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_sampler(name_or_path: str, dtype: str, device: str | torch.device, engine: str):
    """What a generating stage needs: (model, tokenizer) for the hf engine; (None, tokenizer) for vLLM, which
    loads the folder itself (a copy of the weights here would only take GPU memory from it)."""
    if engine == "hf":
        return load_policy(name_or_path, dtype, device)
    return None, load_tokenizer(str(name_or_path))


def _load_tokenizer(name: str):
    """AutoTokenizer, except for a folder whose tokenizer was saved as a plain fast tokenizer: next to a
    qwen2 config.json, transformers 5 would rebuild it as a Qwen2 tokenizer with Qwen2's byte-level
    pre-tokenizer (builtin:tiny's spaces would vanish), so it is loaded as exactly what was saved."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    saved = Path(name) / "tokenizer_config.json"
    if saved.is_file() and json.loads(saved.read_text()).get("tokenizer_class") in GENERIC_TOKENIZERS:
        return PreTrainedTokenizerFast.from_pretrained(name, padding_side="left")
    return AutoTokenizer.from_pretrained(name, padding_side="left")


def _looks_local(name: str) -> bool:
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def warm_started_policy(
    config: ModelConfig,
    prompts_train: pl.DataFrame,
    template: str,
    use_chat_template: bool,
    seed: int,
    device: str | torch.device,
    progress: Callable[[int, int, float], None] | None = None,
):
    """The builtin:tiny policy: (model on the CPU in eval mode, tokenizer, warm-start stats), built from `seed`
    and warm-started on prompts_train; storing it is the caller's."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed)
    stats = warm_start(model, tokenizer, prompts_train, config, template, use_chat_template, seed, device, progress)
    return model.cpu().eval(), tokenizer, stats
