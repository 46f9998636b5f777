"""The stage table: every config field changes exactly the keys of the stages that read it and of their
downstream stages; a stage reads exactly the config it declares; its code version covers every module it
runs; and the layers point down (stages/ and storage/ never import flows/, no import cycles)."""

from __future__ import annotations

import ast
import importlib
import inspect
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from flows.config import load_config
from flows.pipeline import PIPELINE, ROOT, module_closure, sql_files
from flows.round import experiment_start, planned_keys, round_steps
from stages.config import ExperimentConfig

# Fields that say where and how long an experiment runs, not what a stage computes: no key may hold them.
RUN_FIELDS = {
    "name": "partitions the rows",
    "store": "where the tables live",
    "rounds": "how many rounds run",
    "launch": "in which process a stage runs",
}


# ---- the key of every stage over two rounds, by walking the flow's own wiring ---------------------


def stage_keys(cfg: ExperimentConfig, rounds: int = 2) -> tuple[dict, dict]:
    return planned_keys(cfg, rounds)


def leaf_fields(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted path, pydantic FieldInfo) of every field of the experiment config, sections expanded (at any
    depth: launch.train.kind)."""
    out = []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += leaf_fields(info.annotation, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", info))
    return out


def candidates(info, value) -> list:
    """Other values for a field, most likely valid first."""
    return [v for v in _candidates(info, value) if v != value]


def _candidates(info, value) -> list:
    if isinstance(value, list):
        return [value[:-1]]
    literals = [a for t in [info.annotation, *typing.get_args(info.annotation)] for a in _literal_args(t)]
    if literals:
        return [v for v in literals if v != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, value * 2]
    if isinstance(value, float):
        return [value * 0.5, value + 0.05, value - 0.05, value * 2, 0.5]
    if isinstance(value, str):
        return [value + "x", "owner/other-data", "Question: {question}"]
    if isinstance(value, tuple):
        return [(value[0] * 0.99, *value[1:])]
    if value is None:
        return [0.5, 3, "other", True]
    raise AssertionError(f"no change known for {value!r}")


def _literal_args(t) -> list:
    return list(typing.get_args(t)) if typing.get_origin(t) is typing.Literal else []


def changed(cfg: ExperimentConfig, path: str, info) -> ExperimentConfig:
    tree = cfg.model_dump()
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        node = node[part]
    for value in candidates(info, node[leaf]):
        node[leaf] = value
        try:
            return ExperimentConfig.model_validate(tree)
        except ValueError:
            continue
    raise AssertionError(f"found no valid other value for {path}; teach candidates() one")


def readers(path: str) -> set[str]:
    section = path.split(".")[0]
    return {name for name, s in PIPELINE.items() if path in s.config or section in s.config}


def downstream(nodes: set, inputs: dict) -> set:
    out = set(nodes)
    grew = True
    while grew:
        grew = False
        for node, parents in inputs.items():
            if node not in out and out.intersection(parents):
                out.add(node)
                grew = True
    return out


SWEPT = [(p, info) for p, info in leaf_fields() if not p.startswith("launch.")]  # launchers: the test below


@pytest.mark.parametrize("path,info", SWEPT, ids=[p for p, _ in SWEPT])
def test_a_field_changes_the_keys_of_its_readers_and_their_downstream(path, info):
    base = ExperimentConfig()
    keys, inputs = stage_keys(base)
    other, _ = stage_keys(changed(base, path, info))
    moved = {node for node in keys if keys[node] != other[node]}
    if path.split(".")[0] in RUN_FIELDS:
        assert moved == set(), f"{path} ({RUN_FIELDS[path.split('.')[0]]}) must be in no stage key"
        return
    stages = readers(path)
    assert stages, (
        f"no stage declares that it reads {path}: remove the field, or add it to a stage in flows/pipeline.py"
    )
    expected = downstream({node for node in keys if node[0] in stages}, inputs)
    assert moved == expected, (
        f"{path}: keys moved {sorted(moved - expected)} unexpectedly, kept {sorted(expected - moved)}"
    )


def test_launchers_are_in_no_key():
    """Where a stage runs (inline, a child process, torchrun ranks) is not what it computes."""
    moved_all = load_config(None, [
        "launch.base.kind=process", "launch.rollouts.kind=process", "launch.eval.kind=process",
        "launch.train.kind=torchrun", "launch.train.nproc_per_node=2", "launch.train.nnodes=2",
        "launch.train.node_rank=1", "launch.train.rdzv_endpoint=10.0.0.1:29400",
    ])  # fmt: skip
    default = ExperimentConfig().launch
    for stage in type(default).model_fields:  # every stage's launcher moved, and every field of train's
        assert getattr(moved_all.launch, stage).kind != getattr(default, stage).kind, stage
    assert all(
        getattr(moved_all.launch.train, f) != getattr(default.train, f) for f in type(default.train).model_fields
    )
    assert stage_keys(moved_all)[0] == stage_keys(ExperimentConfig())[0]


def test_checkpoint_zero_evaluation_follows_sampling_and_verifier():
    """The stale key this table was made to end: eval of checkpoint 0 ignored rollout and reward settings."""
    base = stage_keys(ExperimentConfig())[0]
    for setting in ["rollout.top_k=5", "rollout.top_p=0.9", "reward.verifier=math_verify", "rollout.batch_size=7"]:
        keys = stage_keys(load_config(None, [setting]))[0]
        assert keys[("eval", 0)] != base[("eval", 0)], setting
    assert stage_keys(load_config(None, ["rollout.top_k=5"]))[0][("base", 0)] == base[("base", 0)]


# ---- what a stage reads when it runs --------------------------------------------------------------


def test_every_stage_reads_exactly_the_config_it_declares(tmp_path, monkeypatch):
    """One tiny round run stage by stage (no Prefect): each stage reads every config path it declares and
    nothing else (reading anything else raises UndeclaredConfigRead inside the stage)."""
    from frames import TINY

    import flows.materialize as materialize

    made = []

    class Recorded(materialize.Settings):
        def __init__(self, cfg, stage):
            super().__init__(cfg, stage)
            made.append((stage.name, self))

    monkeypatch.setattr(materialize, "Settings", Recorded)
    cfg = load_config(None, [*TINY, f"store={tmp_path}", "name=reads"])

    def run(name, k, *inputs):
        return materialize.materialize(name, cfg, materialize.Plan(), k, inputs)

    prompts, checkpoint = experiment_start(run)
    round_steps(run, 0, prompts, checkpoint)
    read = {name: set() for name in PIPELINE}
    for name, settings in made:
        read[name] |= settings.reads
    for name, stage in PIPELINE.items():
        assert read[name] == set(stage.config), f"stage {name} read {sorted(read[name])}, declares {stage.config}"


# ---- code versions --------------------------------------------------------------------------------


def _used_modules(fn) -> set[str]:
    """stages/ modules whose functions or classes `fn` uses (itself or through the helpers of its own module
    it calls), and the stages/ modules those import at run time."""
    found, functions, done = set(), [fn], set()
    while functions:
        f = functions.pop()
        if f in done:
            continue
        done.add(f)
        names = inspect.getclosurevars(f)
        for obj in [*names.globals.values(), *names.nonlocals.values()]:
            if inspect.isfunction(obj) and obj.__module__ == fn.__module__:
                functions.append(obj)
            module = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None)
            if isinstance(module, str):
                found.add(module)
    todo = [m for m in found if m.startswith("stages.")]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for obj in vars(importlib.import_module(name)).values():
            module = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None)
            if isinstance(module, str) and module.startswith("stages.") and module not in seen:
                todo.append(module)
    return seen


@pytest.mark.parametrize("name", list(PIPELINE))
def test_code_version_covers_every_module_a_stage_runs(name):
    stage = PIPELINE[name]
    hashed = set(module_closure(stage.code))
    missing = _used_modules(stage.run) - hashed
    assert not missing, f"stage {name} runs {sorted(missing)}, which its code version leaves out"


def test_sql_a_stage_runs_is_in_its_code_version():
    assert ROOT / "sql/advantages.sql" in sql_files(module_closure(PIPELINE["advantages"].code))
    assert ROOT / "sql/curation.sql" in sql_files(module_closure(PIPELINE["curation"].code))


def test_base_code_includes_the_forward_pass_the_warm_start_runs():
    assert "stages.logprobs" in module_closure(PIPELINE["base"].code)


# ---- layers ---------------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """Project modules a file imports (lazy imports too; `if TYPE_CHECKING:` blocks are not imports)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in node.body
        for n in ast.walk(child)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in ("flows", "stages", "storage"):
                out |= {f"{node.module}.{a.name}" for a in node.names}
            elif node.module.split(".")[0] in ("flows", "stages", "storage"):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in ("flows", "stages", "storage")}
    return out


