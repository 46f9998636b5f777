"""Launchers (flows/launch.py): a round whose accelerator stages run in child processes writes the same rows
and checkpoints as one run inline, shows the same progress, fails clearly when a child is killed and
resumes to the same result; the torchrun command line for several machines (built, not run)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pytest
from frames import TINY

from flows import launch, progress
from flows.config import load_config
from flows.materialize import Plan, StageRef, materialize
from flows.pipeline import PIPELINE, Settings
from flows.round import experiment_start, round_steps
from stages.config import Launcher
from storage import lineage, tables

ACCELERATOR = [name for name, stage in PIPELINE.items() if stage.runs_on == "accelerator"]
COMPARED = ["rollouts", "rewards", "advantages", "train_set", "evals", "train_steps", "checkpoints"]
WALL_TIME = ["tokens_per_s", "created_at", "path"]  # wall time and where: not what was computed
# 8 optimizer steps instead of 2: a child killed after its first step is still training
LONGER_TRAINING = ["train.batch_size=16", "train.micro_batch_size=16", "train.epochs=2"]


def tiny(store: Path, *extra: str):
    return load_config(None, [*TINY, *LONGER_TRAINING, f"store={store}", "name=launched", *extra])


def round_zero(cfg, before_train=None) -> StageRef:
    """Round 0 stage by stage, as the flow wires it (no Prefect): prompts, base, eval 0, …, eval 1; calls
    `before_train()` right before the train stage."""

    def run(name, k, *inputs):
        if name == "train" and before_train is not None:
            before_train()
        return materialize(name, cfg, Plan(), k, inputs)

    prompts, checkpoint = experiment_start(run)
    return round_steps(run, 0, prompts, checkpoint)


class Recording(progress.Reporter):
    """Every stage's label, total and last update, in the order they started."""

    def __init__(self):
        self.stages: list[dict] = []
        self.skips: list[str] = []

    @contextmanager
    def stage(self, label: str, total: int | None = None):
        state = {"label": label, "total": total, "done": None, "info": "", "ended": False}
        self.stages.append(state)

        def update(done, total=None, info=""):
            state.update(done=done, total=total or state["total"], info=info)
            self.on_update(label)

        yield update
        state["ended"] = True

    def on_update(self, label: str) -> None: ...

    def skipped(self, label: str, reason: str) -> None:
        self.skips.append(label)


@contextmanager
def reporting(reporter: progress.Reporter):
    before = progress.REPORTER
    progress.use(reporter)
    try:
        yield reporter
    finally:
        progress.use(before)


def comparable(store: Path, table: str) -> pl.DataFrame:
    frame = tables.read(str(store), table).drop(WALL_TIME, strict=False)
    return frame.sort([c for c in ("round", "prompt_id", "sample_idx", "mode", "step") if c in frame.columns])


def assert_same_results(store: Path, reference: Path) -> None:
    for table in COMPARED:
        left, right = comparable(store, table), comparable(reference, table)
        assert left.height > 0, table
        assert left.equals(right), table
    sha = {s: tables.read(str(s), "checkpoints").sort("round")["sha256"].to_list() for s in (store, reference)}
    assert sha[store] == sha[reference] and len(sha[store]) == 2


@pytest.fixture(scope="module")
def inline(tmp_path_factory):
    """The reference: round 0 with every stage inline, the progress it showed, and a copy of its store
    from right before the train stage (where the killed run starts)."""
    store = tmp_path_factory.mktemp("inline")
    before_train = tmp_path_factory.mktemp("before-train") / "store"
    with reporting(Recording()) as seen:
        round_zero(tiny(store), before_train=lambda: shutil.copytree(store, before_train))
    return store, seen, before_train


# ---- a round in child processes -------------------------------------------------------------------


@pytest.mark.slow
def test_a_round_in_child_processes_matches_inline_and_shows_the_same_progress(inline, tmp_path):
    reference, inline_seen, _ = inline
    store = tmp_path / "process"
    cfg = tiny(store, *[f"launch.{name}.kind=process" for name in ACCELERATOR])
    with reporting(Recording()) as seen:
        round_zero(cfg)

    assert_same_results(store, reference)
    runs = lineage.runs(str(store), "launched")
    assert set(runs["status"]) == {"done"} and runs.height == 9  # prompts, base, eval 0, 5 stages, eval 1
    # progress from the children reached this process's reporter: the same bars, ending where inline ended
    assert [s["label"] for s in seen.stages] == [s["label"] for s in inline_seen.stages]
    for child, here in zip(seen.stages, inline_seen.stages):
        assert child == here, child["label"]
    labels = " | ".join(s["label"] for s in seen.stages)
    assert "warm start" in labels and "round 0: train" in labels and "eval checkpoint 1" in labels


# ---- a child killed mid-stage ---------------------------------------------------------------------


def children(*needles: str) -> list[int]:
    """This process's children whose command line holds every needle (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid() and all(n in cmdline for n in needles):
            found.append(int(entry.name))
    return found


class KillTraining(Recording):
    """Signals once the train stage's first optimizer step is reported (by its child, replayed here)."""

    def __init__(self):
        super().__init__()
        self.training = threading.Event()

    def on_update(self, label: str) -> None:
        if label.startswith("round 0: train"):
            self.training.set()


