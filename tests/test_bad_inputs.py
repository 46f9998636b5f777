"""A table of wrong inputs to `asymre run`: each ends with exit code ≠ 0, no traceback, one message that names
the file, field or row, and no new version of any table except `failed` rows in stage_runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage import lineage, tables
from storage.schemas import SCHEMAS
from tests.frames import TINY

pytestmark = pytest.mark.slow

SETS = [x for a in [*[a for a in TINY if not a.startswith("rounds=")], "name=tiny"] for x in ("--set", a)]


@dataclass(frozen=True)
class Case:
    id: str
    args: list[str]  # after `asymre run`; {dir} is the case's folder, {store} its store
    says: list[str]  # each must appear in the message
    setup: Callable[[Path], None] | None = None  # makes files under the case's folder
    stored: bool = False  # start from a copy of a store holding round 0 of the tiny experiment
    env: dict[str, str] = field(default_factory=dict)


def write(name: str, text: str | bytes) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)

    return make


def jsonl(name: str, rows: list[dict]) -> Callable[[Path], None]:
    return write(name, "".join(json.dumps(r) + "\n" for r in rows))


def parquet(name: str, rows: dict) -> Callable[[Path], None]:
    return lambda d: pl.DataFrame(rows).write_parquet(d / name)


def both(*makers: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        for m in makers:
            m(d)

    return make


GOOD = {"question": ["1+1?", "2+3?"], "answer": ["#### 2", "#### 5"], "split": ["train", "test"]}
LONG = {"question": ["what is " * 20 + "1+1?", "2+3?"], "answer": ["#### 2", "#### 5"], "split": ["train", "test"]}


def src(path: str) -> list[str]:
    return ["--set", f"prompts.source={{dir}}/{path}"]


def truncate_log(table: str) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        log = sorted((d / "store" / "tables" / table / "_delta_log").glob("*.json"))[-1]
        log.write_bytes(log.read_bytes()[: log.stat().st_size // 2])

    return damage


def delete_data_file(table: str) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        for f in tables.files(str(d / "store"), table, where={"experiment": "tiny", "round": 0}):
            Path(f).unlink()

    return damage


def truncate_checkpoint(round: int) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        weights = d / "store" / "checkpoints" / "tiny" / f"round={round}" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])

    return damage


CASES = [
    # the config file and --set
    Case("yaml-malformed", ["{dir}/c.yaml"], ["c.yaml", "not valid YAML", "line"], write("c.yaml", "train: [\n")),
    Case("yaml-tabs", ["{dir}/c.yaml"], ["c.yaml", "tabs"], write("c.yaml", "train:\n\tlr: 0.1\n")),
    Case("yaml-folder", ["{dir}"], ["is a folder"]),
    Case("yaml-missing", ["{dir}/nope.yaml"], ["nope.yaml", "does not exist"]),
    Case("yaml-list", ["{dir}/c.yaml"], ["mapping of sections"], write("c.yaml", "- train\n- lr\n")),
    Case("yaml-binary", ["{dir}/c.yaml"], ["c.yaml", "UTF-8"], write("c.yaml", b"\xff\xfe\x00\x81garbage")),
    Case(
        "yaml-unknown-key", ["{dir}/c.yaml"], ["train.lrr", "unknown key", "lr"], write("c.yaml", "train:\n  lrr: 1\n")
    ),
    Case("set-no-equals", ["--set", "train.lr"], ["--set 'train.lr'", "section.field=value"]),
    Case("set-unknown-section", ["--set", "trian.lr=1"], ["trian", "unknown key"]),
    Case("set-bad-yaml-value", ["--set", "train.lr=[1"], ["train.lr=[1", "not valid YAML"]),
    Case("lr-inf", ["--set", "train.lr=inf"], ["train.lr", "finite"]),
    Case("reward-inf", ["--set", "reward.correct=inf"], ["reward.correct", "finite"]),
    Case("delta-v-nan", ["--set", "advantage.delta_v=.nan"], ["advantage.delta_v", "finite"]),
    Case("lr-negative", ["--set", "train.lr=-1"], ["train.lr", "greater than 0"]),
    Case("samples-zero", ["--set", "rollout.samples_per_prompt=0"], ["samples_per_prompt"]),
    Case("batch-not-multiple", ["--set", "train.batch_size=30", "--set", "train.micro_batch_size=16"], ["multiple"]),
    Case("bad-name", ["--set", "name=a b"], ["experiment name"]),
    Case("bad-engine", ["--set", "rollout.engine=tgi"], ["rollout.engine", "'hf'"]),
    Case("reward-order", ["--set", "reward.correct=0", "--set", "reward.incorrect=1"], ["reward.correct"]),
    # rounds and --from-stage
    Case("rounds-zero", ["--rounds", "0"], ["--rounds 0", "at least 1"]),
    Case("rounds-negative", ["--rounds", "-1"], ["--rounds -1"]),
    Case("from-stage-alone", ["--from-stage", "train"], ["--from-stage and --round"]),
    Case("from-stage-unknown", ["--from-stage", "trian", "--round", "0"], ["'trian'", "rollouts"]),
    Case(
        "from-stage-empty-store",
        ["--from-stage", "rollouts", "--round", "0"],
        ["nothing stored", "without --from-stage"],
    ),
    Case("round-negative", ["--from-stage", "rollouts", "--round", "-1"], ["--round -1", "from 0"]),
    Case("round-beyond-rounds", ["--from-stage", "train", "--round", "99"], ["round 99", "--rounds"]),
    Case("base-round-1", ["--from-stage", "base", "--round", "1"], ["base", "--round 0"]),
    Case(
        "round-beyond-store",
        ["--rounds", "100", "--from-stage", "rollouts", "--round", "99", *SETS],
        ["never finished", "rounds 0..0 complete", "--round 1"],
        stored=True,
    ),
    # the store
    Case("store-is-file", ["--store", "{dir}/f"], ["--store", "is a file"], write("f", "x")),
    # the model
    Case("model-missing", ["--set", "model.name={dir}/nope"], ["model.name", "nope", "no such file"]),
    Case("model-empty-folder", ["--set", "model.name={dir}/m"], ["model.name", "no config.json"], write("m/.keep", "")),
    Case("model-no-weights", ["--set", "model.name={dir}/m"], ["no weights"], write("m/config.json", "{}")),
    Case("model-bad-config", ["--set", "model.name={dir}/m"], ["config.json", "JSON"], write("m/config.json", "{")),
    Case(
        "model-no-tokenizer",
        ["--set", "model.name={dir}/m"],
        ["no tokenizer"],
        both(write("m/config.json", "{}"), write("m/model.safetensors", "x")),
    ),
    Case("model-is-file", ["--set", "model.name={dir}/m.bin"], ["is a file"], write("m.bin", "x")),
    Case(
        "model-hub-offline",
        ["--set", "model.name=someone/not-cached-model"],
        ["not in the local cache", "HF_HUB_OFFLINE"],
    ),
    Case("model-builtin-unknown", ["--set", "model.name=builtin:huge"], ["builtin:tiny"]),
    # the data
    Case("data-missing", src("nope.jsonl"), ["nope.jsonl", "does not exist"]),
    Case("data-empty", src("e.jsonl"), ["e.jsonl", "empty"], write("e.jsonl", "")),
    Case("data-garbage-jsonl", src("g.jsonl"), ["g.jsonl", "could not load"], write("g.jsonl", bytes(range(256)) * 3)),
    Case("data-garbage-parquet", src("g.parquet"), ["g.parquet", "could not load"], write("g.parquet", b"PAR1xx" * 50)),
    Case("data-csv", src("d.csv"), ["d.csv", ".parquet, .jsonl or .json"], write("d.csv", "question,answer\n1,2\n")),
    Case(
        "data-bad-json-line",
        src("b.jsonl"),
        ["b.jsonl", "could not load"],
        write("b.jsonl", json.dumps({"question": "a", "answer": "#### 1", "split": "train"}) + '\n{"question": "b\n'),
    ),
    Case(
        "data-no-answer-field",
        src("q.jsonl"),
        ["columns ['question']", "prompts.format"],
        jsonl("q.jsonl", [{"question": "a", "split": "train"}, {"question": "b", "split": "test"}]),
    ),
    Case(
        "data-bad-row",
        src("r.jsonl"),
        ["r.jsonl", "row 0", "####", "skip_bad_rows"],
        jsonl(
            "r.jsonl",
            [
                {"question": "a", "answer": "#### 1", "split": "train"},
                {"question": "b", "answer": "two", "split": "test"},
            ],
        ),
    ),
    Case(
        "data-no-test-split",
        src("t.parquet"),
        ["t.parquet", "['test']"],
        parquet("t.parquet", {"question": ["a"], "answer": ["#### 1"], "split": ["train"]}),
    ),
    Case(
        "data-no-split-column",
        src("s.parquet"),
        ["s.parquet", "'split' column"],
        parquet("s.parquet", {"question": ["a"], "answer": ["#### 1"]}),
    ),
    Case(
        "data-wrong-types",
        src("w.jsonl"),
        ["w.jsonl", "'question'", "not text"],
        jsonl(
            "w.jsonl",
            [
                {"question": "a", "answer": "#### 1", "split": "train"},
                {"question": {"x": 1}, "answer": "#### 2", "split": "test"},
            ],
        ),
    ),
    Case(
        "data-unknown-field",
        [*src("ok.parquet"), "--set", "prompts.question_field=prompt"],
        ["prompts.question_field", "'prompt'"],
        parquet("ok.parquet", GOOD),
    ),
    Case(
        "data-too-long-for-tiny", src("long.parquet"), ["builtin:tiny", "64 positions"], parquet("long.parquet", LONG)
    ),
    # a damaged store
    Case(
        "delta-log-truncated",
        ["--rounds", "2", *SETS],
        ["table rollouts", "_delta_log"],
        truncate_log("rollouts"),
        stored=True,
    ),
    Case(
        "data-file-deleted",
        ["--rounds", "2", *SETS],
        ["table rewards", "--from-stage rewards --round 0"],
        delete_data_file("rewards"),
        stored=True,
    ),
    Case(
        "checkpoint-truncated",
        ["--rounds", "2", *SETS],
        ["checkpoint", "round=1", "--from-stage train --round 0"],
        truncate_checkpoint(1),
        stored=True,
    ),
]


@pytest.fixture(scope="module")
def stored_round(tmp_path_factory, prefect_harness) -> Path:
    """A store holding round 0 (checkpoints 0 and 1) of the tiny experiment."""
    from flows.config import load_config
    from flows.iterate import experiment_flow

    store = tmp_path_factory.mktemp("stored") / "store"
    experiment_flow(load_config(None, [*TINY, "rounds=1", "name=tiny", f"store={store}"]))
    return store


def versions(store: Path) -> dict[str, int | str | None]:
    def version(name: str) -> int | str | None:
        try:
            return tables.version(str(store), name)
        except tables.TableDamaged:
            return "damaged"

    return {name: version(name) for name in SCHEMAS} if store.exists() else {}


def failed_only(store: Path, before: int) -> bool:
    """stage_runs gained at most one `failed` row since it held `before` rows (a damaged store is not worth a
    retry), besides `skipped` ones: the record of a stage found done before the failing one, which wrote
    nothing."""
    runs = lineage.runs(str(store)) if store.exists() else pl.DataFrame({"status": []})
    added = runs["status"].to_list()[before:]
    return set(added) <= {"failed", "skipped"} and added.count("failed") <= 1


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_message_and_writes_nothing(case: Case, tmp_path: Path, request, monkeypatch):
    from flows import progress

    monkeypatch.setattr(progress, "REPORTER", progress.REPORTER)  # `run` installs its own; put it back after
    d = tmp_path
    store = d / "store"
    if case.stored:
        shutil.copytree(request.getfixturevalue("stored_round"), store)
    if case.setup:
        case.setup(d)
    args = [a.replace("{dir}", str(d)) for a in case.args]
    if "--store" not in args:
        args += ["--store", str(store)]
    before = versions(store)
    runs_before = lineage.runs(str(store)).height if store.exists() and before.get("stage_runs") is not None else 0
    result = CliRunner().invoke(app, ["run", *args], env=case.env)
    message = result.output
    assert result.exit_code != 0, message
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in message, message
    assert message.startswith("error: ") or "\nerror: " in message, message
    for part in case.says:
        assert part.replace("{dir}", str(d)) in message, f"{part!r} not in {message!r}"
    after = versions(store)
    changed = {t for t in after if after[t] != before.get(t)} - {"stage_runs"}
    assert not changed, f"{case.id} wrote {changed}"
    if store.exists() and after.get("stage_runs") is not None:
        assert failed_only(store, runs_before), case.id


def test_the_table_holds_forty_cases():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


def test_read_only_store_is_refused(tmp_path):
    """A store on a read-only file system (a tmpfs mounted ro: permissions do not stop root)."""
    store = tmp_path / "ro"
    store.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(store)], capture_output=True)
    if mounted.returncode != 0:
        if os.geteuid() == 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
        store.chmod(0o555)
    try:
        result = CliRunner().invoke(app, ["run", "--store", str(store)])
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(store)], check=True)
    assert result.exit_code == 2, result.output
    assert f"--store {store} is not writable" in result.output and "Traceback" not in result.output
