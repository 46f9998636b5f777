"""One training round: the policy π starts at μ_k and takes AdamW steps on the round's selected
rollouts with an off-policy loss (stages/losses.py); returns the step log and the optimizer state."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from stages.config import TrainConfig
from stages.logprobs import recompute_logprobs, token_logprobs, warmup_lr
from stages.losses import LOSSES, finish_stats
from storage.schemas import KEYS, polars_schema

STEPS_SCHEMA = polars_schema("train_steps")


class NonFiniteError(RuntimeError):
    """The loss or the gradient became NaN/inf: the round stops and no checkpoint is registered."""


@dataclass
class TrainResult:
    steps: pl.DataFrame  # train_steps rows (without stage_key)
    optimizer_state: dict  # AdamW state and the global step counter, to carry into the next round
    logprob_gap: float  # mean |engine log μ − recomputed log μ| per token
    mean_loss: float | None


def training_rows(
    train_set: pl.DataFrame, rollouts: pl.DataFrame, advantages: pl.DataFrame, rewards: pl.DataFrame
) -> pl.DataFrame:
    """The selected rows with what training needs: tokens, engine log μ, advantage, weight, positive."""
    return (
        train_set.filter(pl.col("selected"))
        .select(*KEYS, "weight")
        .join(rollouts.select(*KEYS, "prompt_token_ids", "completion_token_ids", "behaviour_logprobs"), on=KEYS)
        .join(advantages.select(*KEYS, "advantage"), on=KEYS)
        .join(rewards.select(*KEYS, (pl.col("outcome") == "correct").alias("positive")), on=KEYS)
        .filter(pl.col("completion_token_ids").list.len() > 0)
        .sort(KEYS)
    )


def _padded(values: list[list[float]], depth: int) -> torch.Tensor:
    out = torch.zeros((len(values), depth))
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def _micro_batches(order: np.ndarray, lengths: np.ndarray, config: TrainConfig) -> list[list[np.ndarray]]:
    """Optimizer batches of `batch_size` rows; inside each, micro-batches of similar length (less padding)."""
    batches = []
    for start in range(0, len(order), config.batch_size):
        rows = order[start : start + config.batch_size]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        batches.append([rows[i : i + config.micro_batch_size] for i in range(0, len(rows), config.micro_batch_size)])
    return batches


def train_round(
    model: torch.nn.Module,
    rows: pl.DataFrame,
    config: TrainConfig,
    *,
    experiment: str,
    round: int,
    temperature: float,
    pad_id: int,
    seed: int,
    optimizer_state: dict | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Train `model` (in place) for `config.epochs` over `rows` (from `training_rows`)."""
    loss_fn = LOSSES[config.loss]
    prompts, completions = rows["prompt_token_ids"].to_list(), rows["completion_token_ids"].to_list()
    engine_mu = rows["behaviour_logprobs"].to_list()
    model.eval()  # μ is checkpoint k as it samples: no dropout
    recomputed = recompute_logprobs(model, prompts, completions, temperature, config.micro_batch_size, pad_id)
    gap = _gap(engine_mu, recomputed)
    mu = recomputed if config.behaviour_logprobs == "recompute" else engine_mu
    data = RoundData(prompts, completions, mu, *_row_tensors(rows))
    lengths = np.array([len(p) + len(c) for p, c in zip(prompts, completions)])
    n_tokens = np.array([len(c) for c in completions])

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    global_step = 0
    if optimizer_state is not None and config.keep_optimizer:
        optimizer.load_state_dict(optimizer_state["optimizer"])
        global_step = optimizer_state["global_step"]
    model.train()
    records: list[dict] = []
    total = config.epochs * math.ceil(len(rows) / config.batch_size)
    for epoch in range(config.epochs):
        order = np.random.default_rng([seed, round, epoch]).permutation(len(rows))
        for micro_batches in _micro_batches(order, lengths, config):
            started = time.perf_counter()
            lr = warmup_lr(global_step, config.lr, config.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            num_tokens = int(sum(n_tokens[m].sum() for m in micro_batches))
            optimizer.zero_grad(set_to_none=True)
            step_loss, stats = accumulate_gradients(model, loss_fn, data, micro_batches, config, temperature, pad_id)
            if not math.isfinite(step_loss):
                raise NonFiniteError(
                    f"round {round}, step {len(records)}: loss is {step_loss}; check the advantages or lower train.lr"
                )
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
            if not math.isfinite(grad_norm):
                raise NonFiniteError(
                    f"round {round}, step {len(records)}: gradient norm is {grad_norm}; lower train.lr"
                )
            optimizer.step()
            elapsed = time.perf_counter() - started
            records.append(
                {
                    "experiment": experiment,
                    "round": round,
                    "step": len(records),
                    "epoch": epoch,
                    "loss": step_loss,
                    **stats,
                    "grad_norm": grad_norm,
                    "lr": lr,
                    "tokens": num_tokens,
                    "tokens_per_s": num_tokens / elapsed if elapsed > 0 else 0.0,
                    "logprob_gap": gap,
                }
            )
            global_step += 1
            if progress:
                progress(len(records), total, step_loss)
    steps = pl.DataFrame(records, schema=STEPS_SCHEMA) if records else pl.DataFrame(schema=STEPS_SCHEMA)
    state = {"optimizer": optimizer.state_dict(), "global_step": global_step}
    mean_loss = float(steps["loss"].mean()) if records else None
    return TrainResult(steps, state, gap, mean_loss)


@dataclass
class RoundData:
    """The round's selected rows, indexable by row number."""

    prompts: list[list[int]]
    completions: list[list[int]]
    mu: list[list[float]]  # per-token log μ used by the loss
    advantage: torch.Tensor  # (N,)
    weight: torch.Tensor  # (N,)
    positive: torch.Tensor  # (N,) bool


def _row_tensors(rows: pl.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(rows["advantage"].to_numpy(), dtype=torch.float32),
        torch.tensor(rows["weight"].to_numpy(), dtype=torch.float32),
        torch.tensor(rows["positive"].to_numpy(), dtype=torch.bool),
    )


def accumulate_gradients(
    model: torch.nn.Module,
    loss_fn: Callable,
    data: RoundData,
    micro_batches: list[np.ndarray],
    config: TrainConfig,
    temperature: float,
    pad_id: int,
) -> tuple[float, dict[str, float]]:
    """Sum the gradients of one optimizer batch over its micro-batches; the loss normalises by the whole
    batch's sequence and token counts, so any split into micro-batches gives the same gradient (and the
    statistics, made from sums, are the same too)."""
    num_seqs = int(sum(len(m) for m in micro_batches))
    num_tokens = int(sum(len(data.completions[i]) for m in micro_batches for i in m))
    step_loss, sums = 0.0, []
    for m in micro_batches:
        logp, mask = token_logprobs(
            model, [data.prompts[i] for i in m], [data.completions[i] for i in m], temperature, pad_id
        )  # (b, T)
        device = logp.device
        loss, part = loss_fn(
            logp,
            _padded([data.mu[i] for i in m], logp.shape[1]).to(device),
            mask,
            data.advantage[m].to(device),
            data.weight[m].to(device),
            data.positive[m].to(device),
            aggregation=config.resolved_aggregation,
            ratio_level=config.ratio_level,
            num_seqs=num_seqs,
            num_tokens=num_tokens,
        )
        if not torch.isfinite(loss):
            return float(loss.item()), {}
        loss.backward()
        step_loss += loss.item()
        sums.append(part)
    return step_loss, finish_stats(sums)


def _gap(engine: list[list[float]], recomputed: list[list[float]]) -> float:
    if not recomputed:
        return 0.0
    diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)) for a, b in zip(engine, recomputed)])
    return float(diffs.mean()) if diffs.size else 0.0
