"""Training: the train stage (train_round) against a bare PyTorch loop doing the same forward passes, loss,
backward and AdamW steps (with clipping and the lr warmup) on the same batches; completion tokens per
second and their ratio, the share of real (non-padding) positions in the model inputs, and peak memory.

    python bench/training.py [--quick] [--reps N]

Rows are built as the round builds them: rollouts of builtin:tiny (randomly initialised) on built-in
prompts via generate_rollouts, rewards (drawn at random so advantages vary), advantages, curation and
training_rows. Both sides start every repetition from the same weights; the bare loop also runs the
no-grad forward pass that recomputes log μ (train.behaviour_logprobs=recompute, the default), in the
same micro-batches, so both do the same model work. Peak memory: a fresh child process per case; VmHWM is
reset (/proc/self/clear_refs) just before training, so `growth_mb` is the training's peak over the RSS
it started with.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import torch
from measure import alternate, child, current_rss_mb, median, peak_rss_mb, print_machine, print_table, reset_peak

from stages.advantage import advantages
from stages.config import AdvantageConfig, CurationConfig, PromptsConfig, RolloutConfig, TrainConfig
from stages.curate import curate
from stages.logprobs import warmup_lr
from stages.models import build_tiny_model, build_tiny_tokenizer
from stages.prompts import builtin_prompts, render_prompts, sample_round_prompts
from stages.rollout import generate_rollouts
from stages.train import _micro_batches, train_round, training_rows

SEED = 0
# (name, prompts, rollout config, train configs to time)
SHAPES = {
    "default": (512, RolloutConfig(), [TrainConfig()]),
    "long": (128, RolloutConfig(max_new_tokens=40), [TrainConfig(), TrainConfig(micro_batch_size=32)]),
}
QUICK_SHAPES = {
    "default": (16, RolloutConfig(samples_per_prompt=4), [TrainConfig(batch_size=32, micro_batch_size=16)]),
    "long": (
        8,
        RolloutConfig(samples_per_prompt=4, max_new_tokens=20),
        [TrainConfig(batch_size=16, micro_batch_size=8)],
    ),
}


# ---------------------------------------------------------------- data


def build_rows(n_prompts: int, rollout: RolloutConfig, tokenizer) -> pl.DataFrame:
    """training_rows of one synthetic round: real rollouts, random 0/1 rewards, default advantages/curation."""
    model = build_tiny_model(tokenizer, SEED).eval()
    prompts = builtin_prompts(PromptsConfig(), SEED)
    template = PromptsConfig().template
    chosen = render_prompts(
        sample_round_prompts(prompts, n_prompts, 0, SEED), tokenizer, template, use_chat_template=True
    )
    rollouts = generate_rollouts(
        model, tokenizer, chosen, rollout, experiment="bench", round=0, policy_version="bench", seed=SEED, device="cpu"
    )
    correct = np.random.default_rng(SEED).random(rollouts.height) < 0.3
    rewards = rollouts.select("experiment", "round", "prompt_id", "sample_idx").with_columns(
        pl.Series("reward", correct.astype(np.float64)),
        pl.Series("outcome", np.where(correct, "correct", "incorrect")),
    )
    adv = advantages(rewards, AdvantageConfig())
    train_set = curate(rewards, rollouts, CurationConfig())
    return training_rows(train_set, rollouts, adv, rewards)


def padding_shares(rows: pl.DataFrame, config: TrainConfig) -> dict[str, float]:
    """Real positions / all positions of the (B, L) model inputs: the stage's length-sorted micro-batches,
    naive random micro-batches (same permutation, unsorted), and the μ-recompute pass (length order)."""
    lengths = (rows["prompt_token_ids"].list.len() + rows["completion_token_ids"].list.len()).to_numpy()
    order = np.random.default_rng([SEED, 0, 0]).permutation(len(lengths))

    def share(groups) -> float:
        real = sum(int(lengths[g].sum()) for g in groups)
        return real / sum(len(g) * int(lengths[g].max()) for g in groups)

    m = config.micro_batch_size
    sorted_groups = [g for batch in _micro_batches(order, lengths, config) for g in batch]
    naive_groups = [order[i : i + m] for i in range(0, len(order), m)]
    by_length = np.argsort(lengths, kind="stable")
    recompute_groups = [by_length[i : i + m] for i in range(0, len(order), m)]
    return {"stage": share(sorted_groups), "naive": share(naive_groups), "recompute": share(recompute_groups)}


# ---------------------------------------------------------------- the bare loop


def bare_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Left-padded (B, L) inputs so that every completion ends at column L; explicit positions; the
    (B, C) targets of the last C columns and their mask (C = the longest completion)."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    width, c_width = max(map(len, seqs)), max(map(len, completions))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        input_ids[i, width - len(seq) :] = torch.tensor(seq)
        attention[i, width - len(seq) :] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    lengths = torch.tensor([len(c) for c in completions])
    completion = torch.arange(c_width)[None, :] >= (c_width - lengths)[:, None]  # (B, C)
    return input_ids, attention, positions, completion


def bare_logp(model, input_ids, attention, positions, completion) -> torch.Tensor:
    c_width = completion.shape[1]
    logits = model(
        input_ids=input_ids, attention_mask=attention, position_ids=positions, logits_to_keep=c_width + 1
    ).logits[:, :-1]  # (B, C, V)
    return torch.log_softmax(logits.float(), -1).gather(-1, input_ids[:, -c_width:, None]).squeeze(-1)  # (B, C)


def bare_train(model, rows: pl.DataFrame, config: TrainConfig, pad_id: int) -> int:
    """μ's log-probs with no grad, then one epoch of AsymRE token-mean steps; returns completion tokens."""
    prompts, completions = rows["prompt_token_ids"].to_list(), rows["completion_token_ids"].to_list()
    coef = torch.tensor((rows["advantage"] * rows["weight"]).to_numpy(), dtype=torch.float32)  # (N,)
    lengths = np.array([len(p) + len(c) for p, c in zip(prompts, completions)])
    n_tokens = np.array([len(c) for c in completions])
    m = config.micro_batch_size
    model.eval()
    with torch.no_grad():
        by_length = np.argsort(lengths, kind="stable")
        for i in range(0, len(prompts), m):
            rows_i = by_length[i : i + m]
            batch = bare_batch([prompts[j] for j in rows_i], [completions[j] for j in rows_i], pad_id)
            bare_logp(model, *batch).masked_select(batch[-1]).tolist()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    model.train()
    order = np.random.default_rng([SEED, 0, 0]).permutation(len(prompts))
    for step, batch in enumerate(_micro_batches(order, lengths, config)):
        for group in optimizer.param_groups:
            group["lr"] = warmup_lr(step, config.lr, config.warmup_steps)
        num_tokens = int(sum(n_tokens[b].sum() for b in batch))
        optimizer.zero_grad(set_to_none=True)
        for b in batch:
            batch = bare_batch([prompts[i] for i in b], [completions[i] for i in b], pad_id)
            logp = bare_logp(model, *batch)  # (b, C)
            loss = -(coef[b][:, None] * torch.where(batch[-1], logp, 0.0)).sum() / num_tokens
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
    return int(n_tokens.sum())


