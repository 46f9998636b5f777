"""Where a stage computes, and what its function is handed (a StageRun). An accelerator stage runs as its
launcher in the config says (`launch.<stage>`); a cpu stage always inline:

- inline: in the flow's process.
- process: a fresh child process (`python -m flows.launch SPEC`) that exits after the stage, so everything
  it held (GPU memory too) goes back. SPEC holds the experiment config, the stage, its round, key, partition
  and input refs; the child rebuilds the StageRun, runs the bare stage function (no Prefect) and writes a
  result file (rows, the table versions it wrote).
- torchrun: train only; the same child under `torch.distributed.run`, one per rank. Every rank runs the
  stage; rank 0 alone reports progress and writes the result file.

A child reports progress as marked lines on its stdout, which the flow's process replays into its own
reporter (the same bars as inline); its other output goes to the flow's stderr as it comes. A child dies
with the flow (PR_SET_PDEATHSIG), and a child that fails raises StageProcessFailed with its exit and the
tail of its output; nothing is marked done then, so a rerun resumes (each table write is one Delta commit
and checkpoint folders are swapped in whole)."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import io
import json
import logging
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import torch

from flows import progress
from flows.pipeline import CODE_VERSIONS, PIPELINE, ROOT, Settings, Stage
from stages.config import ExperimentConfig, Launcher
from storage import checkpoints, tables

log = logging.getLogger(__name__)

TAIL_LINES = 40  # lines of a child's output kept for the error
TAIL_LINE_CHARS = 1000  # of each
STOP_GRACE_S = 15.0  # SIGTERM, then this long, then SIGKILL
DRAIN_S = 2.0  # how long output is still read after a child exited (its own children may hold the pipe)
PARENT_ENV = "ASYMRE_LAUNCH_PARENT"  # pid of the flow's process, for a torchrun worker to check at start
PR_SET_PDEATHSIG = 1


# ---- what a stage is handed -----------------------------------------------------------------------


@dataclass(frozen=True)
class StageRef:
    """What a stage task returns: where its output is (table, partition, version), never the data itself."""

    stage: str
    table: str
    round: int
    key: str
    version: int | None
    rows: int
    skipped: bool
    where: dict = field(default_factory=dict)
    wall_s: float = 0.0


@dataclass
class StageRun:
    """What a stage's function is handed: the settings it may read, its inputs, and where to write."""

    stage: Stage
    settings: Settings
    store: str
    experiment: str
    round: int
    key: str
    where: dict  # the partition of its first output table
    inputs: dict[str, StageRef]
    versions: dict[str, int] = field(default_factory=dict)

    def read(self, role: str, columns: list[str] | None = None) -> pl.DataFrame:
        """The input `role`'s partition, at the version its StageRef names."""
        ref = self.inputs[role]
        return tables.read(self.store, ref.table, version=ref.version, columns=columns, **ref.where)

    def checkpoint(self, role: str) -> dict:
        """The registered checkpoint an input names (its row of `checkpoints`, at the version the ref names)."""
        ref = self.inputs[role]
        # a folder that is gone or whose content differs from its registered hash raises CheckpointDamaged,
        # which names the run that rebuilds it
        return checkpoints.checked(self.store, self.experiment, ref.where["round"], version=ref.version)

    def write(self, table: str, frame: pl.DataFrame, partition: dict) -> int:
        """Replace one partition of `table` with `frame`, every row stamped with this run's key."""
        version = tables.write_partition(self.store, table, frame, partition=partition, stage_key=self.key)
        self.versions[table] = version
        return version

    @property
    def device(self) -> str:
        """The torch device; under torchrun "cuda" is the rank's own GPU (the child makes it the current one)."""
        wanted = self.settings.device
        if wanted == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return wanted

    def progress(self, label: str, total: int | None = None):
        return progress.REPORTER.stage(label, total)


# ---- running a stage as its launcher says ---------------------------------------------------------


