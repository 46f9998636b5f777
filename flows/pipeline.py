"""The stage table: every stage of an experiment declared once (what it writes and reads, the config it
reads, the code it runs, where it runs, its function). Stage lists, keys, code versions, output tables,
the CLI's choices and `asymre status` all derive from PIPELINE."""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import polars as pl

from stages import gguf
from stages.advantage import advantages as advantage_rows
from stages.config import ExperimentConfig
from stages.curate import curate
from stages.evaluate import evaluate
from stages.models import load_policy, load_sampler, warm_started_policy
from stages.prompts import BUILTIN_DATASET, read_prompts, render_prompts, sample_round_prompts
from stages.rollout import Engine, Sampling, generate_rollouts
from stages.train import train_round, training_rows
from stages.verify import score, verify_batch
from storage import checkpoints, lineage

if TYPE_CHECKING:
    from flows.materialize import StageRun

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_POLICY = "builtin:tiny"


# ---- what a stage may read of the config --------------------------------------------------------


class UndeclaredConfigRead(RuntimeError):
    """A stage read config its declaration does not list: its key would not change with that value."""


class Settings:
    """The part of the experiment config that one stage reads: the sections and fields its declaration
    lists, and nothing else (reading anything else raises). `reads` records what was read."""

    def __init__(self, cfg: ExperimentConfig, stage: Stage):
        self._stage = stage.name
        self._values: dict[str, Any] = {}
        self.reads: set[str] = set()
        for path in stage.config:
            top, _, field = path.partition(".")
            value = getattr(cfg, top)
            if field:
                self._values.setdefault(top, _Fields(self, top)).values[field] = getattr(value, field)
            else:
                self._values[top] = value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._values:
            raise UndeclaredConfigRead(
                f"stage {self._stage} reads `{name}`, which its entry in flows/pipeline.py does not list; add it there"
            )
        value = self._values[name]
        if not isinstance(value, _Fields):
            self.reads.add(name)
        return value

    def as_dict(self) -> dict[str, Any]:
        """What the stage's key hashes (and stage_runs records as its config)."""
        out = {}
        for name, value in sorted(self._values.items()):
            if isinstance(value, _Fields):
                out[name] = dict(sorted(value.values.items()))
            elif hasattr(value, "model_dump"):
                out[name] = value.model_dump(mode="json")
            else:
                out[name] = value
        return out