# ---------------------------------------------------------------- cases


def run_case(case: str, model, init: dict, rows: pl.DataFrame, config: TrainConfig, pad_id: int) -> dict:
    model.load_state_dict(init)
    if case == "stage":
        train_round(model, rows, config, experiment="bench", round=0, temperature=1.0, pad_id=pad_id, seed=SEED)
        tokens = int(rows["completion_token_ids"].list.len().sum())
    else:
        tokens = bare_train(model, rows, config, pad_id)
    return {"tokens": tokens}


def child_main(rows_path: str, case: str, config_json: str) -> None:
    """Fresh process: load rows, train once, print peak memory as JSON."""
    import json

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    rows = pl.read_parquet(rows_path)
    config = TrainConfig.model_validate_json(config_json)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, SEED)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    reset = reset_peak()
    before = current_rss_mb()
    run_case(case, model, init, rows, config, tokenizer.pad_token_id)
    after = peak_rss_mb()
    print(json.dumps({"rss_before_mb": before, "peak_mb": after, "growth_mb": after - before if reset else None}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two repetitions (smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per case (default 3, quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a loaded box)")
    args = parser.parse_args()
    reps = args.reps or (2 if args.quick else 3)
    torch.set_num_threads(args.threads)
    os.environ["BENCH_THREADS"] = str(args.threads)  # for the memory children
    print_machine()
    tokenizer = build_tiny_tokenizer()
    pad_id = tokenizer.pad_token_id
    model = build_tiny_model(tokenizer, SEED)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    timing, padding, memory = [], [], []
    tmp = Path(tempfile.mkdtemp(prefix="asymre-bench-train-"))
    for shape, (n_prompts, rollout, configs) in (QUICK_SHAPES if args.quick else SHAPES).items():
        rows = build_rows(n_prompts, rollout, tokenizer)
        rows_path = tmp / f"{shape}.parquet"
        rows.write_parquet(rows_path)
        lens = rows["completion_token_ids"].list.len()
        for config in configs:
            label = f"{shape} rows={rows.height} B={config.batch_size}/{config.micro_batch_size}"
            cases = {
                c: (lambda c=c, rows=rows, config=config: run_case(c, model, init, rows, config, pad_id))
                for c in ("stage", "bare")
            }
            runs = alternate(cases, reps)
            # the same update: one more run of each, final weights compared
            run_case("stage", model, init, rows, config, pad_id)
            after_stage = {n: p.detach().clone() for n, p in model.named_parameters()}
            run_case("bare", model, init, rows, config, pad_id)
            with torch.no_grad():
                diff = max(float((after_stage[n] - p).abs().max()) for n, p in model.named_parameters())
                moved = max(float((w - init[n]).abs().max()) for n, w in after_stage.items())
            tps = {c: median(r, "tokens") / median(r) for c, r in runs.items()}
            for c in runs:
                timing.append(
                    {
                        "shape": label,
                        "case": c,
                        "median_s": median(runs[c]),
                        "completion_tokens": int(median(runs[c], "tokens")),
                        "tokens_per_s": tps[c],
                        "stage/bare": tps["stage"] / tps["bare"] if c == "bare" else None,
                        "cpu_s": median(runs[c], "cpu_seconds"),
                        "stage/bare_cpu": median(runs["bare"], "cpu_seconds") / median(runs["stage"], "cpu_seconds")
                        if c == "bare"
                        else None,
                        "min_s": min(x["seconds"] for x in runs[c]),
                        "max_s": max(x["seconds"] for x in runs[c]),
                        "max|w_stage-w_bare|": diff if c == "bare" else None,
                        "max|w-w0|": moved if c == "stage" else None,
                    }
                )
            shares = padding_shares(rows, config)
            padding.append(
                {
                    "shape": label,
                    "completion_len_mean": float(lens.mean()),
                    "completion_len_min/max": f"{lens.min()}/{lens.max()}",
                    "real_share_stage_sorted": shares["stage"],
                    "real_share_naive_random": shares["naive"],
                    "real_share_recompute_pass": shares["recompute"],
                }
            )
            for c in ("stage", "bare"):
                mem = child("training.py", "--child", str(rows_path), c, config.model_dump_json())
                memory.append({"shape": label, "case": c, **mem})
    print("\n# throughput (alternating, medians)")
    print_table(timing)
    print("\n# share of real (non-padding) positions in the model inputs; target ≥ 0.8")
    print_table(padding)
    print("\n# peak memory (fresh process; VmHWM reset before training; growth = training peak − RSS before)")
    print_table(memory)
    shutil.rmtree(tmp, ignore_errors=True)
    print("target: stage/bare ≥ 0.9")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:5])
    else:
        main()
