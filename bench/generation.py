"""Generation: the `hf` rollouts stage (generate_rollouts) against a bare batched `model.generate` loop on
the same prompts, model, seeds and sampling settings; completion tokens per second and their ratio.

    python bench/generation.py [--quick] [--reps N]

The policy is builtin:tiny randomly initialised (speed does not depend on the weights). Two shapes: the
default experiment's (512 prompts × G=8, max_new_tokens=6) and a longer one (128 prompts × 8, 40 tokens).
Baselines: `bare` returns sequences only; `bare+scores` also asks generate for the scores and turns them
into log-probs (what the stage must do to fill behaviour_logprobs), so stage/bare+scores isolates the
stage's own Python (padding, eos cuts, decoding, the frame) from the cost of asking for log-probs.
"""

from __future__ import annotations

import argparse

import torch
from measure import alternate, median, print_machine, print_table

from stages.config import PromptsConfig, RolloutConfig
from stages.models import build_tiny_model, build_tiny_tokenizer
from stages.prompts import builtin_prompts, render_prompts, sample_round_prompts
from stages.rollout import derived_seed, generate_rollouts

SEED = 0


def completion_tokens(new_tokens: torch.Tensor, eos: int) -> list[list[int]]:
    """Each row of (N, steps) cut after its first eos (counted), as the stage counts it."""
    is_eos = new_tokens == eos  # (N, steps)
    first = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, new_tokens.shape[1])  # (N,)
    return [row[:n].tolist() for row, n in zip(new_tokens, first.tolist())]


@torch.no_grad()
def bare_generate(model, tokenizer, texts: list[str], config: RolloutConfig, with_scores: bool) -> list[list[int]]:
    """A plain loop: tokenize a chunk, generate, keep the new tokens (optionally their log-probs)."""
    g, per_chunk = config.samples_per_prompt, max(1, config.batch_size // config.samples_per_prompt)
    out_tokens: list[list[int]] = []
    for chunk, start in enumerate(range(0, len(texts), per_chunk)):
        enc = tokenizer(texts[start : start + per_chunk], padding=True, return_tensors="pt")
        torch.manual_seed(derived_seed(SEED, chunk))  # the stage's per-chunk seed: the same samples
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            num_return_sequences=g,
            eos_token_id=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
            output_scores=with_scores,
            return_dict_in_generate=with_scores,
        )
        sequences = out.sequences if with_scores else out
        if with_scores:
            model.compute_transition_scores(sequences, out.scores, normalize_logits=True)
        out_tokens += completion_tokens(sequences[:, enc["input_ids"].shape[1] :], tokenizer.eos_token_id)
    return out_tokens


def shape_bench(model, tokenizer, prompts, n_prompts: int, config: RolloutConfig, reps: int) -> list[dict]:
    template = PromptsConfig().template
    chosen = render_prompts(
        sample_round_prompts(prompts, n_prompts, 0, SEED), tokenizer, template, use_chat_template=True
    )
    texts = chosen["text"].to_list()
    kw = {"experiment": "bench", "round": 0, "policy_version": "bench", "seed": SEED, "device": "cpu"}
    seen: dict[str, list[list[int]]] = {}

    def stage() -> dict:
        frame = generate_rollouts(model, tokenizer, chosen, config, **kw)
        seen["stage"] = frame["completion_token_ids"].to_list()
        return {"tokens": int(frame["num_tokens"].sum())}

    def bare(with_scores: bool):
        def run() -> dict:
            tokens = bare_generate(model, tokenizer, texts, config, with_scores)
            seen["bare"] = tokens
            return {"tokens": sum(len(t) for t in tokens)}

        return run

    runs = alternate({"stage": stage, "bare": bare(False), "bare+scores": bare(True)}, reps)
    identical = seen["stage"] == seen["bare"]
    rows = []
    base = {name: median(r, "tokens") / median(r) for name, r in runs.items()}
    for name, r in runs.items():
        rows.append(
            {
                "shape": f"{n_prompts}x{config.samples_per_prompt} max_new={config.max_new_tokens}",
                "case": name,
                "median_s": median(r),
                "min_s": min(x["seconds"] for x in r),
                "max_s": max(x["seconds"] for x in r),
                "tokens": int(median(r, "tokens")),
                "tokens_per_s": base[name],
                "stage/this": base["stage"] / base[name],
                "cpu_s": median(r, "cpu_seconds"),
                "stage/this_cpu": median(r, "cpu_seconds") / median(runs["stage"], "cpu_seconds"),
                "same_samples": identical if name == "bare" else "",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two repetitions (smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per case (default 3, quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a loaded box)")
    args = parser.parse_args()
    reps = args.reps or (2 if args.quick else 3)
    torch.set_num_threads(args.threads)
    print_machine()
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, SEED).eval()
    prompts = builtin_prompts(PromptsConfig(), SEED)
    shapes = [(512, RolloutConfig()), (128, RolloutConfig(max_new_tokens=40))]
    if args.quick:
        shapes = [
            (16, RolloutConfig(samples_per_prompt=4)),
            (8, RolloutConfig(samples_per_prompt=4, max_new_tokens=20)),
        ]
    rows = []
    for n_prompts, config in shapes:
        rows += shape_bench(model, tokenizer, prompts, n_prompts, config, reps)
    print_table(rows)
    print("target: stage/bare tokens-per-second ratio ≥ 0.9 (the stage/this column on the `bare` rows)")


if __name__ == "__main__":
    main()
