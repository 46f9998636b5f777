"""One round as a Prefect flow whose body reads like the round (DESIGN.md §2): each task materialises
one table and returns a StageRef (table, version, stage_key), never the data."""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import partial
from pathlib import Path

import polars as pl
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows import progress
from flows.materialize import Plan, StageRef, Writer, code_version, materialize
from stages.advantage import advantages
from stages.config import ExperimentConfig
from stages.curate import curate
from stages.evaluate import evaluate
from stages.models import WARM_START_RECORD, builtin_policy, load_policy
from stages.prompts import BUILTIN_DATASET, load_prompts, render_prompts, sample_round_prompts
from stages.rollout import generate_rollouts
from stages.train import train_round, training_rows
from stages.verify import score, verify_batch
from storage import checkpoints, tables

TASK = {"cache_policy": NO_CACHE, "persist_result": False}


# ---- the round ---------------------------------------------------------------------------------


@flow(name="asymre-round", flow_run_name="{cfg.name}-round-{k}", persist_result=False, validate_parameters=False)
def round_flow(
    cfg: ExperimentConfig,
    k: int,
    plan: Plan = Plan(),
    checkpoint: StageRef | None = None,
    prompts: StageRef | None = None,
) -> StageRef:
    """Round k: sample from μ_k, verify, score, curate, train π from μ_k, evaluate μ_{k+1}.

    `prompts` and `checkpoint` (μ_k) come from the experiment flow after its first round; a round run on
    its own materialises (or skips) them itself."""
    prompts = prompts or prompts_table(cfg, plan)
    checkpoint = checkpoint or base_checkpoint(cfg, plan, prompts)
    if k == 0:
        evals_table(cfg, plan, 0, checkpoint, prompts)
    rollouts = rollouts_table(cfg, plan, k, prompts, checkpoint)
    rewards = rewards_table(cfg, plan, k, rollouts, prompts)
    advantages = advantages_table(cfg, plan, k, rewards)
    train_set = train_set_table(cfg, plan, k, advantages, rewards, rollouts)
    next_checkpoint = train_policy(cfg, plan, k, train_set, advantages, rewards, rollouts, checkpoint)
    evals_table(cfg, plan, k + 1, next_checkpoint, prompts)
    return next_checkpoint


# ---- the stages --------------------------------------------------------------------------------


@task(name="prompts", **TASK)
def prompts_table(cfg: ExperimentConfig, plan: Plan) -> StageRef:

    dataset = dataset_name(cfg)

    def produce(w: Writer) -> int:
        with progress.REPORTER.stage("prompts") as bar:
            frame = load_prompts(cfg.prompts, cfg.seed).with_columns(pl.lit(dataset).alias("dataset"))
            bar(frame.height, frame.height, dataset)
        w.write("prompts", frame, {"dataset": dataset})
        return frame.height

    return _run(cfg, plan, "prompts", 0, _section(cfg.prompts, seed=cfg.seed), [], produce, where={"dataset": dataset})


