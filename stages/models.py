"""Policies: loading any causal LM, and the built-in `builtin:tiny` one (a character-level tokenizer and a
0.8M-parameter Qwen2 model, built and warm-started locally on the arithmetic task, no download).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import torch

from stages.config import ModelConfig, PromptsConfig
from stages.prompts import render_prompts
from stages.rollout import completion_logprobs, encode_prompts, left_pad_batch

log = logging.getLogger(__name__)

# 19 characters: everything the built-in task and its default template write.
TINY_CHARS = "0123456789+-*=?:QA "
TINY_SPECIALS = ("<pad>", "<eos>", "<unk>")
WARMUP_STEPS = 100  # linear lr warmup of the warm start (the prototype's)
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")  # saved without a model-specific class
HELD_OUT = 512  # training-pool rows (at most a quarter) kept out of the warm start to measure its accuracy
CHECK_EVERY = 25  # warm-start steps between accuracy checks
WARM_START_RECORD = "warm_start.json"  # written last into a builtin policy folder: its presence marks it complete

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
    prompts_config: PromptsConfig,
    seed: int,
    device: str | torch.device,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Supervised steps on (templated question → gold answer + eos), loss on the completion tokens only.

    AdamW (betas 0.9/0.98, no weight decay), lr warm_start_lr after a 100-step linear warmup, batches of
    warm_start_batch_size drawn as shuffled passes over prompts_train (rows with prompt and answer).
    With `warm_start_target`, HELD_OUT rows of prompts_train are kept out of training and the warm start
    stops at the first check (every CHECK_EVERY steps) where their greedy accuracy reaches the target:
    the accuracy curve is steep here, so a fixed step count lands anywhere from 5 % to 30 %.
    """
    held_out = None
    if config.warm_start_target is not None:
        shuffled = prompts_train.sample(fraction=1.0, shuffle=True, seed=seed)
        n_held = min(HELD_OUT, len(shuffled) // 4)  # small pools (tests) still keep most rows for training
        held_out, prompts_train = shuffled.head(n_held), shuffled.tail(-n_held)
        check = _exact_match_batch(tokenizer, held_out, prompts_config)
    texts = render_prompts(prompts_train, tokenizer, prompts_config)["text"].to_list()
    prompt_ids = encode_prompts(tokenizer, texts)
    answer_ids = [
        [*ids, tokenizer.eos_token_id]
        for ids in tokenizer(prompts_train["answer"].to_list(), add_special_tokens=False)["input_ids"]
    ]
    held_out_accuracy = None
    steps, batch_size = config.warm_start_steps, config.warm_start_batch_size
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.warm_start_lr, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    loss_value, start = math.nan, time.perf_counter()
    for step in range(steps):
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
        schedule.step()
        loss_value = loss.item()
        if progress is not None:
            progress(step + 1, steps, loss_value)
        if held_out is not None and (step + 1) % CHECK_EVERY == 0:
            held_out_accuracy = greedy_exact_match(model, check)
            model.train()
            if held_out_accuracy >= config.warm_start_target:
                steps = step + 1
                break
    model.eval()
    return {
        "steps": steps,
        "final_loss": loss_value,
        "held_out_accuracy": held_out_accuracy,
        "seconds": time.perf_counter() - start,
    }


def _exact_match_batch(tokenizer, rows: pl.DataFrame, prompts_config: PromptsConfig):
    prompt_ids = encode_prompts(tokenizer, render_prompts(rows, tokenizer, prompts_config)["text"].to_list())
    answers = tokenizer(rows["answer"].to_list(), add_special_tokens=False)["input_ids"]
    return left_pad_batch(prompt_ids, [[*a, tokenizer.eos_token_id] for a in answers], tokenizer.pad_token_id)


def greedy_exact_match(model, batch) -> float:
    """Share of rows whose greedy answer is exactly the gold: with teacher forcing, greedy decoding emits the
    gold (and then stops) iff the argmax is the gold token at every answer position, eos included."""
    model.eval()
    with torch.no_grad():
        device = next(model.parameters()).device
        mask = batch.attention_mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=mask, position_ids=position_ids).logits
        width = batch.completion_mask.shape[1]
        predicted = logits[:, -width - 1 : -1].argmax(-1)  # (B, C): the prediction for each answer token
        target = batch.input_ids[:, -width:].to(device)
        hit = (predicted == target) | ~batch.completion_mask.to(device).bool()
    return float(hit.all(-1).float().mean())


