"""The rollouts stage: G samples per prompt from the behaviour policy μ_k with their per-token log μ,
by transformers `generate` (engine hf) or vLLM (engine vllm), plus the forward pass that recomputes them.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import polars as pl
import torch

from stages.config import RolloutConfig

ROLLOUTS_SCHEMA = {
    "experiment": pl.String,
    "round": pl.Int32,
    "prompt_id": pl.String,
    "sample_idx": pl.Int32,
    "policy_version": pl.String,
    "prompt": pl.String,
    "completion": pl.String,
    "prompt_token_ids": pl.List(pl.Int32),
    "completion_token_ids": pl.List(pl.Int32),
    "behaviour_logprobs": pl.List(pl.Float32),
    "behaviour_logprob": pl.Float64,
    "num_tokens": pl.Int32,
    "finish_reason": pl.String,
    "engine": pl.String,
    "temperature": pl.Float64,
    "top_p": pl.Float64,
    "top_k": pl.Int32,
    "max_new_tokens": pl.Int32,
    "seed": pl.Int64,
}


class Sample(NamedTuple):
    """One completion of prompt number `prompt_index`, cut after its first eos."""

    prompt_index: int
    sample_idx: int
    completion_ids: list[int]
    logprobs: list[float]  # per completion token, log μ as sampled (after temperature/top-k/top-p)
    finish_reason: str  # stop | length
    seed: int


class SamplingSpec(NamedTuple):
    n: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int


def derived_seed(seed: int, index: int) -> int:
    """A seed for chunk/request `index` of a run seeded `seed`: independent streams, no seed+i overlaps."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] >> 1)


# ---------------------------------------------------------------- the forward pass


class LeftPadBatch(NamedTuple):
    input_ids: torch.Tensor  # (B, T) prompt + completion, left-padded so every completion ends at T
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T) cumsum(mask) - 1, clamped: Qwen2 and friends need it with left padding
    completion_mask: torch.Tensor  # (B, C) 1 where column j of the last C positions is a completion token


def left_pad_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int = 0):
    """Pack (prompt, completion) pairs right-aligned; completion token j of row i sits at column C - len_i + j."""
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(s) for s in seqs)
    c_width = max(len(c) for c in completion_ids)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), c_width), dtype=torch.bool)
    for i, (s, c) in enumerate(zip(seqs, completion_ids, strict=True)):
        input_ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, width - len(s) :] = 1
        completion_mask[i, c_width - len(c) :] = True
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return LeftPadBatch(input_ids, attention_mask, position_ids, completion_mask)


def completion_logprobs(model, batch: LeftPadBatch, temperature: float = 1.0) -> torch.Tensor:
    """(B, C) log-softmax(logits / temperature) at the completion tokens (garbage where completion_mask is 0).

    Differentiable: the trainer calls it under autograd. Only the last C+1 positions go through the LM head.
    """
    c_width = batch.completion_mask.shape[1]
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=c_width + 1,
        use_cache=False,
    ).logits[:, :-1]  # (B, C, V): position t predicts token t+1
    targets = batch.input_ids[:, -c_width:]  # (B, C)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sequence_logprobs(
    model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    temperature: float,
    device: str | torch.device,
    batch_size: int,
) -> list[list[float]]:
    """Per completion token log-softmax(logits / temperature), by one forward pass per batch of rows."""
    out: list[list[float]] = []
    for start in range(0, len(prompt_ids), batch_size):
        p, c = prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size]
        if max(len(x) for x in c) == 0:
            out.extend([] for _ in c)
            continue
        batch = LeftPadBatch(*(t.to(device) for t in left_pad_batch(p, c)))
        logp = completion_logprobs(model, batch, temperature).cpu()
        c_width = logp.shape[1]
        out.extend(logp[i, c_width - len(ci) :].tolist() if ci else [] for i, ci in enumerate(c))
    return out