class StageProcessFailed(RuntimeError):
    """A stage's child process (or torchrun) exited with an error, died or was killed."""


def launcher_for(cfg: ExperimentConfig, stage: Stage) -> Launcher:
    """The launcher of an accelerator stage (`launch.<name>`); cpu stages run inline."""
    return getattr(cfg.launch, stage.name) if stage.runs_on == "accelerator" else Launcher()


def run_stage(stage: Stage, run: StageRun, launcher: Launcher, cfg: ExperimentConfig | None = None) -> int:
    """Run `stage` on `run` where `launcher` says; returns its row count and leaves the versions it wrote in
    `run.versions`. A child needs the experiment config (`cfg`) to rebuild the run."""
    if launcher.kind == "inline":
        return stage.run(run)
    if cfg is None:
        raise TypeError(f"launch.{stage.name}.kind={launcher.kind} needs the experiment config")
    return _in_child(stage, run, launcher, cfg)


def spec_paths(cfg: ExperimentConfig, stage: str, round: int, launcher: Launcher) -> tuple[Path, Path]:
    """(spec, result) files of a child: in a temporary folder, or under the store when other machines
    must read them (torchrun over nnodes > 1: the store is where they all see the same files)."""
    name = f"{stage}-round-{round}"
    if launcher.kind == "torchrun" and launcher.nnodes > 1:
        store = tables.resolve_store(cfg.store)
        if "://" in store:
            raise ValueError(f"launch.{stage}.nnodes > 1 needs a store on a file system every node mounts")
        folder = Path(store) / "launch" / cfg.name
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = Path(tempfile.mkdtemp(prefix=f"asymre-{cfg.name}-"))
    return folder / f"{name}.json", folder / f"{name}.result.json"


def command(launcher: Launcher, spec: str | Path, node_rank: int | None = None) -> list[str]:
    """The child's command line (under torchrun: as node `node_rank`, by default the launcher's own)."""
    child = ["-m", "flows.launch", str(spec)]
    if launcher.kind == "process":
        return [sys.executable, *child]
    if launcher.kind != "torchrun":
        raise ValueError(f"launcher kind {launcher.kind} starts no process")
    rank = launcher.node_rank if node_rank is None else node_rank
    if launcher.nnodes == 1:
        rendezvous = ["--standalone"]
    else:
        rendezvous = [  # the id keeps two stages (or experiments) sharing one endpoint apart
            "--rdzv_backend", "c10d", "--rdzv_endpoint", str(launcher.rdzv_endpoint),
            "--rdzv_id", f"{Path(spec).parent.name}-{Path(spec).stem}",
        ]  # fmt: skip
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(launcher.nproc_per_node),
        "--nnodes", str(launcher.nnodes), "--node_rank", str(rank), *rendezvous, *child,
    ]  # fmt: skip


def other_nodes(launcher: Launcher, spec: str | Path) -> list[str]:
    """What each other machine of a multi-node torchrun must run (from a checkout at the same code, in the
    same environment), one line per node."""
    return [
        f"node {rank}: cd {shlex.quote(str(ROOT))} && {shlex.join(command(launcher, spec, rank))}"
        for rank in range(launcher.nnodes)
        if rank != launcher.node_rank
    ]


def describe(launcher: Launcher) -> str:
    if launcher.kind == "torchrun":
        return (
            f"torchrun (nproc_per_node={launcher.nproc_per_node}, nnodes={launcher.nnodes}, "
            f"node_rank={launcher.node_rank})"
        )
    return launcher.kind


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exit code {code}"


