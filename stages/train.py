"""One training round: the policy π starts at μ_k and takes AdamW steps on the round's selected
rollouts with an off-policy loss (stages/losses.py); returns the step log and the optimizer state.

In one process the model trains as it is. Under torch.distributed (torchrun, any world size) the policy is
sharded with FSDP2 and every optimizer batch's micro-batches are dealt to the ranks; the losses' global
denominators and summed gradients make the update the one-process update (to float rounding)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from stages.config import TrainConfig
from stages.logprobs import CompletionScorer, length_batches, recompute_logprobs, token_logprobs, warmup_lr
from stages.losses import LOSSES, finish_stats
from storage import checkpoints
from storage.schemas import KEYS, polars_schema

STEPS_SCHEMA = polars_schema("train_steps")


class NonFiniteError(RuntimeError):
    """The loss or the gradient became NaN/inf: the round stops and no checkpoint is registered."""


SCORER_PREFIX = "lm."  # parameter names of the FSDP2 root (a CompletionScorer) are the model's under `lm.`


@dataclass
class TrainResult:
    steps: pl.DataFrame  # train_steps rows (without stage_key)
    optimizer_state: dict  # checkpoints.optimizer_state: AdamW state by parameter name and the global step
    logprob_gap: float  # mean |engine log μ − recomputed log μ| per token
    mean_loss: float | None
    # Under a process group: the trained weights, full, on rank 0's CPU (None on other ranks); save them with
    # checkpoints.save(..., state_dict=model_state). In one process None: the model itself holds them.
    model_state: dict | None = None


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


def distributed() -> bool:
    """Whether this process is a rank of an initialised torch.distributed process group (torchrun)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


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
    top_k: int = 0,
    top_p: float = 1.0,
    dtype: str | torch.dtype | None = None,
) -> TrainResult:
    """Train `model` (in place) for `config.epochs` over `rows` (from `training_rows`).

    top_k / top_p: the sampler's truncation, applied to the recomputed μ (as the sampler stored it).
    dtype: the compute dtype (model.dtype). Under a process group, a model with fp32 parameters and a lower
    `dtype` trains with FSDP2 mixed precision: forward and backward in `dtype`, gradients reduced and AdamW in
    fp32 (the parameters are the master weights). In one process the model trains in its own dtype, which must
    be `dtype` when given (load it so).

    Under a process group (torchrun) every rank calls this with the same model and rows: the model is sharded
    with FSDP2 (modified in place: keep using it only through `checkpoints`), the returned `model_state` holds
    the full trained weights on rank 0, and `optimizer_state` is read from rank 0's argument.
    """
    args = (rows, config, experiment, round, temperature, pad_id, seed, optimizer_state, progress, top_k, top_p)
    if distributed():
        return _train(_sharded_policy(model, config, dtype), *args, prefix=SCORER_PREFIX)
    if dtype is not None and (wanted := _dtype(dtype)) != next(model.parameters()).dtype:
        raise ValueError(
            f"train_round: the model's parameters are {next(model.parameters()).dtype} and dtype is {wanted}; "
            "in one process load the model in the dtype it trains in"
        )
    if config.activation_checkpointing:
        _checkpoint_activations(model)
    try:
        return _train(model, *args, prefix="")
    finally:
        if config.activation_checkpointing:
            _stop_checkpointing_activations(model)


