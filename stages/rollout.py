"""The rollouts stage: G samples per prompt from the behaviour policy μ_k with their per-token log μ,
by transformers `generate` (engine hf) or vLLM (engine vllm); the eval stage generates through it too.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import torch

from stages.config import RolloutConfig
from stages.logprobs import LeftPadBatch, left_pad_batch
from storage.schemas import polars_schema

ROLLOUTS_SCHEMA = polars_schema("rollouts")


class Sample(NamedTuple):
    """One completion of prompt number `prompt_index`, cut after its first eos."""

    prompt_index: int
    sample_idx: int
    completion_ids: list[int]
    logprobs: list[float]  # per completion token, log μ as sampled (after temperature/top-k/top-p)
    finish_reason: str  # stop | length
    seed: int


class Sampling(NamedTuple):
    """The rollout's sampling settings, also those of the eval stage's `sampled` mode."""

    temperature: float
    top_k: int
    top_p: float


class Engine(NamedTuple):
    """Which engine generates ("hf" or "vllm") and its settings (hf: sequences per call; the rest: vLLM's)."""

    name: str
    batch_size: int
    gpu_memory_utilization: float
    tensor_parallel_size: int = 1
    engines: int | None = None  # vLLM engine processes on disjoint prompt shards (None: visible GPUs // TP)
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    dtype: str = "auto"

    @classmethod
    def of(cls, rollout) -> Engine:
        """From the rollout section (or a stage's view of its engine fields)."""
        return cls(
            rollout.engine, rollout.batch_size, rollout.gpu_memory_utilization, rollout.tensor_parallel_size,
            rollout.engines, rollout.max_num_seqs, rollout.enable_prefix_caching, rollout.enforce_eager,
            rollout.dtype,
        )  # fmt: skip


class SamplingSpec(NamedTuple):
    """One generation request: n completions per prompt, sampled or greedy, at most max_new_tokens each."""

    n: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    logprobs: bool = True  # False: the hf engine keeps no per-step scores (Sample.logprobs is [])


def derived_seed(seed: int, index: int) -> int:
    """A seed for chunk/request `index` of a run seeded `seed`: independent streams, no seed+i overlaps."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] >> 1)


# ---------------------------------------------------------------- the hf engine


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt; a BOS doubled by a chat template that already wrote one is dropped."""
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [x[1:] if bos is not None and x[:2] == [bos, bos] else list(x) for x in ids]


def eos_token_ids(model, tokenizer, model_path: str | None = None) -> list[int]:
    """Every token that ends a completion: the tokenizer's eos and the generation_config eos (the model's, or
    the folder's when there is no model in this process, as with vLLM)."""
    ids = {tokenizer.eos_token_id}
    config = getattr(model, "generation_config", None)
    if config is None and model_path is not None and (Path(model_path) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        config = GenerationConfig.from_pretrained(model_path)
    gen_eos = getattr(config, "eos_token_id", None)
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
                output_scores=spec.logprobs,  # (B·n, vocab) per step: 1.8 GB for 48 × 192 steps × 49k vocab
                return_dict_in_generate=True,
                **sampling,
            )
        new_tokens = out.sequences[:, batch.input_ids.shape[1] :]
        logps = sampled_logprobs(out.scores, new_tokens).cpu() if spec.logprobs else torch.zeros(0, 0)
        new_tokens = new_tokens.cpu()
        for row in range(new_tokens.shape[0]):
            ids, lps, reason = _cut_at_eos(new_tokens[row].tolist(), logps[row].tolist() if spec.logprobs else [], eos)
            samples.append(Sample(start + row // spec.n, row % spec.n, ids, lps, reason, chunk_seed))
        if progress is not None:
            progress(min(start + per_chunk, len(prompt_ids)) * spec.n, len(prompt_ids) * spec.n)
    return samples


def sampled_logprobs(scores: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> torch.Tensor:
    """(B·n, steps): the log of the processed (temperature, top-k, top-p) distribution at the sampled token,
    one step at a time over the vocabulary as the last, contiguous dimension. transformers'
    `compute_transition_scores(normalize_logits=True)` takes log_softmax across a strided dimension, which on
    CPU in fp32 was off by up to 2e-4 nats per token for a 49k vocabulary (SmolLM2-135M), against 1e-5 for the
    trainer's own recompute of the same tokens."""
    columns = [
        torch.log_softmax(step.float(), dim=-1).gather(1, tokens[:, t : t + 1]).squeeze(1)
        for t, step in enumerate(scores)
    ]
    return torch.stack(columns, dim=1) if columns else tokens.new_zeros((tokens.shape[0], 0), dtype=torch.float32)


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
    eos: list[int],
    prompt_ids: list[list[int]],
    spec: SamplingSpec,
    engine: Engine,
    *,
    seed: int,
    first_index: int = 0,
) -> list[Sample]:
    """spec.n completions per prompt with one vLLM engine; log-probs are vLLM's processed ones (after
    temperature, top-k and top-p, renormalised: what μ sampled from).

    Prompt i is one request seeded derived_seed(seed, first_index + i) (vLLM seeds its n children from it),
    so results depend neither on how vLLM batches nor on how prompts are sharded over engines. The engine is
    torn down before returning, to give the GPU back.
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    max_len = max(len(p) for p in prompt_ids) + spec.max_new_tokens
    llm = LLM(
        model=str(model_path),
        seed=seed,
        dtype=engine.dtype,
        logprobs_mode="processed_logprobs",
        gpu_memory_utilization=engine.gpu_memory_utilization,
        tensor_parallel_size=engine.tensor_parallel_size,
        max_num_seqs=engine.max_num_seqs,
        enable_prefix_caching=engine.enable_prefix_caching,
        enforce_eager=engine.enforce_eager,
        max_model_len=max_len,
    )
    try:
        request_seeds = [derived_seed(seed, first_index + i) for i in range(len(prompt_ids))]
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
        samples = []
        for i, request in enumerate(outputs):
            for j, completion in enumerate(request.outputs):
                ids = list(completion.token_ids)
                lps = [float(step[tok].logprob) for step, tok in zip(completion.logprobs, ids, strict=True)]
                ids, lps, reason = _cut_at_eos(ids, lps, eos)
                # vLLM also stops on the model's generation_config eos list, which `eos` may not hold
                reason = "stop" if completion.finish_reason == "stop" else reason
                samples.append(Sample(first_index + i, j, ids, lps, reason, request_seeds[i]))
        return samples
    finally:
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def hf_shard(
    model_path: str,
    eos: list[int],
    prompt_ids: list[list[int]],
    spec: SamplingSpec,
    engine: Engine,
    *,
    seed: int,
    first_index: int = 0,
) -> list[Sample]:
    """The hf engine on one shard, loading the checkpoint folder itself (what a shard process runs for hf)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    samples = hf_generate(model, tokenizer, prompt_ids, spec, batch_size=engine.batch_size, seed=seed, device="cpu")
    return [s._replace(prompt_index=s.prompt_index + first_index) for s in samples]


SHARD_WORKERS = {"vllm": vllm_generate, "hf": hf_shard}


def visible_gpus() -> list[str]:
    """The GPU ids this process may use, as CUDA_VISIBLE_DEVICES names them (or 0..n-1)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges splitting n items into `parts` shards whose sizes differ by ≤ 1."""
    parts = max(1, min(parts, n))
    edges = [n * i // parts for i in range(parts + 1)]
    return list(itertools.pairwise(edges))


def run_shards(
    worker: str,
    model_path: str,
    eos: list[int],
    prompt_ids: list[list[int]],
    spec: SamplingSpec,
    engine: Engine,
    *,
    seed: int,
    parts: int,
    devices: list[list[str]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Sample]:
    """`worker` on `parts` disjoint contiguous prompt shards, each in its own process (`python -m
    stages.rollout SHARD`) seeing only its GPUs (devices[i] → CUDA_VISIBLE_DEVICES); all shards' samples,
    ordered by (prompt, sample_idx). A shard that fails raises with its exit code and the tail of its output."""
    bounds = shard_bounds(len(prompt_ids), parts)
    total = len(prompt_ids) * spec.n
    with tempfile.TemporaryDirectory(prefix="asymre-shards-") as tmp:
        procs = []
        for i, (start, stop) in enumerate(bounds):
            job = Path(tmp) / f"shard-{i}.pkl"
            job.write_bytes(pickle.dumps(
                dict(worker=worker, model_path=str(model_path), eos=eos, prompt_ids=prompt_ids[start:stop],
                     spec=tuple(spec), engine=tuple(engine), seed=seed, first_index=start)
            ))  # fmt: skip
            env = dict(os.environ)
            if devices is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[i])
            log = (Path(tmp) / f"shard-{i}.log").open("w")
            procs.append((i, start, stop, job, log, subprocess.Popen(
                [sys.executable, "-m", "stages.rollout", str(job)], env=env, stdout=log, stderr=subprocess.STDOUT
            )))  # fmt: skip
        samples: list[Sample] = []
        done = 0
        try:
            for i, start, stop, job, log, proc in procs:
                code = proc.wait()
                log.close()
                if code != 0:
                    tail = "\n".join(Path(log.name).read_text(errors="replace").splitlines()[-30:])
                    raise RuntimeError(
                        f"rollout shard {i} (prompts {start}..{stop - 1}, {worker} engine) exited with code {code}; "
                        f"the last lines of its output:\n{tail}"
                    )
                samples += [Sample(*t) for t in pickle.loads(job.with_suffix(".out").read_bytes())]
                done += (stop - start) * spec.n
                if progress is not None:
                    progress(done, total)
        finally:
            for *_, log, proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()
    return samples


def _shard_main(job: Path) -> None:
    task = pickle.loads(job.read_bytes())
    worker = SHARD_WORKERS[task["worker"]]
    samples = worker(
        task["model_path"], task["eos"], task["prompt_ids"], SamplingSpec(*task["spec"]), Engine(*task["engine"]),
        seed=task["seed"], first_index=task["first_index"],
    )  # fmt: skip
    out = job.with_suffix(".out")
    out.with_suffix(".tmp").write_bytes(pickle.dumps([tuple(s) for s in samples]))
    out.with_suffix(".tmp").rename(out)


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
    engine = Engine.of(config)
    samples = run_engine(
        model, tokenizer, prompt_ids, spec, engine, seed=seed, device=device, model_path=model_path, progress=progress
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
    engine: Engine,
    *,
    seed: int,
    device: str | torch.device,
    model_path: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Sample]:
    """Samples from engine.name, ordered by (prompt, sample_idx)."""
    if engine.name == "vllm":
        if model_path is None:
            raise ValueError("rollout.engine=vllm loads the policy from a folder: pass model_path")
        eos = eos_token_ids(model, tokenizer, model_path)
        gpus = visible_gpus()
        tp = engine.tensor_parallel_size
        parts = engine.engines or max(1, len(gpus) // tp)
        if parts == 1:  # one engine, in this process (which a `process` launcher makes a fresh one)
            samples = vllm_generate(model_path, eos, prompt_ids, spec, engine, seed=seed)
            if progress is not None:
                progress(len(samples), len(samples))
            return samples
        if parts * tp > len(gpus):
            raise ValueError(
                f"rollout.engines={parts} × rollout.tensor_parallel_size={tp} needs {parts * tp} GPUs; "
                f"{len(gpus)} are visible"
            )
        devices = [gpus[i * tp : (i + 1) * tp] for i in range(parts)]
        return run_shards("vllm", model_path, eos, prompt_ids, spec, engine, seed=seed, parts=parts, devices=devices,
                          progress=progress)  # fmt: skip
    return hf_generate(
        model, tokenizer, prompt_ids, spec, batch_size=engine.batch_size, seed=seed, device=device, progress=progress
    )


if __name__ == "__main__":  # a rollout shard process (run_shards)
    _shard_main(Path(sys.argv[1]))
