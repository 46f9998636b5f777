"""How a flow runs one stage of the table: compute its stage_key, skip it when its output already holds
that key, otherwise run it (where its launcher says: flows/launch.py), check what it wrote and record it
in `stage_runs`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from flows import progress, stop
from flows.launch import StageProcessFailed, StageRef, StageRun, StoredOutputMissing, launcher_for, run_stage
from flows.pipeline import CODE_VERSIONS, PIPELINE, STAGES, Settings, Stage, stage_key, upstream_tables
from stages.config import ExperimentConfig
from storage import catalog, lineage, tables
from storage.checks import CheckFailed, run_checks


@dataclass(frozen=True)
class Plan:
    """Which stages are reused as stored regardless of keys, and which are forced to re-run."""

    from_stage: str | None = None
    from_round: int = 0

    def reuse_as_stored(self, stage: str, round: int) -> bool:
        if self.from_stage is None:
            return False
        at = position(stage, round)
        return at < (self.from_round, STAGES.index(self.from_stage))

    def force(self, stage: str, round: int) -> bool:
        if self.from_stage is None:
            return False
        at_round, at_stage = position(stage, round)
        return at_round == self.from_round and at_stage >= STAGES.index(self.from_stage)


def position(stage: str, round: int) -> tuple[int, int]:
    """(round, index in the round) of a stage run: the evaluation of checkpoint j is recorded as round j but
    is the last step of round j − 1 (and checkpoint 0's goes with the base checkpoint)."""
    if stage == "eval":
        return (round - 1, STAGES.index("eval")) if round > 0 else (0, STAGES.index("base"))
    return round, STAGES.index(stage)


def materialize(name: str, cfg: ExperimentConfig, plan: Plan, round: int, inputs: Sequence[StageRef] = ()) -> StageRef:
    """Run stage `name` of round `round` on `inputs` (in its declared order) unless its output already
    holds its key; either way views.sql is rewritten once, after the stage's commits."""
    stage = PIPELINE[name]
    if len(inputs) != len(stage.reads):
        raise TypeError(f"stage {name} reads {stage.reads}, got {len(inputs)} inputs")
    try:
        return _materialize(stage, cfg, plan, round, list(inputs))
    finally:
        with contextlib.suppress(OSError):  # a read-only store still runs; its views.sql is only a convenience
            catalog.write_views_sql(cfg.store)


def _materialize(stage: Stage, cfg: ExperimentConfig, plan: Plan, round: int, inputs: list[StageRef]) -> StageRef:
    store, experiment = cfg.store, cfg.name
    settings = Settings(cfg, stage)
    where = stage.where(settings, experiment, round)
    table = stage.writes[0]
    key = stage_key(stage, settings, [i.key for i in inputs])
    record = dict(
        experiment=experiment, round=round, stage=stage.name, config=settings.as_dict(),
        code_version=CODE_VERSIONS[stage.name], input_versions={i.table: i.version for i in inputs},
    )  # fmt: skip
    label = f"round {round}: {stage.name}" if stage.per_round else stage.name

    stored = lineage.last_done(store, experiment, round, stage.name)
    if plan.reuse_as_stored(stage.name, round):
        if stored is None:
            raise StoredOutputMissing(
                f"--from-stage reuses {stage.name} of round {round} as stored, but it has no output; "
                "run without --from-stage"
            )
        key = stored["stage_key"]
    if (
        not plan.force(stage.name, round)
        and stored is not None
        and stored["stage_key"] == key
        and lineage.output_holds(store, table, where, key, empty_ok=stored["rows"] == 0)
    ):
        version = tables.version(store, table)
        ref = StageRef(stage.name, table, round, key, version, stored["rows"], skipped=True, where=where)
        lineage.record_run(store, key=key, rows=ref.rows, wall_s=0.0, status="skipped", output_version=version,
                           message="output already holds this stage_key", **record)  # fmt: skip
        progress.REPORTER.skipped(label, f"output holds stage_key {key}")
        return ref

    started = time.perf_counter()
    run = StageRun(stage, settings, store, experiment, round, key, where, dict(zip(stage.reads, inputs)))
    try:
        # what a Ctrl-C names; a stage that draws no bar of its own (advantages, curation) still gets one line
        with stop.running(label), progress.REPORTER.running(label) as ran:
            rows = run_stage(stage, run, launcher_for(cfg, stage), cfg)  # inline, or in a child process
            ran(rows)
        if "round" in where:  # checks look at one (experiment, round) partition; prompts have none
            run_checks(
                store, experiment=experiment, round=round, tables=list(stage.writes),
                available=upstream_tables(stage.name), reward_range=(cfg.reward.incorrect, cfg.reward.correct),
            )  # fmt: skip
    except Exception as err:
        lineage.record_run(store, key=key, rows=0, wall_s=time.perf_counter() - started, status="failed",
                           message=clip(f"{type(err).__name__}: {err}", 4000), **record)  # fmt: skip
        raise
    wall = time.perf_counter() - started
    version = run.versions.get(table, tables.version(store, table))
    lineage.record_run(store, key=key, rows=rows, wall_s=wall, status="done", output_version=version, **record)
    return StageRef(stage.name, table, round, key, version, rows, skipped=False, where=where, wall_s=wall)


def clip(text: str, limit: int) -> str:
    """At most `limit` characters: the start and the end (where a child's output ends with its error)."""
    if len(text) <= limit:
        return text
    head = limit // 4
    return f"{text[:head]}\n…\n{text[len(text) - (limit - head - 3) :]}"


__all__ = ["CheckFailed", "Plan", "StageProcessFailed", "StageRef", "StageRun", "StoredOutputMissing", "materialize"]