def _project_modules() -> dict[str, set[str]]:
    graph = {}
    for package in ("flows", "stages", "storage"):
        for path in sorted((ROOT / package).glob("*.py")):
            if path.stem != "__init__":
                graph[f"{package}.{path.stem}"] = _imports(path)
    return graph


def test_lower_layers_never_import_flows():
    bad = {m: sorted(i for i in deps if i.startswith("flows")) for m, deps in _project_modules().items()}
    bad = {m: deps for m, deps in bad.items() if deps and not m.startswith("flows")}
    assert bad == {}


def test_no_import_cycles():
    graph = _project_modules()
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " → ".join([*path[path.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_field_sweep_sees_every_field():
    """A new config field must come with a default the sweep can change (else the sweep would skip it)."""
    for path, info in leaf_fields():
        assert info.default is not PydanticUndefined, path


def test_accelerator_stages_and_only_they_read_the_device():
    """`runs_on` says which stages a launcher may move to an accelerator: exactly those that pick a device."""
    for name, stage in PIPELINE.items():
        assert ("device" in stage.config) == (stage.runs_on == "accelerator"), name


def test_a_stage_reads_its_input_at_the_version_its_ref_names(tmp_path):
    """A later write to the input partition (another run, a recompute) does not change what the stage reads."""
    import polars as pl

    from flows.materialize import Plan, StageRef, materialize
    from storage import tables

    store = str(tmp_path)
    cfg = load_config(None, [f"store={store}", "name=pinned"])
    part = {"experiment": "pinned", "round": 0}

    def rewards(value: float) -> pl.DataFrame:
        return pl.DataFrame(
            {"experiment": "pinned", "round": 0, "prompt_id": ["p", "p"], "sample_idx": [0, 1],
             "extracted_answer": ["1", "2"], "reward": [value, 0.0], "outcome": ["correct", "incorrect"],
             "verifier": "numeric", "verifier_version": "1"},
            schema_overrides={"round": pl.Int32, "sample_idx": pl.Int32},
        )  # fmt: skip

    first = tables.write_partition(store, "rewards", rewards(1.0), partition=part, stage_key="r1")
    tables.write_partition(store, "rewards", rewards(0.5), partition=part, stage_key="r2")
    ref = StageRef("rewards", "rewards", 0, "r1", first, 2, skipped=False, where=part)
    materialize("advantages", cfg, Plan(), 0, [ref])
    assert tables.read(store, "advantages")["group_mean_reward"].to_list() == [0.5, 0.5]  # (1.0 + 0.0) / 2


def test_every_accelerator_stage_has_a_launcher():
    from stages.config import LaunchConfig

    assert set(LaunchConfig.model_fields) == {n for n, s in PIPELINE.items() if s.runs_on == "accelerator"}
