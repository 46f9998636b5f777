"""One round as a Prefect flow whose body reads like the round (README: What `asymre run` does): each stage in
flows/pipeline.py runs as a task that materialises its table and returns a StageRef, never the data."""

from __future__ import annotations

import types
from collections.abc import Callable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.materialize import Plan, StageRef, materialize
from flows.pipeline import PIPELINE, Settings, stage_key
from stages.config import ExperimentConfig


def worth_retrying(task, task_run, state) -> bool:
    """A stage's retries are for failures that can pass (a killed worker pool, a busy disk); a damaged store
    stays damaged, and another try would only read (and hash) it again."""
    from storage.checkpoints import CheckpointDamaged
    from storage.tables import DataFileMissing, TableDamaged

    return not isinstance(state.result(raise_on_failure=False), CheckpointDamaged | DataFileMissing | TableDamaged)


# one Prefect task per stage, named after it, with the stage's retries
TASKS = {
    name: task(
        materialize, name=name, retries=stage.retries, retry_condition_fn=worth_retrying, cache_policy=NO_CACHE,
        persist_result=False,
    )
    for name, stage in PIPELINE.items()
}  # fmt: skip

Run = Callable[..., StageRef]  # run(stage, round, *inputs) -> the stage's StageRef


def round_steps(run: Run, k: int, prompts: StageRef, checkpoint: StageRef) -> StageRef:
    """Round k: sample from μ_k, verify, score, curate, train π from μ_k, evaluate μ_{k+1}; returns μ_{k+1}."""
    if k == 0:
        run("eval", 0, checkpoint, prompts)
    rollouts = run("rollouts", k, prompts, checkpoint)
    rewards = run("rewards", k, rollouts, prompts)
    advantages = run("advantages", k, rewards)
    train_set = run("curation", k, rewards, rollouts)
    next_checkpoint = run("train", k, train_set, advantages, rewards, rollouts, checkpoint)
    run("eval", k + 1, next_checkpoint, prompts)
    return next_checkpoint


def experiment_start(run: Run) -> tuple[StageRef, StageRef]:
    """The experiment's prompt pool and checkpoint 0 (μ_0): once per experiment run, not once per round."""
    prompts = run("prompts", 0)
    return prompts, run("base", 0, prompts)


def planned_keys(cfg: ExperimentConfig, rounds: int) -> tuple[dict, dict]:
    """The stage_key of every stage of rounds 0..rounds−1, {(stage, round): key}, and each one's inputs,
    {(stage, round): [(stage, round), ...]}: the flow's own wiring walked without running anything."""
    keys: dict[tuple[str, int], str] = {}
    inputs: dict[tuple[str, int], list] = {}

    def run(name: str, k: int, *refs) -> types.SimpleNamespace:
        node = (name, k)
        stage = PIPELINE[name]
        keys[node] = stage_key(stage, Settings(cfg, stage), [r.key for r in refs])
        inputs[node] = [r.node for r in refs]
        return types.SimpleNamespace(key=keys[node], node=node)

    prompts, checkpoint = experiment_start(run)
    for k in range(rounds):
        checkpoint = round_steps(run, k, prompts, checkpoint)
    return keys, inputs


def task_runner(cfg: ExperimentConfig, plan: Plan) -> Run:
    """Each stage as its Prefect task."""
    return lambda name, k, *inputs: TASKS[name](name, cfg, plan, k, inputs)


@flow(name="asymre-round", flow_run_name="{cfg.name}-round-{k}", persist_result=False, validate_parameters=False)
def round_flow(
    cfg: ExperimentConfig,
    k: int,
    plan: Plan = Plan(),
    checkpoint: StageRef | None = None,
    prompts: StageRef | None = None,
) -> StageRef:
    """Round k. `prompts` and `checkpoint` (μ_k) come from the experiment flow; a round run on its own
    materialises (or skips) the experiment's start itself."""
    run = task_runner(cfg, plan)
    if prompts is None or checkpoint is None:
        prompts, checkpoint = experiment_start(run)
    return round_steps(run, k, prompts, checkpoint)