@pytest.mark.slow
def test_a_killed_child_fails_clearly_and_a_rerun_resumes_to_the_same_result(inline, tmp_path):
    reference, _, store = inline  # round 0 up to its train stage, as the inline run stored it
    cfg = tiny(store, "launch.train.kind=process")
    failure: list[BaseException] = []

    def flow() -> None:
        try:
            round_zero(cfg)
        except BaseException as err:
            failure.append(err)

    with reporting(KillTraining()) as watch:
        thread = threading.Thread(target=flow)
        thread.start()
        while not watch.training.wait(0.2):
            assert thread.is_alive(), f"the round ended before training reported a step: {failure}"
        pids = children("flows.launch", "train-round-0.json")
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        thread.join(300)
    assert not thread.is_alive()

    assert len(failure) == 1 and isinstance(failure[0], launch.StageProcessFailed), failure
    message = str(failure[0])
    for part in ["stage train of round 0", "launcher process", f"pid {pids[0]}", "killed by SIGKILL (out of memory?)",
                 "a rerun resumes", "last lines of its output"]:  # fmt: skip
        assert part in message, (part, message)
    runs = lineage.runs(str(store), "launched")
    train = runs.filter((pl.col("stage") == "train") & (pl.col("round") == 0))
    assert train["status"].to_list() == ["failed"]
    assert "StageProcessFailed" in train["message"][0] and "SIGKILL" in train["message"][0]
    assert tables.read(str(store), "checkpoints").height == 1  # checkpoint 1 never registered

    round_zero(cfg)

    assert_same_results(store, reference)
    rerun = lineage.runs(str(store), "launched").filter(pl.col("created_at") > runs["created_at"].max())
    status = {(r["stage"], r["round"]): r["status"] for r in rerun.iter_rows(named=True)}
    assert status.pop(("train", 0)) == "done" and status.pop(("eval", 1)) == "done"
    assert set(status.values()) == {"skipped"}, status


@pytest.mark.slow
def test_a_failing_child_shows_its_output_and_its_exit_code(tmp_path, capsys):
    """A stage that raises in its child (an eval of a checkpoint never registered): the child's one-line error
    (a user's error: no traceback) goes to stderr as it comes and ends the error, which names the exit code."""
    cfg = tiny(tmp_path)
    stage = PIPELINE["eval"]
    nowhere = StageRef("train", "checkpoints", 0, "no-key", None, 1, skipped=False, where={"round": 5})
    prompts = StageRef("prompts", "prompts", 0, "no-key", None, 1, skipped=False, where={"dataset": "none"})
    where = {"experiment": "launched", "round": 5}
    run = launch.StageRun(stage, Settings(cfg, stage), cfg.store, cfg.name, 5, "k", where,
                          {"checkpoint": nowhere, "prompts": prompts})  # fmt: skip
    with pytest.raises(launch.StageProcessFailed) as err:
        launch.run_stage(stage, run, Launcher(kind="process"), cfg)
    message = str(err.value)
    assert "stage eval of round 5" in message and "exit code 1" in message
    assert "Traceback" not in message
    assert "| error: checkpoint 5 of experiment 'launched' is not registered" in message
    assert "--from-stage train --round 4" in message
    assert "error: checkpoint 5 of experiment 'launched'" in capsys.readouterr().err  # forwarded as it came


# ---- progress lines ----------------------------------------------------------------------------------


def test_progress_lines_replay_into_the_reporter():
    """What a child's LineReporter writes, fed line by line to a Replay, draws the same bars; text around
    the marks is the child's own output; a bar the child left open is closed."""
    import io

    out = io.StringIO()
    child = progress.LineReporter(out, min_interval_s=3600)  # throttled: only first and last updates go out
    with child.stage("round 2: train (64 rows)", 8) as bar:
        for step in range(1, 9):
            bar(step, 8, f"loss {step:+.1f}")
    child.skipped("round 2: eval", "output holds stage_key abc")
    child.line("round 2 done")
    with child.stage("eval checkpoint 3", 24) as bar:
        bar(5, 24)
    lines = out.getvalue().splitlines()
    assert len(lines) == 9 and all(line.startswith(progress.MARK) for line in lines)
    lines[-1] = ""  # the child died before ending its last bar

    seen = Recording()
    texts = []

    def line(text):
        texts.append(text)

    seen.line = line
    replay = progress.Replay(seen)
    rest = [
        replay.feed(text)
        for text in ["Downloading: 10%", *lines, f"warning: x{lines[0]}", "not json" + progress.MARK + "{"]
    ]
    replay.close()
    assert rest[0] == "Downloading: 10%" and rest[-2] == "warning: x" and rest[-1].startswith("not json")
    assert seen.stages[0] == {
        "label": "round 2: train (64 rows)",
        "total": 8,
        "done": 8,
        "info": "loss +8.0",
        "ended": True,
    }
    assert seen.stages[1] == {"label": "eval checkpoint 3", "total": 24, "done": 5, "info": "", "ended": True}
    assert seen.skips == ["round 2: eval"] and texts == ["round 2 done"]


