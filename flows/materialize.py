"""How a flow runs one stage: compute its stage_key, skip it when its output already holds that key,
otherwise produce, write, check and record it in `stage_runs`."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from storage import lineage, tables
from storage.checks import CheckFailed, run_checks

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prompts", "base", "rollouts", "rewards", "advantages", "curation", "train", "eval"]
OUTPUT_TABLE = lineage.STAGE_OUTPUT
# the source files whose content is each stage's code version
CODE = {
    "prompts": ["stages/prompts.py"],
    "base": ["stages/models.py"],
    "rollouts": ["stages/rollout.py", "stages/prompts.py"],
    "rewards": ["stages/verify.py"],
    "advantages": ["stages/advantage.py", "sql/advantages.sql"],
    "curation": ["stages/curate.py", "sql/curation.sql"],
    "train": ["stages/train.py", "stages/losses.py"],
    "eval": ["stages/evaluate.py", "stages/verify.py"],
}


def _hash_code(stage: str) -> str:
    digest = hashlib.sha256()
    for rel in CODE[stage]:
        digest.update((ROOT / rel).read_bytes())
    return digest.hexdigest()[:12]


# Hashed once, when the flow's process imports this module (with the stage modules it runs): a file
# edited while a long experiment runs must not give the old code's output a new code version.
_CODE_VERSIONS = {stage: _hash_code(stage) for stage in CODE}


def code_version(stage: str) -> str:
    return _CODE_VERSIONS[stage]


@dataclass(frozen=True)
class StageRef:
    """What a stage task returns: where its output is, never the data itself."""

    stage: str
    table: str
    round: int
    key: str
    version: int | None
    rows: int
    skipped: bool
    wall_s: float = 0.0


@dataclass(frozen=True)
class Plan:
    """Which stages are reused as stored regardless of keys, and which are forced to re-run."""

    from_stage: str | None = None
    from_round: int = 0

    def reuse_as_stored(self, stage: str, round: int) -> bool:
        if self.from_stage is None:
            return False
        return round < self.from_round or (round == self.from_round and _before(stage, self.from_stage))

    def force(self, stage: str, round: int) -> bool:
        return self.from_stage is not None and round == self.from_round and not _before(stage, self.from_stage)


def _before(stage: str, other: str) -> bool:
    return STAGES.index(stage) < STAGES.index(other)


@dataclass
class Writer:
    """Handed to a producer: writes partitions stamped with the stage's key."""

    store: str
    key: str
    versions: dict[str, int] = field(default_factory=dict)

    def write(self, table: str, frame: pl.DataFrame, partition: dict) -> int:
        version = tables.write_partition(self.store, table, frame, partition=partition, stage_key=self.key)
        self.versions[table] = version
        return version


class StoredOutputMissing(RuntimeError):
    pass


def materialize(
    *,
    store: str,
    experiment: str,
    stage: str,
    round: int,
    config: dict,
    inputs: list[StageRef],
    plan: Plan,
    produce: Callable[[Writer], int],
    output_where: dict | None = None,
    plan_at: tuple[int, str] | None = None,
    reward_range: tuple[float, float] = (0.0, 1.0),
    on_skip: Callable[[StageRef], None] | None = None,
) -> StageRef:
    """Run `produce` (which writes through the Writer and returns its row count) unless the stage is done.

    `plan_at` is where the stage sits for --from-stage (default: its own round and name); the evaluation
    of checkpoint j is recorded as round j but is the last step of round j − 1.
    """
    with tables.views_rewritten_once(store):  # one views.sql rewrite for the stage's commits
        plan_round, plan_stage = plan_at or (round, stage)
        table = OUTPUT_TABLE[stage]
        where = output_where or {"experiment": experiment, "round": round}
        version_code = code_version(stage)
        key = lineage.stage_key(stage, config, [i.key for i in inputs], version_code)
        input_versions = {i.table: i.version for i in inputs}
        record = dict(
            experiment=experiment, round=round, stage=stage, config=config, code_version=version_code,
            input_versions=input_versions,
        )  # fmt: skip

        stored = lineage.last_done(store, experiment, round, stage)
        if plan.reuse_as_stored(plan_stage, plan_round):
            if stored is None:
                raise StoredOutputMissing(
                    f"--from-stage reuses {stage} of round {round} as stored, but it has no output; run without --from-stage"
                )
            key = stored["stage_key"]
        if (
            not plan.force(plan_stage, plan_round)
            and stored is not None
            and stored["stage_key"] == key
            and lineage.output_holds(store, table, where, key, empty_ok=stored["rows"] == 0)
        ):
            ref = StageRef(stage, table, round, key, tables.version(store, table), stored["rows"], skipped=True)
            lineage.record_run(store, key=key, rows=ref.rows, wall_s=0.0, status="skipped",
                               output_version=ref.version, message="output already holds this stage_key", **record)  # fmt: skip
            if on_skip:
                on_skip(ref)
            return ref

        started = time.perf_counter()
        writer = Writer(store, key)
        try:
            rows = produce(writer)
            run_checks(store, experiment=experiment, round=round, stage=stage, reward_range=reward_range)
        except Exception as err:
            lineage.record_run(store, key=key, rows=0, wall_s=time.perf_counter() - started, status="failed",
                               message=f"{type(err).__name__}: {err}"[:4000], **record)  # fmt: skip
            raise
        wall = time.perf_counter() - started
        version = writer.versions.get(table, tables.version(store, table))
        lineage.record_run(store, key=key, rows=rows, wall_s=wall, status="done", output_version=version, **record)
        return StageRef(stage, table, round, key, version, rows, skipped=False, wall_s=wall)


__all__ = ["STAGES", "CheckFailed", "Plan", "StageRef", "StoredOutputMissing", "Writer", "materialize"]