def _in_child(stage: Stage, run: StageRun, launcher: Launcher, cfg: ExperimentConfig) -> int:
    spec, result = spec_paths(cfg, stage.name, run.round, launcher)
    shared = launcher.kind == "torchrun" and launcher.nnodes > 1  # under the store: kept for the other nodes
    result.unlink(missing_ok=True)
    _write_json(spec, {
        "config": cfg.model_dump(mode="json"), "stage": stage.name, "round": run.round, "key": run.key,
        "where": run.where, "inputs": {role: dataclasses.asdict(ref) for role, ref in run.inputs.items()},
        "code_version": CODE_VERSIONS[stage.name], "result": str(result),
    })  # fmt: skip
    argv = command(launcher, spec)
    what = f"stage {stage.name} of round {run.round}"
    if launcher.kind == "torchrun" and launcher.nnodes > 1:
        text = f"{what} waits for the other nodes of its torchrun to join; run there:\n  " + "\n  ".join(
            other_nodes(launcher, spec)
        )
        log.warning(text)
    with _sigterm_raises(what):  # outermost: the spec is cleaned up before the signal goes on
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                env=_child_env(launcher), start_new_session=True, preexec_fn=_dies_with(os.getpid()),
            )  # fmt: skip
            try:
                code, tail = _watch(proc)
            except BaseException:  # KeyboardInterrupt, SIGTERM, an error of this process: the child goes too
                _stop(proc)
                raise
            if code != 0 or not result.is_file():
                why = describe_exit(code) if code != 0 else "exit code 0 but no result file"
                output = "\n".join(f"  | {line}" for line in tail) or "  (no output)"
                raise StageProcessFailed(
                    f"{what} failed in its child process (launcher {describe(launcher)}, pid {proc.pid}): {why}; "
                    f"nothing of it is marked done, a rerun resumes.\nlast lines of its output:\n{output}"
                )
            done = json.loads(result.read_text())
        finally:
            if shared:
                result.unlink(missing_ok=True)
            else:
                shutil.rmtree(spec.parent, ignore_errors=True)
    run.versions.update(done["versions"])
    run.settings.reads.update(done["reads"])
    return done["rows"]


def _child_env(launcher: Launcher) -> dict[str, str]:
    env = dict(os.environ)
    if launcher.kind == "torchrun" and "OMP_NUM_THREADS" not in env:  # torchrun would set 1 and say so at length
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // launcher.nproc_per_node))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH")] if p)
    env["PYTHONUNBUFFERED"] = "1"  # its output comes as it is written
    env[PARENT_ENV] = str(os.getpid())
    return env


def _watch(proc: subprocess.Popen) -> tuple[int, list[str]]:
    """Replay the child's progress into this process's reporter and show its other lines on stderr until
    it exits; returns its exit code and the last lines of its output."""
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True, name=f"child-{proc.pid}").start()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    replay = progress.Replay()
    exited, eof = None, False
    try:
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if proc.poll() is None:
                    continue
                exited = exited or time.monotonic()
                if time.monotonic() - exited > DRAIN_S:
                    break
                continue
            if line is None:
                eof = True
                break
            if line.endswith("\r"):  # a progress bar redrawn in place (tqdm): only its last state is shown
                continue
            text = replay.feed(line.rstrip("\r\n"))
            if text.strip():
                tail.append(text[:TAIL_LINE_CHARS])
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
        code = proc.wait()
    finally:
        replay.close()
    if eof:
        proc.stdout.close()
    else:  # processes the child started still hold its output open: they go with it (the reader ends then)
        _signal_group(proc, signal.SIGKILL)
    return code, list(tail)


