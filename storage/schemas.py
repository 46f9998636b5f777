"""Arrow schemas of every asymre table: the single source of column names, types, key columns and the
polars schemas stages build their frames with. Each column carries a one-line description (field
metadata "description")."""

from __future__ import annotations

import polars as pl
import pyarrow as pa

KEYS = ["experiment", "round", "prompt_id", "sample_idx"]  # one row per sample of a round


def _f(name: str, type_: pa.DataType, description: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": description})


def _keys() -> list[pa.Field]:
    return [
        _f("experiment", pa.string(), "experiment name (partition column)"),
        _f("round", pa.int32(), "round k: rows sampled from checkpoint k (partition column)"),
        _f("prompt_id", pa.string(), "stable id of the prompt within its dataset"),
        _f("sample_idx", pa.int32(), "index of the sample within the prompt's group, 0..G-1"),
    ]


STAGE_KEY = _f("stage_key", pa.string(), "stage_key of the stage run that wrote this row")

SCHEMAS: dict[str, pa.Schema] = {
    "prompts": pa.schema(
        [
            _f("dataset", pa.string(), "dataset name (partition column)"),
            _f("split", pa.string(), "train or test"),
            _f("prompt_id", pa.string(), "stable id of the prompt within its dataset"),
            _f("prompt", pa.string(), "the question as given to the model (before templating)"),
            _f("answer", pa.string(), "gold answer, extracted once from the source"),
            _f("source", pa.string(), "where the row came from (generator or data file/hub id)"),
            _f("meta", pa.string(), "JSON with anything else of the source row (e.g. operator)"),
            STAGE_KEY,
        ]
    ),
    "rollouts": pa.schema(
        [
            *_keys(),
            _f("policy_version", pa.string(), "checkpoint that sampled this row (behaviour policy μ_k)"),
            _f("prompt", pa.string(), "the full prompt text fed to the model (templated)"),
            _f("completion", pa.string(), "decoded completion, special tokens removed"),
            _f("prompt_token_ids", pa.list_(pa.int32()), "token ids of the prompt"),
            _f("completion_token_ids", pa.list_(pa.int32()), "token ids of the completion, eos included"),
            _f(
                "behaviour_logprobs",
                pa.list_(pa.float32()),
                "per completion token log μ after temperature, as the engine sampled them",
            ),
            _f("behaviour_logprob", pa.float64(), "sum of behaviour_logprobs (sequence log μ)"),
            _f("num_tokens", pa.int32(), "number of completion tokens"),
            _f("finish_reason", pa.string(), "stop (eos) or length (hit max_new_tokens)"),
            _f("engine", pa.string(), "hf or vllm"),
            _f("temperature", pa.float64(), "sampling temperature"),
            _f("top_p", pa.float64(), "nucleus sampling threshold (1.0 = off)"),
            _f("top_k", pa.int32(), "top-k sampling (0 = off)"),
            _f("max_new_tokens", pa.int32(), "generation length limit"),
            _f("seed", pa.int64(), "seed of the generation batch"),
            STAGE_KEY,
        ]
    ),
    "rewards": pa.schema(
        [
            *_keys(),
            _f("extracted_answer", pa.string(), "answer the verifier read from the completion", nullable=True),
            _f("reward", pa.float64(), "scalar reward"),
            _f("outcome", pa.string(), "correct | incorrect | unparsable | timeout"),
            _f("verifier", pa.string(), "numeric or math_verify"),
            _f("verifier_version", pa.string(), "version of the verifier code"),
            STAGE_KEY,
        ]
    ),
    "advantages": pa.schema(
        [
            *_keys(),
            _f("group_size", pa.int32(), "number of samples of this prompt in the round"),
            _f("group_mean_reward", pa.float64(), "mean reward of the prompt's group"),
            _f("baseline", pa.float64(), "baseline V used for this row"),
            _f("delta_v", pa.float64(), "offset δV added to the mean (0 for constant baselines)"),
            _f("advantage", pa.float64(), "A = reward − V"),
            _f("baseline_mode", pa.string(), "group_mean | constant | batch_mean (group of 1 falls back)"),
            STAGE_KEY,
        ]
    ),
    "train_set": pa.schema(
        [
            *_keys(),
            _f("selected", pa.bool_(), "whether the row is trained on"),
            _f("weight", pa.float64(), "per-row loss weight (1.0 unless a rule says otherwise)"),
            _f("reason", pa.string(), "why the row was kept or dropped"),
            STAGE_KEY,
        ]
    ),
    "train_steps": pa.schema(
        [
            _f("experiment", pa.string(), "experiment name (partition column)"),
            _f("round", pa.int32(), "round whose data was trained on (partition column)"),
            _f("step", pa.int32(), "optimizer step within the round, from 0"),
            _f("epoch", pa.int32(), "epoch within the round, from 0"),
            _f("loss", pa.float64(), "loss of the step (mean over its micro-batches)"),
            _f("ratio_mean", pa.float64(), "mean importance ratio π/μ over the step's sequences"),
            _f("ratio_min", pa.float64(), "min importance ratio"),
            _f("ratio_max", pa.float64(), "max importance ratio"),
            _f("ratio_clipped", pa.float64(), "fraction of negative rows whose ratio was clipped to 1"),
            _f("positive_share", pa.float64(), "p: share of rows with reward above the midpoint"),
            _f("effective_positive_share", pa.float64(), "p̃: share of positive advantage mass"),
            _f("grad_norm", pa.float64(), "gradient norm before clipping"),
            _f("lr", pa.float64(), "learning rate of the step"),
            _f("tokens", pa.int64(), "completion tokens in the step"),
            _f("tokens_per_s", pa.float64(), "completion tokens per second of the step"),
            _f("logprob_gap", pa.float64(), "mean |engine log μ − recomputed log μ| per token (round)"),
            STAGE_KEY,
        ]
    ),
    "checkpoints": pa.schema(
        [
            _f("experiment", pa.string(), "experiment name (partition column)"),
            _f("round", pa.int32(), "k: this checkpoint is μ_k, the policy that samples round k"),
            _f("policy_version", pa.string(), "name of the checkpoint, e.g. default/round=3@ab12cd34ef56"),
            _f("parent_version", pa.string(), "checkpoint it was trained from", nullable=True),
            _f("path", pa.string(), "save_pretrained folder"),
            _f("loss", pa.float64(), "mean training loss that produced it", nullable=True),
            _f("sha256", pa.string(), "content hash over the folder's files"),
            _f("created_at", pa.timestamp("us", tz="UTC"), "when it was registered"),
            STAGE_KEY,
        ]
    ),
    "evals": pa.schema(
        [
            _f("experiment", pa.string(), "experiment name (partition column)"),
            _f("round", pa.int32(), "k: evaluation of checkpoint k (partition column)"),
            _f("policy_version", pa.string(), "checkpoint evaluated"),
            _f("prompt_id", pa.string(), "test prompt id"),
            _f("sample_idx", pa.int32(), "0 for greedy; sample index for sampled"),
            _f("completion", pa.string(), "decoded completion"),
            _f("extracted_answer", pa.string(), "answer the verifier read", nullable=True),
            _f("correct", pa.bool_(), "verifier says correct"),
            _f("mode", pa.string(), "greedy | sampled"),
            STAGE_KEY,
        ]
    ),
    "stage_runs": pa.schema(
        [
            _f("experiment", pa.string(), "experiment name (partition column)"),
            _f("round", pa.int32(), "round"),
            _f("stage", pa.string(), "stage name"),
            _f("stage_key", pa.string(), "hash of stage name, config, input keys and code version"),
            _f("input_versions", pa.string(), "JSON: {table: version} of the inputs read"),
            _f("config", pa.string(), "JSON of the stage's config"),
            _f("code_version", pa.string(), "version of the stage's code"),
            _f("rows", pa.int64(), "rows written"),
            _f("wall_s", pa.float64(), "wall time of the stage in seconds"),
            _f("status", pa.string(), "done | failed | skipped"),
            _f("message", pa.string(), "error or note", nullable=True),
            _f("output_version", pa.int64(), "version of the output table after the commit", nullable=True),
            _f("created_at", pa.timestamp("us", tz="UTC"), "when the run ended"),
        ]
    ),
    "bandit_limits": pa.schema(
        [
            _f("experiment", pa.string(), "bandit study name, e.g. bandit-seed0-arms100 (partition column)"),
            _f("seed", pa.int64(), "seed of the reward draw"),
            _f("V", pa.float64(), "fixed baseline V"),
            _f("v_mu", pa.float64(), "V^μ = E_μ[r], the behaviour policy's mean reward"),
            _f("limit_reward", pa.float64(), "expected reward of the simulated limit policy"),
            _f("limit_support", pa.int64(), "arms with probability > 1e-6 in the simulated limit"),
            _f("closed_form_reward", pa.float64(), "expected reward of π*(μ, V) (null when V ≥ V^μ)", nullable=True),
            _f("closed_form_support", pa.int64(), "support size of π* (null when V ≥ V^μ)", nullable=True),
            _f("max_abs_diff", pa.float64(), "max over arms |simulated − π*| (null when V ≥ V^μ)", nullable=True),
            _f("steps", pa.int64(), "lr=1 steps (ODE time) the dynamics needed to converge"),
        ]
    ),
    "bandit_iterations": pa.schema(
        [
            _f("experiment", pa.string(), "bandit study name (partition column)"),
            _f("seed", pa.int64(), "seed of the reward draw"),
            _f("V", pa.float64(), "fixed baseline V"),
            _f("mode", pa.string(), "expected (exact gradient) or sampled (batches y ~ μ)"),
            _f("round", pa.int64(), "policy-iteration round (μ ← π after each); 0 is the initial μ"),
            _f("expected_reward", pa.float64(), "E_π[r] at the end of the round"),
            _f("support", pa.int64(), "arms with probability > 1e-6"),
            _f("entropy", pa.float64(), "entropy of π in nats"),
        ]
    ),
}

# How each table is partitioned on disk: a stage replaces one partition per commit (storage/tables.py).
PARTITIONS: dict[str, list[str]] = {name: ["experiment", "round"] for name in SCHEMAS}
PARTITIONS["prompts"] = ["dataset"]
PARTITIONS["stage_runs"] = ["experiment"]
PARTITIONS["bandit_limits"] = ["experiment"]
PARTITIONS["bandit_iterations"] = ["experiment"]


# The columns that identify a row of each table (no two rows of a partition share them).
ROW_KEYS: dict[str, list[str]] = {
    "prompts": ["dataset", "prompt_id"],
    **dict.fromkeys(["rollouts", "rewards", "advantages", "train_set"], KEYS),
    "train_steps": ["experiment", "round", "step"],
    "checkpoints": ["experiment", "round"],
    "evals": ["experiment", "round", "mode", "prompt_id", "sample_idx"],
}


def polars_schema(name: str, without: tuple[str, ...] = ("stage_key",)) -> dict[str, pl.DataType]:
    """The table's columns as a polars schema, less `without` (a stage's frame has no stage_key yet)."""
    schema = pl.from_arrow(SCHEMAS[name].empty_table()).schema
    return {column: dtype for column, dtype in schema.items() if column not in without}