class _Fields:
    """Some fields of a config section (a stage that reads only them gets only them)."""

    def __init__(self, settings: Settings, section: str):
        self._settings, self._section, self.values = settings, section, {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "values":
            raise AttributeError(name)
        path = f"{self._section}.{name}"
        if name not in self.values:
            raise UndeclaredConfigRead(
                f"stage {self._settings._stage} reads `{path}`, which its entry in flows/pipeline.py does not list; "
                "add it there"
            )
        self._settings.reads.add(path)
        return self.values[name]


# ---- the stages' functions: read inputs, call the pure stage, write ------------------------------


def prompt_rows(run: StageRun) -> int:
    s = run.settings
    with run.progress("prompts") as bar:
        frame = read_prompts(s.prompts, s.seed).frame.with_columns(dataset=pl.lit(run.where["dataset"]))
        bar(frame.height, frame.height, run.where["dataset"])
    run.write("prompts", frame, run.where)
    return frame.height


def base_checkpoint(run: StageRun) -> int:
    """Checkpoint 0 (μ_0): the built-in policy after its warm start (cached in the store under this stage's
    key, which covers everything the warm start depends on), or the given model saved as a folder."""
    s = run.settings
    folder = checkpoints.checkpoint_dir(run.store, run.experiment, 0)
    if s.model.name == BUILTIN_POLICY:
        cache = checkpoints.cache_dir(run.store) / f"builtin-tiny-{run.key}"
        cached = checkpoints.complete(cache)
        label = "warm start (from the store's cache)" if cached else "warm start"
        with run.progress(label, s.model.warm_start_steps) as bar:
            if not cached:
                model, tokenizer, stats = warm_started_policy(
                    s.model, split(run.read("prompts"), "train"), s.prompts.template, s.prompts.use_chat_template,
                    warm_start_seed(s), run.device, lambda step, n, loss: bar(step, n, f"loss {loss:.3f}"),
                )  # fmt: skip
                checkpoints.save(cache, model, tokenizer, record=stats)
        checkpoints.copy(cache, folder)
    else:
        source = s.model.name
        if gguf.is_gguf(source):
            source = dequantised_gguf(run, gguf.locate(source))
        model, tokenizer = load_policy(source, s.model.dtype, "cpu")
        checkpoints.save(folder, model, tokenizer)
    checkpoints.register(
        run.store, experiment=run.experiment, round=0, path=folder, parent_version=None, loss=None, stage_key=run.key
    )
    return 1


def dequantised_gguf(run: StageRun, path: Path) -> str:
    """The plain Hugging Face folder of a GGUF file, dequantised once per file content into the store's cache."""
    sha256 = gguf.file_sha256(path)
    cache = gguf.cache_folder(checkpoints.cache_dir(run.store), sha256)
    if not checkpoints.complete(cache):
        with run.progress(f"dequantise {path.name}") as bar:
            model, tokenizer = gguf.dequantise(path)
            checkpoints.save(cache, model, tokenizer, record={"gguf": str(path), "sha256": sha256})
            bar(1, 1, str(cache))
    return str(cache)


def chat(s: Settings) -> tuple:
    """How a stage renders prompts: render_prompts' arguments after the tokenizer."""
    p = s.prompts
    return p.template, p.use_chat_template, p.system_prompt, p.user_message


def rollout_rows(run: StageRun) -> int:
    s, k = run.settings, run.round
    ckpt = run.checkpoint("checkpoint")
    model, tokenizer = load_sampler(ckpt["path"], s.model.dtype, run.device, s.rollout.engine)
    chosen = sample_round_prompts(split(run.read("prompts"), "train"), s.prompts.per_round, k, s.seed)
    chosen = render_prompts(chosen, tokenizer, *chat(s))
    with run.progress(f"round {k}: rollouts", chosen.height * s.rollout.samples_per_prompt) as bar:
        frame = generate_rollouts(
            model, tokenizer, chosen, s.rollout, experiment=run.experiment, round=k,
            policy_version=ckpt["policy_version"], seed=round_seed(s.seed, k), device=run.device,
            model_path=ckpt["path"], progress=lambda done, n: bar(done, n),
        )  # fmt: skip
    run.write("rollouts", frame, run.where)
    return frame.height


def reward_rows(run: StageRun) -> int:
    s, k = run.settings, run.round
    rollouts = run.read("rollouts")
    with run.progress(f"round {k}: rewards", rollouts.height) as bar:
        frame = score(rollouts, split(run.read("prompts"), "train"), s.reward, seed=round_seed(s.seed, k))
        bar(rollouts.height, rollouts.height, f"mean reward {frame['reward'].mean():.3f}")
    run.write("rewards", frame, run.where)
    return frame.height


def advantage_table(run: StageRun) -> int:
    frame = advantage_rows(run.read("rewards"), run.settings.advantage)
    run.write("advantages", frame, run.where)
    return frame.height


ROLLOUT_META = ["experiment", "round", "prompt_id", "sample_idx", "num_tokens", "finish_reason"]


def train_set_rows(run: StageRun) -> int:
    frame = curate(run.read("rewards"), run.read("rollouts", columns=ROLLOUT_META), run.settings.curation)
    run.write("train_set", frame, run.where)
    return frame.height


def trained_checkpoint(run: StageRun) -> int:
    """π starts at μ_k, trains on the round's selected rows, and becomes checkpoint k+1 (μ_{k+1}).

    Under torchrun (a torch.distributed process group) every rank loads μ_k and trains its share (FSDP2; with
    model.dtype below float32 the weights load as fp32 masters and train in mixed precision); rank 0 alone
    saves the checkpoint in model.dtype, writes train_steps and registers it, and tells the others when it is
    done (or failed), so no rank leaves before the checkpoint exists. Every rank returns the same row count."""
    import torch.distributed as dist

    s, k = run.settings, run.round
    sharded = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if sharded else 0
    ckpt = run.checkpoint("checkpoint")
    model, tokenizer = load_policy(ckpt["path"], "float32" if sharded else s.model.dtype, run.device)
    rows = training_rows(run.read("train_set"), run.read("rollouts"), run.read("advantages"), run.read("rewards"))
    steps = s.train.epochs * math.ceil(rows.height / s.train.batch_size)
    with run.progress(f"round {k}: train ({rows.height} rows)", steps) as bar:
        result = train_round(
            model, rows, s.train, experiment=run.experiment, round=k, temperature=s.rollout.temperature,
            pad_id=tokenizer.pad_token_id, seed=s.seed,
            optimizer_state=checkpoints.load_optimizer_state(ckpt["path"]) if rank == 0 else None,
            progress=lambda step, n, loss: bar(step, n, f"loss {loss:+.4f}"),
            top_k=s.rollout.top_k, top_p=s.rollout.top_p, dtype=s.model.dtype,
        )  # fmt: skip
    failure = None
    if rank == 0:
        try:
            folder = checkpoints.checkpoint_dir(run.store, run.experiment, k + 1)
            checkpoints.save(
                folder, model, tokenizer, result.optimizer_state, state_dict=result.model_state, dtype=s.model.dtype
            )
            run.write("train_steps", result.steps, {"experiment": run.experiment, "round": k})
            checkpoints.register(
                run.store, experiment=run.experiment, round=k + 1, path=folder,
                parent_version=ckpt["policy_version"], loss=result.mean_loss, stage_key=run.key,
            )  # fmt: skip
        except BaseException as err:
            failure = err
    if sharded:  # the barrier: the other ranks wait here until rank 0 has saved and registered (or failed)
        status = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(status, src=0)
        if rank != 0 and status[0] is not None:
            raise RuntimeError(f"rank 0 failed to save checkpoint {k + 1}: {status[0]}")
    if failure is not None:
        raise failure
    return result.steps.height


def eval_rows(run: StageRun) -> int:
    """Greedy (and sampled) answers of checkpoint j on the test split, judged by the reward's verifier."""
    s, j = run.settings, run.round
    ckpt = run.checkpoint("checkpoint")
    model, tokenizer = load_sampler(ckpt["path"], s.model.dtype, run.device, s.rollout.engine)
    test = render_prompts(split(run.read("prompts"), "test"), tokenizer, *chat(s))
    r = s.rollout
    verify = partial(verify_batch, verifier=s.reward.verifier, timeout_s=s.reward.timeout_s, workers=s.reward.workers)
    with run.progress(f"eval checkpoint {j}", test.height) as bar:
        frame = evaluate(
            model, tokenizer, test, s.eval, sampling=Sampling(r.temperature, r.top_k, r.top_p),
            max_new_tokens=s.eval.max_new_tokens or r.max_new_tokens,
            engine=Engine.of(r), verify_fn=verify,
            experiment=run.experiment, round=j, policy_version=ckpt["policy_version"],
            seed=round_seed(s.seed, j) + 7, device=run.device, model_path=ckpt["path"],
        )  # fmt: skip
        greedy = frame.filter(pl.col("mode") == "greedy")["correct"].mean()
        bar(test.height, test.height, f"greedy accuracy {greedy:.3f}" if greedy is not None else "")
    run.write("evals", frame, run.where)
    return frame.height


# ---- derived values the stages share ------------------------------------------------------------


def split(prompts: pl.DataFrame, name: str) -> pl.DataFrame:
    return prompts.filter(pl.col("split") == name).sort("prompt_id")


def round_seed(seed: int, k: int) -> int:
    return seed * 100_003 + k


def warm_start_seed(s: Settings) -> int:
    return s.model.warm_start_seed if s.model.warm_start_seed is not None else s.seed


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def dataset_partition(s: Settings, experiment: str, k: int) -> dict:
    """The prompts partition of a config: readable source name plus a hash of what shapes the rows."""
    p = s.prompts
    base = p.dataset_name or (BUILTIN_DATASET if p.source == "builtin" else Path(p.source).stem)
    return {"dataset": f"{base}-{_digest([p.model_dump(mode='json'), s.seed])[:8]}"}


def round_partition(s: Settings, experiment: str, k: int) -> dict:
    return {"experiment": experiment, "round": k}


def next_round_partition(s: Settings, experiment: str, k: int) -> dict:
    return {"experiment": experiment, "round": k + 1}


# ---- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One stage, declared once."""

    name: str
    writes: tuple[str, ...]  # tables; the first holds the rows whose stage_key says "done"
    reads: tuple[str, ...]  # its inputs, in the order the flow passes them (stage outputs; "checkpoint" is μ_k)
    config: tuple[str, ...]  # what it reads of the config: a section ("rollout") or one field ("rollout.top_k")
    code: tuple[str, ...]  # the stages/ modules it runs (their imports follow), besides its own function
    runs_on: Literal["cpu", "accelerator"]
    run: Callable[[StageRun], int]  # reads its inputs, computes, writes; returns its row count
    where: Callable[[Settings, str, int], dict] = round_partition  # the partition of `writes[0]` it fills
    per_round: bool = True  # False: once per experiment, before round 0
    retries: int = 0  # Prefect retries (for failures that can pass: a killed worker pool, a full disk)


PIPELINE: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "prompts", ("prompts",), (), ("prompts", "seed"), ("stages.prompts",), "cpu", prompt_rows,
            where=dataset_partition, per_round=False,
        ),
        Stage(
            "base", ("checkpoints",), ("prompts",),
            ("model", "prompts.template", "prompts.use_chat_template", "seed", "device"),
            ("stages.models", "stages.gguf"), "accelerator", base_checkpoint, per_round=False,
        ),
        Stage(
            "rollouts", ("rollouts",), ("prompts", "checkpoint"),
            ("rollout", "prompts.per_round", "prompts.template", "prompts.use_chat_template", "prompts.system_prompt", "prompts.user_message", "model.dtype", "seed",
             "device"),
            ("stages.rollout", "stages.prompts", "stages.models"), "accelerator", rollout_rows, retries=2,
        ),
        Stage(
            "rewards", ("rewards",), ("rollouts", "prompts"), ("reward", "seed"), ("stages.verify",), "cpu",
            reward_rows, retries=2,
        ),
        Stage("advantages", ("advantages",), ("rewards",), ("advantage",), ("stages.advantage",), "cpu", advantage_table),
        Stage("curation", ("train_set",), ("rewards", "rollouts"), ("curation",), ("stages.curate",), "cpu", train_set_rows),
        Stage(
            "train", ("checkpoints", "train_steps"), ("train_set", "advantages", "rewards", "rollouts", "checkpoint"),
            ("train", "rollout.temperature", "rollout.top_k", "rollout.top_p", "model.dtype", "seed", "device"),
            ("stages.train", "stages.models"), "accelerator", trained_checkpoint, where=next_round_partition,
        ),
        Stage(
            "eval", ("evals",), ("checkpoint", "prompts"),
            ("eval", "rollout.temperature", "rollout.top_k", "rollout.top_p", "rollout.max_new_tokens",
             "rollout.engine", "rollout.batch_size", "rollout.gpu_memory_utilization", "rollout.tensor_parallel_size",
             "rollout.engines", "rollout.max_num_seqs", "rollout.enable_prefix_caching", "rollout.enforce_eager",
             "rollout.dtype", "reward.verifier",
             "reward.timeout_s", "reward.workers", "prompts.template", "prompts.use_chat_template", "prompts.system_prompt", "prompts.user_message", "model.dtype",
             "seed", "device"),
            ("stages.evaluate", "stages.prompts", "stages.models", "stages.verify"), "accelerator", eval_rows,
        ),
    ]
}  # fmt: skip

