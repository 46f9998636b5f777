"""The eval stage: greedy and sampled answers of a checkpoint on the held-out prompts, judged by an injected
verifier, and the accuracies they give.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import polars as pl
import torch

from stages.config import EvalConfig, RolloutConfig
from stages.rollout import SamplingSpec, encode_prompts, run_engine

EVALS_SCHEMA = {
    "experiment": pl.String,
    "round": pl.Int32,
    "policy_version": pl.String,
    "prompt_id": pl.String,
    "sample_idx": pl.Int32,
    "completion": pl.String,
    "extracted_answer": pl.String,
    "correct": pl.Boolean,
    "mode": pl.String,
}

# verify_fn(completions, golds) -> [(outcome, extracted_answer)], outcome in correct|incorrect|unparsable|timeout
VerifyFn = Callable[[Sequence[str], Sequence[str]], Sequence[tuple[str, str | None]]]


def evaluate(
    model,
    tokenizer,
    test_prompts: pl.DataFrame,
    config: EvalConfig,
    rollout_config: RolloutConfig,
    verify_fn: VerifyFn,
    *,
    experiment: str,
    round: int,
    policy_version: str,
    seed: int,
    device: str | torch.device,
    model_path: str | None = None,
) -> pl.DataFrame:
    """One greedy answer (sample_idx 0) and config.sampled answers at the rollout temperature per test prompt.

    test_prompts has prompt_id, text (templated) and answer (gold). Generation goes through the rollout
    engine (`model` for hf, `model_path` for vllm), with config.max_new_tokens or the rollout's limit.
    """
    if test_prompts.height == 0:
        return pl.DataFrame(schema=EVALS_SCHEMA)
    prompt_ids = encode_prompts(tokenizer, test_prompts["text"].to_list())
    max_new = config.max_new_tokens or rollout_config.max_new_tokens
    r = rollout_config
    modes = []
    if config.greedy:
        modes.append(("greedy", SamplingSpec(1, False, 1.0, 0, 1.0, max_new)))
    if config.sampled:
        modes.append(("sampled", SamplingSpec(config.sampled, True, r.temperature, r.top_k, r.top_p, max_new)))
    ids, golds = test_prompts["prompt_id"].to_list(), test_prompts["answer"].to_list()
    frames = []
    for mode, spec in modes:
        samples = run_engine(model, tokenizer, prompt_ids, spec, r, seed=seed, device=device, model_path=model_path)
        completions = tokenizer.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
        verdicts = verify_fn(completions, [golds[s.prompt_index] for s in samples])
        frames.append(
            pl.DataFrame(
                {
                    "experiment": [experiment] * len(samples),
                    "round": [round] * len(samples),
                    "policy_version": [policy_version] * len(samples),
                    "prompt_id": [ids[s.prompt_index] for s in samples],
                    "sample_idx": [s.sample_idx for s in samples],
                    "completion": completions,
                    "extracted_answer": [extracted for _, extracted in verdicts],
                    "correct": [outcome == "correct" for outcome, _ in verdicts],
                    "mode": [mode] * len(samples),
                },
                schema=EVALS_SCHEMA,
            )
        )
    return pl.concat(frames) if frames else pl.DataFrame(schema=EVALS_SCHEMA)


def accuracy(evals: pl.DataFrame) -> dict[str, float | None]:
    """Share of correct answers per mode: {'greedy': …, 'sampled': …} (None where the mode has no rows)."""
    out: dict[str, float | None] = {}
    for mode in ("greedy", "sampled"):
        rows = evals.filter(pl.col("mode") == mode)
        out[mode] = float(rows["correct"].mean()) if rows.height else None
    return out