@task(name="base", **TASK)
def base_checkpoint(cfg: ExperimentConfig, plan: Plan, prompts: StageRef) -> StageRef:
    """Checkpoint 0 (μ_0): the builtin policy after its warm start (cached in the store), or the given model."""

    def produce(w: Writer) -> int:
        folder = checkpoints.checkpoint_dir(cfg.store, cfg.name, 0)
        if cfg.model.name == "builtin:tiny":
            cache = warm_start_cache(cfg)
            train = read_prompts(cfg, "train")
            label = "warm start (from the store's cache)" if cache.exists() else "warm start"
            with progress.REPORTER.stage(label, cfg.model.warm_start_steps) as bar:
                builtin_policy(
                    cache,
                    cfg.model,
                    cfg.prompts,
                    train,
                    warm_start_seed(cfg),
                    device(cfg),
                    lambda s, n, loss: bar(s, n, f"loss {loss:.3f}"),
                )
            # the cache's warm-start record holds wall times; leaving it out keeps the checkpoint hash reproducible
            _replace_dir(
                folder, lambda tmp: shutil.copytree(cache, tmp, ignore=shutil.ignore_patterns(WARM_START_RECORD))
            )
        else:
            model, tokenizer = load_policy(cfg.model.name, cfg.model.dtype, "cpu")
            _replace_dir(folder, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
        checkpoints.register(
            cfg.store, experiment=cfg.name, round=0, path=folder, parent_version=None, loss=None, stage_key=w.key
        )
        return 1

    return _run(cfg, plan, "base", 0, _section(cfg.model, seed=cfg.seed), [prompts], produce)


@task(name="rollouts", retries=2, **TASK)
def rollouts_table(cfg: ExperimentConfig, plan: Plan, k: int, prompts: StageRef, checkpoint: StageRef) -> StageRef:

    def produce(w: Writer) -> int:
        ckpt = checkpoints.lookup(cfg.store, cfg.name, k)
        model, tokenizer = load_policy(ckpt["path"], cfg.model.dtype, device(cfg))
        chosen = sample_round_prompts(read_prompts(cfg, "train"), cfg.prompts, k, cfg.seed)
        chosen = render_prompts(chosen, tokenizer, cfg.prompts)
        total = chosen.height * cfg.rollout.samples_per_prompt
        with progress.REPORTER.stage(f"round {k}: rollouts", total) as bar:
            frame = generate_rollouts(
                model, tokenizer, chosen, cfg.rollout, experiment=cfg.name, round=k,
                policy_version=ckpt["policy_version"], seed=round_seed(cfg, k), device=device(cfg),
                model_path=ckpt["path"], progress=lambda done, n: bar(done, n),
            )  # fmt: skip
        w.write("rollouts", frame, {"experiment": cfg.name, "round": k})
        return frame.height

    config = _section(cfg.rollout, per_round=cfg.prompts.per_round, template=cfg.prompts.template, seed=cfg.seed)
    return _run(cfg, plan, "rollouts", k, config, [prompts, checkpoint], produce)


@task(name="rewards", retries=2, **TASK)
def rewards_table(cfg: ExperimentConfig, plan: Plan, k: int, rollouts: StageRef, prompts: StageRef) -> StageRef:

    def produce(w: Writer) -> int:
        rows = tables.read(cfg.store, "rollouts", experiment=cfg.name, round=k)
        with progress.REPORTER.stage(f"round {k}: rewards", rows.height) as bar:
            frame = score(rows, read_prompts(cfg, "train"), cfg.reward, seed=round_seed(cfg, k))
            bar(rows.height, rows.height, f"mean reward {frame['reward'].mean():.3f}")
        w.write("rewards", frame, {"experiment": cfg.name, "round": k})
        return frame.height

    return _run(cfg, plan, "rewards", k, _section(cfg.reward, seed=cfg.seed), [rollouts, prompts], produce)


@task(name="advantages", **TASK)
def advantages_table(cfg: ExperimentConfig, plan: Plan, k: int, rewards: StageRef) -> StageRef:

    def produce(w: Writer) -> int:
        frame = advantages(tables.read(cfg.store, "rewards", experiment=cfg.name, round=k), cfg.advantage)
        w.write("advantages", frame, {"experiment": cfg.name, "round": k})
        return frame.height

    return _run(cfg, plan, "advantages", k, _section(cfg.advantage), [rewards], produce)


@task(name="curation", **TASK)
def train_set_table(
    cfg: ExperimentConfig, plan: Plan, k: int, advantages: StageRef, rewards: StageRef, rollouts: StageRef
) -> StageRef:

    def produce(w: Writer) -> int:
        frame = curate(
            tables.read(cfg.store, "rewards", experiment=cfg.name, round=k),
            tables.read(cfg.store, "rollouts", experiment=cfg.name, round=k, columns=_ROLLOUT_META),
            cfg.curation,
        )
        w.write("train_set", frame, {"experiment": cfg.name, "round": k})
        return frame.height

    return _run(cfg, plan, "curation", k, _section(cfg.curation), [advantages, rewards, rollouts], produce)


@task(name="train", **TASK)
def train_policy(
    cfg: ExperimentConfig,
    plan: Plan,
    k: int,
    train_set: StageRef,
    advantages: StageRef,
    rewards: StageRef,
    rollouts: StageRef,
    checkpoint: StageRef,
) -> StageRef:
    """π starts at μ_k, trains on the round's selected rows, and becomes checkpoint k+1 (μ_{k+1})."""

    def produce(w: Writer) -> int:
        ckpt = checkpoints.lookup(cfg.store, cfg.name, k)
        model, tokenizer = load_policy(ckpt["path"], cfg.model.dtype, device(cfg))
        state_file = Path(ckpt["path"]) / "optimizer.pt"
        state = torch.load(state_file, weights_only=False) if state_file.exists() else None
        read = partial(tables.read, cfg.store, experiment=cfg.name, round=k)
        rows = training_rows(read("train_set"), read("rollouts"), read("advantages"), read("rewards"))
        steps = cfg.train.epochs * -(-rows.height // cfg.train.batch_size)
        with progress.REPORTER.stage(f"round {k}: train ({rows.height} rows)", steps) as bar:
            result = train_round(
                model, rows, cfg.train, experiment=cfg.name, round=k, temperature=cfg.rollout.temperature,
                pad_id=tokenizer.pad_token_id, seed=cfg.seed, optimizer_state=state,
                progress=lambda s, n, loss: bar(s, n, f"loss {loss:+.4f}"),
            )  # fmt: skip
        folder = checkpoints.checkpoint_dir(cfg.store, cfg.name, k + 1)

        def save(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            torch.save(result.optimizer_state, tmp / "optimizer.pt")

        _replace_dir(folder, save)
        w.write("train_steps", result.steps, {"experiment": cfg.name, "round": k})
        checkpoints.register(
            cfg.store, experiment=cfg.name, round=k + 1, path=folder,
            parent_version=ckpt["policy_version"], loss=result.mean_loss, stage_key=w.key,
        )  # fmt: skip
        return result.steps.height

    inputs = [train_set, advantages, rewards, rollouts, checkpoint]
    config = _section(cfg.train, temperature=cfg.rollout.temperature, dtype=cfg.model.dtype, seed=cfg.seed)
    where = {"experiment": cfg.name, "round": k + 1}
    return _run(cfg, plan, "train", k, config, inputs, produce, where=where)


@task(name="eval", **TASK)
def evals_table(cfg: ExperimentConfig, plan: Plan, j: int, checkpoint: StageRef, prompts: StageRef) -> StageRef:
    """Greedy (and sampled) answers of checkpoint j on the test split."""

    def produce(w: Writer) -> int:
        ckpt = checkpoints.lookup(cfg.store, cfg.name, j)
        model, tokenizer = load_policy(ckpt["path"], cfg.model.dtype, device(cfg))
        test = render_prompts(read_prompts(cfg, "test"), tokenizer, cfg.prompts)
        verify = partial(
            verify_batch, verifier=cfg.reward.verifier, timeout_s=cfg.reward.timeout_s, workers=cfg.reward.workers
        )
        with progress.REPORTER.stage(f"eval checkpoint {j}", test.height) as bar:
            frame = evaluate(
                model, tokenizer, test, cfg.eval, cfg.rollout, verify, experiment=cfg.name, round=j,
                policy_version=ckpt["policy_version"], seed=round_seed(cfg, j) + 7, device=device(cfg),
            )  # fmt: skip
            greedy = frame.filter(pl.col("mode") == "greedy")["correct"].mean()
            bar(test.height, test.height, f"greedy accuracy {greedy:.3f}" if greedy is not None else "")
        w.write("evals", frame, {"experiment": cfg.name, "round": j})
        return frame.height

    config = _section(cfg.eval, temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens)
    plan_at = (j - 1, "eval") if j > 0 else (0, "base")  # checkpoint j is the product of round j − 1
    return _run(cfg, plan, "eval", j, config, [checkpoint, prompts], produce, plan_at=plan_at)


# ---- plumbing ----------------------------------------------------------------------------------

_ROLLOUT_META = ["experiment", "round", "prompt_id", "sample_idx", "num_tokens", "finish_reason"]


def _run(cfg, plan, stage, k, config, inputs, produce, where=None, plan_at=None) -> StageRef:
    label = f"round {k}: {stage}" if stage not in ("prompts", "base") else stage
    return materialize(
        store=cfg.store, experiment=cfg.name, stage=stage, round=k, config=config, inputs=inputs, plan=plan,
        produce=produce, output_where=where, plan_at=plan_at, reward_range=(cfg.reward.incorrect, cfg.reward.correct),
        on_skip=lambda ref: progress.REPORTER.skipped(label, f"output holds stage_key {ref.key}"),
    )  # fmt: skip


def _section(section, **extra) -> dict:
    return {**section.model_dump(mode="json"), **extra}


def _digest(*parts) -> str:
    text = json.dumps([p.model_dump(mode="json") if hasattr(p, "model_dump") else p for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def warm_start_seed(cfg: ExperimentConfig) -> int:
    return cfg.model.warm_start_seed if cfg.model.warm_start_seed is not None else cfg.seed


def warm_start_cache(cfg: ExperimentConfig) -> Path:
    """Where builtin:tiny's warm start for this config is cached in the store; keyed by the model code
    too, so that a changed architecture never loads an old warm start."""
    digest = _digest(cfg.model, cfg.prompts, warm_start_seed(cfg), code_version("base"))
    return Path(cfg.store) / "cache" / f"builtin-tiny-{digest}"


def dataset_name(cfg: ExperimentConfig) -> str:
    """The prompts partition of this config: readable source name plus a hash of what shapes the rows."""

    base = cfg.prompts.dataset_name or (
        BUILTIN_DATASET if cfg.prompts.source == "builtin" else Path(cfg.prompts.source).stem
    )
    return f"{base}-{_digest(cfg.prompts, cfg.seed)[:8]}"


def read_prompts(cfg: ExperimentConfig, split: str) -> pl.DataFrame:
    frame = tables.read(cfg.store, "prompts", dataset=dataset_name(cfg))
    return frame.filter(pl.col("split") == split).sort("prompt_id")


def round_seed(cfg: ExperimentConfig, k: int) -> int:
    return cfg.seed * 100_003 + k


def device(cfg: ExperimentConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def _replace_dir(folder: Path, fill) -> None:
    """Write a folder next to its final place and swap it in, so a crash never leaves half a checkpoint."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    fill(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