STAGES = list(PIPELINE)  # in the order of a round
ROUND_STAGES = [name for name, s in PIPELINE.items() if s.per_round]  # what --from-stage can start from


def upstream_tables(name: str) -> list[str]:
    """Tables written by the stages before `name` (what a check of its output may join against)."""
    return [table for stage in STAGES[: STAGES.index(name)] for table in PIPELINE[stage].writes]


# ---- code versions ------------------------------------------------------------------------------


def module_closure(modules: tuple[str, ...]) -> list[str]:
    """The stages/ modules that `modules` import (at any depth, lazy imports too), themselves included."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(_module_file(name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.startswith("stages."):
                    todo.append(node.module)
                elif node.module == "stages":
                    todo.extend(f"stages.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                todo.extend(alias.name for alias in node.names if alias.name.startswith("stages."))
    return sorted(seen)


def _module_file(name: str) -> Path:
    return ROOT / (name.replace(".", "/") + ".py")


_SQL_FILE = re.compile(r"[\"']([\w/-]+\.sql)[\"']")


def sql_files(modules: list[str]) -> list[Path]:
    """The sql/ files those modules run (named in them as string literals)."""
    names = {m for module in modules for m in _SQL_FILE.findall(_module_file(module).read_text())}
    return sorted(p for p in (ROOT / "sql" / n for n in names) if p.is_file())


def function_sources(fn: Callable) -> list[str]:
    """The source of `fn` and of the functions and plain constants of its own module that it uses, at any
    depth: the part of this module a stage runs."""
    seen: dict[str, str] = {}
    todo = [fn]
    while todo:
        f = todo.pop()
        if f.__qualname__ in seen:
            continue
        seen[f.__qualname__] = inspect.getsource(f)
        for name in _names(f.__code__):
            value = f.__globals__.get(name)
            if inspect.isfunction(value) and value.__module__ == fn.__module__:
                todo.append(value)
            elif isinstance(value, (str, int, float, list, tuple)) and name.isupper():
                seen.setdefault(name, f"{name} = {value!r}")
    return [seen[k] for k in sorted(seen)]


def _names(code) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _names(const)
    return names


def _code_version(stage: Stage) -> str:
    modules = module_closure(stage.code)
    digest = hashlib.sha256()
    for text in function_sources(stage.run) + [_module_file(m).read_text() for m in modules]:
        digest.update(text.encode())
    for path in sql_files(modules):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# Hashed once, when the flow's process imports this module (with the stage modules it runs): a file
# edited while a long experiment runs must not give the old code's output a new code version.
CODE_VERSIONS = {name: _code_version(stage) for name, stage in PIPELINE.items()}


def stage_key(stage: Stage, settings: Settings, input_keys: list[str]) -> str:
    """hash(stage name, the config it reads, its inputs' keys, its code version)."""
    return lineage.stage_key(stage.name, settings.as_dict(), input_keys, CODE_VERSIONS[stage.name])