def _train(
    model: torch.nn.Module,
    rows: pl.DataFrame,
    config: TrainConfig,
    experiment: str,
    round: int,
    temperature: float,
    pad_id: int,
    seed: int,
    optimizer_state: dict | None,
    progress: Callable[[int, int, float], None] | None,
    top_k: int,
    top_p: float,
    *,
    prefix: str,
) -> TrainResult:
    """The round's loop; `model` is the policy itself, or its FSDP2 root under a process group (names under
    `prefix`)."""
    sharded = distributed()
    loss_fn = LOSSES[config.loss]
    prompts, completions = rows["prompt_token_ids"].to_list(), rows["completion_token_ids"].to_list()
    engine_mu = rows["behaviour_logprobs"].to_list()
    model.eval()  # μ is checkpoint k as it samples: no dropout
    recompute = _recompute_sharded if sharded else recompute_logprobs
    recomputed = recompute(model, prompts, completions, temperature, config.micro_batch_size, pad_id, top_k, top_p)
    if sharded:
        _reshard(model)
    gap = _gap(engine_mu, recomputed)
    mu = recomputed if config.behaviour_logprobs == "recompute" else engine_mu
    data = RoundData(prompts, completions, mu, *_row_tensors(rows))
    lengths = np.array([len(p) + len(c) for p, c in zip(prompts, completions)])
    n_tokens = np.array([len(c) for c in completions])

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    state = optimizer_state if config.keep_optimizer else None
    global_step = checkpoints.load_optimizer(model, optimizer, state, prefix)
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
            accumulate = accumulate_sharded_gradients if sharded else accumulate_gradients
            step_loss, stats = accumulate(model, loss_fn, data, micro_batches, config, temperature, pad_id)
            if not math.isfinite(step_loss):  # the same on every rank: they raise together
                raise NonFiniteError(
                    f"round {round}, step {len(records)}: loss is {step_loss}; check the advantages or lower train.lr"
                )
            grad_norm = _clip_sharded(model, config.grad_clip) if sharded else float(
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            )  # fmt: skip
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
    state = checkpoints.optimizer_state(model, optimizer, global_step, prefix)
    model_state = checkpoints.full_model_state(model, prefix) if sharded else None
    mean_loss = float(steps["loss"].mean()) if records else None
    return TrainResult(steps, state, gap, mean_loss, model_state)


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _checkpoint_activations(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (transformers' per-layer checkpointing, the
    non-reentrant kind that composes with FSDP2); before sharding, and without changing parameter names."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.activation_checkpointing: {type(model).__name__} does not support gradient checkpointing; "
            "set it to false"
        )
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.24 (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _stop_checkpointing_activations(model: torch.nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (FSDP2's units): modules whose class is in `_no_split_modules` (transformers
    names its decoder layer there), else the children of `model.model.layers`; outermost only."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers: list[torch.nn.Module] = []
    if names:
        inside: set[int] = set()
        for module in model.modules():
            if id(module) in inside or type(module).__name__ not in names:
                continue
            layers.append(module)
            inside.update(id(m) for m in module.modules())
    if not layers:
        layers = list(getattr(getattr(model, "model", None), "layers", None) or [])
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard (no _no_split_modules match)")
    return layers


def _sharded_policy(model: torch.nn.Module, config: TrainConfig, dtype: str | torch.dtype | None) -> torch.nn.Module:
    """`model` wrapped for FSDP2: each decoder layer a unit, a CompletionScorer around it the root; gradients
    are summed over ranks (not averaged), since the losses divide by the whole optimizer batch already."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    parameters = next(model.parameters())
    compute = _dtype(dtype) if dtype is not None else parameters.dtype
    mixed = MixedPrecisionPolicy()
    if compute != parameters.dtype:
        if parameters.dtype != torch.float32:
            raise ValueError(
                f"train_round: {compute} training under FSDP2 keeps fp32 master weights; load the model in float32, "
                f"not {parameters.dtype}"
            )
        mixed = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    if config.activation_checkpointing:
        _checkpoint_activations(model)  # before fully_shard
    mesh = init_device_mesh(parameters.device.type, (torch.distributed.get_world_size(),))
    policy = CompletionScorer(model)
    units = [*decoder_layers(model), policy]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mixed)
    for unit in units:  # per unit (these setters do not recurse)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
    return policy


def _reshard(policy: torch.nn.Module) -> None:
    """Register the sharded parameters again. FSDP2 keeps the root's parameters unsharded after its forward
    (backward would gather them again at once); after forward passes without backward (μ's recompute) the root
    would otherwise hold full-size copies, which the optimizer must not be given in place of the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in policy.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _rank_world() -> tuple[int, int]:
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _recompute_sharded(
    model: torch.nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    temperature: float,
    batch_size: int,
    pad_id: int,
    top_k: int,
    top_p: float,
) -> list[list[float]]:
    """`recompute_logprobs` with its batches (the same ones: rows by length, batch_size at a time) dealt to the
    ranks, and every row's values gathered on every rank. Each rank makes the same number of forward passes
    (FSDP2's collectives): one with fewer batches scores a row again and drops it."""
    rank, world = _rank_world()
    batches = length_batches(prompts, completions, batch_size)
    mine = batches[rank::world]
    local: list[tuple[int, list[float]]] = []
    for i in range(math.ceil(len(batches) / world)):
        rows = mine[i] if i < len(mine) else [next(j for j in batches[0] if completions[j])]
        values = recompute_logprobs(
            model, [prompts[j] for j in rows], [completions[j] for j in rows], temperature, len(rows), pad_id,
            top_k, top_p,
        )  # fmt: skip
        if i < len(mine):
            local.extend((int(j), v) for j, v in zip(rows, values))
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, local)
    out: list[list[float]] = [[] for _ in prompts]
    for part in gathered:
        for j, values in part:
            out[j] = values
    return out


def _clip_sharded(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the gradient by its global norm over every rank's shards (DTensors); returns that norm."""
    from torch.distributed.tensor import DTensor

    parameters = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return float(norm)


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
    num_seqs, num_tokens = _denominators(data, micro_batches)
    step_loss, sums = 0.0, []
    for m in micro_batches:
        loss, part = _micro_batch_loss(model, loss_fn, data, m, config, temperature, pad_id, num_seqs, num_tokens)
        if not torch.isfinite(loss):
            return float(loss.item()), {}
        loss.backward()
        step_loss += loss.item()
        sums.append(part)
    return step_loss, finish_stats(sums)


def accumulate_sharded_gradients(
    model: torch.nn.Module,
    loss_fn: Callable,
    data: RoundData,
    micro_batches: list[np.ndarray],
    config: TrainConfig,
    temperature: float,
    pad_id: int,
) -> tuple[float, dict[str, float]]:
    """`accumulate_gradients` under a process group, `model` the FSDP2 root: rank r takes micro-batches r, r+W,
    … with the whole batch's denominators, and FSDP2 sums the gradients over ranks. Every rank makes the same
    number of forward/backward passes (a rank short of micro-batches runs one row with its loss times 0), and
    the loss and statistics come from every micro-batch's sums, in the batch's order: the same on every rank.
    A non-finite loss still goes through backward (the other ranks wait in FSDP2's collectives); the caller
    raises, on every rank."""
    rank, world = _rank_world()
    num_seqs, num_tokens = _denominators(data, micro_batches)
    local: list[tuple[int, float, dict[str, float]]] = []
    for i in range(math.ceil(len(micro_batches) / world)):
        index = rank + i * world
        if index < len(micro_batches):
            m = micro_batches[index]
            loss, part = _micro_batch_loss(model, loss_fn, data, m, config, temperature, pad_id, num_seqs, num_tokens)
            local.append((index, loss.item(), part))
        else:
            row = next((j for m in micro_batches for j in m if data.completions[j]), micro_batches[0][0])
            logp, mask = token_logprobs(model, [data.prompts[row]], [data.completions[row]], temperature, pad_id)
            loss = torch.where(mask.bool(), logp, 0.0).sum() * 0.0
        loss.backward()
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, local)
    parts = sorted((entry for part in gathered for entry in part), key=lambda entry: entry[0])
    step_loss = 0.0
    for _, value, _ in parts:
        step_loss += value
    if not math.isfinite(step_loss):
        return step_loss, {}
    return step_loss, finish_stats([sums for _, _, sums in parts])


def _denominators(data: RoundData, micro_batches: list[np.ndarray]) -> tuple[int, int]:
    """The optimizer batch's sequence and token counts (every micro-batch's loss divides by these)."""
    num_seqs = int(sum(len(m) for m in micro_batches))
    num_tokens = int(sum(len(data.completions[i]) for m in micro_batches for i in m))
    return num_seqs, num_tokens


def _micro_batch_loss(
    model: torch.nn.Module,
    loss_fn: Callable,
    data: RoundData,
    m: np.ndarray,
    config: TrainConfig,
    temperature: float,
    pad_id: int,
    num_seqs: int,
    num_tokens: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    logp, mask = token_logprobs(
        model, [data.prompts[i] for i in m], [data.completions[i] for i in m], temperature, pad_id
    )  # (b, T)
    device = logp.device
    return loss_fn(
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


def _gap(engine: list[list[float]], recomputed: list[list[float]]) -> float:
    if not recomputed:
        return 0.0
    diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)) for a, b in zip(engine, recomputed)])
    return float(diffs.mean()) if diffs.size else 0.0