# ---------------------------------------------------------------- the hf engine


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt; a BOS doubled by a chat template that already wrote one is dropped."""
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [x[1:] if bos is not None and x[:2] == [bos, bos] else list(x) for x in ids]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a completion: the tokenizer's eos and the model's generation_config eos."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


@contextlib.contextmanager
def _bare_generation_config(model):
    """Generate with only what we pass: a checkpoint's own defaults (repetition_penalty, top_k=20, …) would
    change the distribution we sample from without showing up in the rollouts table."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def hf_generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    spec: SamplingSpec,
    *,
    batch_size: int,
    seed: int,
    device: str | torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> list[Sample]:
    """spec.n completions per prompt with transformers `generate`, chunk by chunk of ≤ batch_size sequences.

    Chunk i samples under torch's global RNG seeded with derived_seed(seed, i) inside `fork_rng`, so the
    caller's RNG state is untouched and the same inputs, seed and batch_size give identical samples on CPU.
    """
    _check_length(model, prompt_ids, spec.max_new_tokens)
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    per_chunk = max(1, batch_size // spec.n)
    device = torch.device(device)
    samples: list[Sample] = []
    for chunk, start in enumerate(range(0, len(prompt_ids), per_chunk)):
        chunk_ids = prompt_ids[start : start + per_chunk]
        chunk_seed = derived_seed(seed, chunk)
        batch = LeftPadBatch(*(t.to(device) for t in left_pad_batch(chunk_ids, [[]] * len(chunk_ids), pad)))
        sampling = (
            {"do_sample": True, "temperature": spec.temperature, "top_k": spec.top_k, "top_p": spec.top_p}
            if spec.do_sample
            else {"do_sample": False}
        )
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), _bare_generation_config(model):
            torch.manual_seed(chunk_seed)
            out = model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=spec.max_new_tokens,
                num_return_sequences=spec.n,
                eos_token_id=eos,
                pad_token_id=pad,
                output_scores=True,
                return_dict_in_generate=True,
                **sampling,
            )
        # (B·n, steps): log of the processed (temperature, top-k, top-p) distribution at the sampled token
        logps = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).cpu()
        new_tokens = out.sequences[:, batch.input_ids.shape[1] :].cpu()
        for row in range(new_tokens.shape[0]):
            ids, lps, reason = _cut_at_eos(new_tokens[row].tolist(), logps[row].tolist(), eos)
            samples.append(Sample(start + row // spec.n, row % spec.n, ids, lps, reason, chunk_seed))
        if progress is not None:
            progress(min(start + per_chunk, len(prompt_ids)) * spec.n, len(prompt_ids) * spec.n)
    return samples


def _cut_at_eos(ids: list[int], logps: list[float], eos: list[int]) -> tuple[list[int], list[float], str]:
    """Keep tokens up to and including the first eos (counted); what generate padded after it is not."""
    for t, tok in enumerate(ids):
        if tok in eos:
            return ids[: t + 1], logps[: t + 1], "stop"
    return ids, logps, "length"


def _check_length(model, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(len(p) for p in prompt_ids)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({limit}); lower rollout.max_new_tokens or use shorter prompts"
        )


# ---------------------------------------------------------------- the vllm engine


def vllm_generate(
    model_path: str,
    tokenizer,
    prompt_ids: list[list[int]],
    spec: SamplingSpec,
    *,
    seed: int,
    gpu_memory_utilization: float,
    dtype: str = "auto",
    enforce_eager: bool = False,
) -> list[Sample]:
    """spec.n completions per prompt with vLLM; log-probs are vLLM's processed ones (after temperature etc.).

    Prompt i is one request seeded derived_seed(seed, i) (vLLM seeds its n children seed+j), so results do
    not depend on how vLLM batches. The engine is torn down before returning, to give the GPU to the trainer.
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    max_len = max(len(p) for p in prompt_ids) + spec.max_new_tokens
    llm = LLM(
        model=str(model_path),
        seed=seed,
        dtype=dtype,
        logprobs_mode="processed_logprobs",
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        max_model_len=max_len,
    )
    try:
        request_seeds = [derived_seed(seed, i) for i in range(len(prompt_ids))]
        params = [
            SamplingParams(
                n=spec.n,
                temperature=spec.temperature if spec.do_sample else 0.0,
                top_p=spec.top_p if spec.do_sample else 1.0,
                top_k=(spec.top_k or -1) if spec.do_sample else -1,
                max_tokens=spec.max_new_tokens,
                logprobs=0,  # the sampled token's log-prob only
                seed=s,
            )
            for s in request_seeds
        ]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        eos = eos_token_ids(None, tokenizer)
        samples = []
        for i, request in enumerate(outputs):
            for j, completion in enumerate(request.outputs):
                ids = list(completion.token_ids)
                lps = [float(step[tok].logprob) for step, tok in zip(completion.logprobs, ids, strict=True)]
                ids, lps, reason = _cut_at_eos(ids, lps, eos)
                # vLLM also stops on the model's generation_config eos list, which `eos` may not hold
                reason = "stop" if completion.finish_reason == "stop" else reason
                samples.append(Sample(i, j, ids, lps, reason, request_seeds[i]))
        return samples
    finally:
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- the stage


def generate_rollouts(
    model,
    tokenizer,
    prompts: pl.DataFrame,
    config: RolloutConfig,
    *,
    experiment: str,
    round: int,
    policy_version: str,
    seed: int,
    device: str | torch.device,
    model_path: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> pl.DataFrame:
    """G = samples_per_prompt rows per prompt (columns prompt_id, text), ordered by (prompt, sample_idx).

    engine hf samples from `model`; engine vllm loads `model_path` (the same checkpoint saved) and ignores `model`.
    """
    if prompts.height == 0:
        return pl.DataFrame(schema=ROLLOUTS_SCHEMA)
    prompt_ids = encode_prompts(tokenizer, prompts["text"].to_list())
    spec = SamplingSpec(
        config.samples_per_prompt, True, config.temperature, config.top_k, config.top_p, config.max_new_tokens
    )
    samples = run_engine(
        model, tokenizer, prompt_ids, spec, config, seed=seed, device=device, model_path=model_path, progress=progress
    )
    completions = tokenizer.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
    texts, ids = prompts["text"].to_list(), prompts["prompt_id"].to_list()
    rows = {
        "experiment": experiment,
        "round": round,
        "prompt_id": [ids[s.prompt_index] for s in samples],
        "sample_idx": [s.sample_idx for s in samples],
        "policy_version": policy_version,
        "prompt": [texts[s.prompt_index] for s in samples],
        "completion": completions,
        "prompt_token_ids": [prompt_ids[s.prompt_index] for s in samples],
        "completion_token_ids": [s.completion_ids for s in samples],
        "behaviour_logprobs": [s.logprobs for s in samples],
        "behaviour_logprob": [float(np.sum(s.logprobs, dtype=np.float64)) for s in samples],
        "num_tokens": [len(s.completion_ids) for s in samples],
        "finish_reason": [s.finish_reason for s in samples],
        "engine": config.engine,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "max_new_tokens": config.max_new_tokens,
        "seed": [s.seed for s in samples],
    }
    n = len(samples)
    return pl.DataFrame({k: v if isinstance(v, list) else [v] * n for k, v in rows.items()}, schema=ROLLOUTS_SCHEMA)


def run_engine(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    spec: SamplingSpec,
    config: RolloutConfig,
    *,
    seed: int,
    device: str | torch.device,
    model_path: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Sample]:
    """Samples from config.engine, ordered by (prompt, sample_idx)."""
    if config.engine == "vllm":
        if model_path is None:
            raise ValueError("rollout.engine=vllm loads the policy from a folder: pass model_path")
        samples = vllm_generate(
            model_path, tokenizer, prompt_ids, spec, seed=seed, gpu_memory_utilization=config.gpu_memory_utilization
        )
        if progress is not None:
            progress(len(samples), len(samples))
        return samples
    return hf_generate(
        model, tokenizer, prompt_ids, spec, batch_size=config.batch_size, seed=seed, device=device, progress=progress
    )