def test_a_childs_output_is_streamed_progress_replayed_and_its_tail_kept(capsys):
    """What the flow reads from a child: progress lines replayed, other lines to stderr as they come (a bar
    redrawn in place only in its last state), the last lines kept, its exit code."""
    import subprocess

    start = progress.MARK + '{"event": "start", "id": 1, "label": "round 0: rollouts", "total": 4}'
    update = progress.MARK + '{"event": "update", "id": 1, "done": 4, "total": 4, "info": ""}'
    script = (
        "import sys\n"
        f"print({start!r}, flush=True)\n"
        "sys.stderr.write('Loading: 0%\\rLoading: 50%\\rLoading: 100%\\n'); sys.stderr.flush()\n"
        f"print('partial ' + {update!r}, flush=True)\n"
        "print('\\n'.join(f'line {i}' for i in range(60)))\n"
        "sys.exit(3)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with reporting(Recording()) as seen:
        code, tail = launch._watch(proc)
    assert code == 3
    assert seen.stages == [{"label": "round 0: rollouts", "total": 4, "done": 4, "info": "", "ended": True}]
    assert tail == [f"line {i}" for i in range(20, 60)]
    err = capsys.readouterr().err.splitlines()
    assert err[:3] == ["Loading: 100%", "partial ", "line 0"] and len(err) == 62


# ---- which launcher, and the command lines --------------------------------------------------------


def test_cpu_stages_run_inline_whatever_the_config(tmp_path):
    cfg = tiny(tmp_path, *[f"launch.{name}.kind=process" for name in ACCELERATOR])
    for name, stage in PIPELINE.items():
        want = "process" if stage.runs_on == "accelerator" else "inline"
        assert launch.launcher_for(cfg, stage).kind == want, name
    assert launch.launcher_for(tiny(tmp_path), PIPELINE["train"]).kind == "inline"  # the default


def test_torchrun_over_two_nodes_puts_the_spec_in_the_store_and_names_the_rendezvous(tmp_path):
    cfg = tiny(tmp_path, "launch.train.kind=torchrun", "launch.train.nproc_per_node=4", "launch.train.nnodes=2",
               "launch.train.rdzv_endpoint=node0:29400")  # fmt: skip
    launcher = launch.launcher_for(cfg, PIPELINE["train"])
    spec, result = launch.spec_paths(cfg, "train", 3, launcher)
    assert spec == tmp_path / "launch" / "launched" / "train-round-3.json"
    assert result.parent == spec.parent  # rank 0 may run on another machine: its result goes to the store too
    assert launch.command(launcher, spec) == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "2", "--node_rank", "0",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "node0:29400", "--rdzv_id", "launched-train-round-3",
        "-m", "flows.launch", str(spec),
    ]  # fmt: skip
    (other,) = launch.other_nodes(launcher, spec)
    assert other.startswith("node 1: cd ")
    argv = shlex.split(other.split(" && ", 1)[1])
    assert argv == launch.command(launcher, spec, node_rank=1) and argv[argv.index("--node_rank") + 1] == "1"
    assert "--standalone" not in argv


def test_torchrun_on_one_node_is_standalone_and_a_process_is_plain_python(tmp_path):
    one = Launcher(kind="torchrun", nproc_per_node=2)
    spec, _ = launch.spec_paths(tiny(tmp_path), "train", 0, one)
    try:
        assert tmp_path not in spec.parents  # a temporary folder: nobody else reads it
        argv = launch.command(one, spec)
        assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--standalone" in argv
        assert "--rdzv_endpoint" not in argv and argv[-3:] == ["-m", "flows.launch", str(spec)]
        assert launch.command(Launcher(kind="process"), spec) == [sys.executable, "-m", "flows.launch", str(spec)]
    finally:
        spec.parent.rmdir()


def test_exits_are_described():
    assert launch.describe_exit(-signal.SIGKILL) == "killed by SIGKILL (out of memory?)"
    assert launch.describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert launch.describe_exit(3) == "exit code 3"


def test_a_child_started_by_the_flow_dies_with_it(tmp_path):
    """PR_SET_PDEATHSIG set between fork and exec: a child outlives no thread that started it."""
    import subprocess

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    pid_file = tmp_path / "pid"
    starter = (
        "import subprocess, sys, time\n"
        "from flows.launch import _dies_with\n"
        "import os\n"
        "p = subprocess.Popen(['sleep', '60'], preexec_fn=_dies_with(os.getpid()))\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
    )
    subprocess.run([sys.executable, "-c", starter], check=True, cwd=Path(__file__).parents[1], timeout=60)
    stat = Path(f"/proc/{pid_file.read_text()}/stat")
    for _ in range(50):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):  # dead, maybe not reaped yet
                return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    raise AssertionError(f"{stat.parent.name} outlived the process that started it")