def load_policy(name_or_path: str, dtype: str = "float32", device: str | torch.device = "cpu"):
    """(model, tokenizer) of any causal LM folder or hub id; tokenizer left-padded with a pad token."""
    from transformers import AutoModelForCausalLM

    name = str(name_or_path)
    if name.startswith("builtin:"):
        raise PolicyLoadError(
            f"{name} is built locally: resolve it with builtin_policy(folder, ...) and load that folder"
        )
    if _looks_local(name) and not (Path(name) / "config.json").is_file():
        raise PolicyLoadError(
            f"no model at {name}: the folder must hold a save_pretrained model (config.json and weights); "
            "check model.name, or give a hub id"
        )
    try:
        tokenizer = _load_tokenizer(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype])
    except (OSError, ValueError) as err:
        raise PolicyLoadError(
            f"could not load model {name!r}: {str(err).splitlines()[0].rstrip('.')}. Give a local save_pretrained folder, or a "
            "hub id that is reachable or already in the Hugging Face cache (model.name)"
        ) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PolicyLoadError(f"the tokenizer of {name} has neither a pad nor an eos token; add one and save it")
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


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


def builtin_policy(
    folder: str | Path,
    config: ModelConfig,
    prompts_config: PromptsConfig,
    prompts_train: pl.DataFrame,
    seed: int,
    device: str | torch.device,
    progress: Callable[[int, int, float], None] | None = None,
) -> Path:
    """The builtin:tiny policy saved in `folder`: reused if a complete one is there, else built and warm-started.

    The folder is written in a temporary sibling and renamed, so a crash never leaves half a cache. A cached
    folder made with other warm-start settings is an error: the caller should key the folder by those settings.
    """
    folder = Path(folder)
    settings = _warm_start_settings(config, prompts_config, prompts_train, seed)
    record = folder / WARM_START_RECORD
    if record.is_file():
        saved = json.loads(record.read_text())["settings"]
        if saved != settings:
            raise ValueError(
                f"{folder} holds a builtin policy warm-started with {saved}, not {settings}; "
                "remove the folder or use another one for these settings"
            )
        return folder
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed)
    stats = warm_start(model, tokenizer, prompts_train, config, prompts_config, seed, device, progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.cpu().save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / WARM_START_RECORD).write_text(json.dumps({"settings": settings, "stats": stats}, indent=1))
        if folder.exists():  # an incomplete leftover
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info(
        "builtin:tiny warm-started in %.1f s (final loss %.3f), saved to %s",
        stats["seconds"],
        stats["final_loss"],
        folder,
    )
    return folder


def _warm_start_settings(
    config: ModelConfig, prompts_config: PromptsConfig, prompts_train: pl.DataFrame, seed: int
) -> dict:
    rows = sorted(zip(prompts_train["prompt"].to_list(), prompts_train["answer"].to_list(), strict=True))
    return {
        "data_sha1": hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:16],
        "rows": len(rows),
        "steps": config.warm_start_steps,
        "target": config.warm_start_target,
        "lr": config.warm_start_lr,
        "batch_size": config.warm_start_batch_size,
        "seed": seed,
        "template": prompts_config.template,
        "ops": list(prompts_config.ops),
        "max_operand": prompts_config.max_operand,
        "max_operand_mul": prompts_config.max_operand_mul,
    }