def _pump(stream, lines: queue.Queue) -> None:
    """The child's output line by line; a line ends at "\n", "\r\n" or "\r", and keeps its ending."""
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")
    try:
        for line in iter(text.readline, ""):
            lines.put(line)
    except (OSError, ValueError):  # closed under us
        pass
    finally:
        lines.put(None)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """The child leads its own process group (start_new_session): signal it and what it started."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the child (torchrun passes it to its ranks), SIGKILL it after a grace period."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(OSError):  # what it started, if anything is left
        os.killpg(proc.pid, signal.SIGKILL)


class _Terminated(BaseException):
    pass


@contextlib.contextmanager
def _sigterm_raises(what: str) -> Iterator[None]:
    """While the flow waits for a child (in the main thread), SIGTERM raises, so that the child is stopped
    first; then the signal goes on to the handler the flow had (by default: the flow dies of it).
    SIGINT needs nothing: it raises KeyboardInterrupt already."""
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if previous is None or previous == signal.SIG_IGN:
        yield
        return

    def terminated(signum, frame):
        raise _Terminated

    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        if callable(previous):
            previous(signal.SIGTERM, None)
        else:
            signal.raise_signal(signal.SIGTERM)
        raise StageProcessFailed(f"{what} was stopped: the flow got SIGTERM") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _dies_with(parent: int) -> Callable[[], None]:
    """Run in the child between fork and exec: SIGKILL it when the flow's thread that started it dies
    (and exit now if that already happened). Only a resolved C call: nothing that could take a lock."""
    prctl = _prctl()
    kill = int(signal.SIGKILL)

    def at_start() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, kill, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return at_start


# ---- the child -------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """A torchrun rank dies with its torchrun (which dies with the flow), and exits at once if the flow is
    gone already. (A process child got this between fork and exec already; setting it again is harmless.)"""
    prctl = _prctl()
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    flow = os.environ.get(PARENT_ENV)
    if flow:
        try:
            os.kill(int(flow), 0)
        except ProcessLookupError:
            os._exit(1)
        except (PermissionError, ValueError):
            pass


def stage_run(spec: dict[str, Any]) -> StageRun:
    """The StageRun a spec describes, as the flow's process built it."""
    cfg = ExperimentConfig.model_validate(spec["config"])
    stage = PIPELINE[spec["stage"]]
    if CODE_VERSIONS[stage.name] != spec["code_version"]:
        raise RuntimeError(
            f"the code of stage {stage.name} changed since the flow started (code version {spec['code_version']} "
            f"there, {CODE_VERSIONS[stage.name]} here): its key would not name what runs; restart the flow "
            "(finished stages are skipped)"
        )
    inputs = {role: StageRef(**ref) for role, ref in spec["inputs"].items()}
    return StageRun(stage, Settings(cfg, stage), cfg.store, cfg.name, spec["round"], spec["key"], spec["where"], inputs)


def _init_process_group() -> None:
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" is the rank's device from here on
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


class StoredOutputMissing(RuntimeError):
    """`--from-stage` reuses a stage's output as stored, and there is none."""


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a user can cause (wrong data, model, a damaged store) whose message names the fix: shown as
    one line, without a traceback, by a child and by `asymre run`."""
    from stages.models import PolicyLoadError
    from stages.prompts import PromptDataError
    from storage.checkpoints import CheckpointDamaged
    from storage.checks import CheckFailed
    from storage.tables import DataFileMissing, SchemaError, TableDamaged

    return (
        PromptDataError, PolicyLoadError, StoredOutputMissing, CheckFailed, StageProcessFailed, CheckpointDamaged,
        DataFileMissing, TableDamaged, SchemaError,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.launch SPEC`: run one stage as the spec says (alone, or as one torchrun rank)."""
    _die_with_parent()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m flows.launch SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    distributed = "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
    if distributed:
        _init_process_group()
    rank = int(os.environ.get("RANK", "0"))
    progress.use(progress.LineReporter() if rank == 0 else progress.Reporter())
    try:
        run = stage_run(spec)
        rows = run.stage.run(run)
        if rank == 0:
            reads = sorted(run.settings.reads)
            _write_json(Path(spec["result"]), {"rows": rows, "versions": run.versions, "reads": reads})
    except user_errors() as err:  # its message names the fix: no traceback (the parent shows the output's end)
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's finalization: the stage's result file and commits are durable by now, and
    # a thread of a native library (pyarrow's pools, gloo) still running while CPython tears down aborted a
    # torchrun rank with "terminate called without an active exception" after its work was done (about 1 run
    # in 3 of bench/gpu.py --dry-run's torchrun round on a loaded 2-core machine).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
