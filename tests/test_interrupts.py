"""Ctrl-C (SIGINT) and SIGTERM stop `asymre run` within seconds in every stage kind, with one line that says
where and how to resume, no traceback, nothing of the stage marked done; resuming gives the tables of an
uninterrupted run."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest

from storage import lineage
from tests.frames import COMPARED, TINY, comparable

pytestmark = pytest.mark.slow

ROUND = [*[a for a in TINY if not a.startswith("rounds=")], "rounds=1", "name=tiny"]
STAGES = ["base", "rollouts", "rewards", "advantages", "curation", "train", "eval"]

# `asymre run` whose stage argv[1] (in its first round) busies the flow's thread in C++ (matrix products) until signalled, after
# touching argv[2]: a stage that is in the middle of heavy work when the signal comes.
HANGING = textwrap.dedent(
    """
    import dataclasses, sys
    from pathlib import Path
    import torch
    from flows import pipeline

    stage, marker = sys.argv[1], Path(sys.argv[2])
    at = 1 if stage == "eval" else 0  # eval 0 (of checkpoint 0) comes with base; eval 1 ends round 0

    def busy(run):
        if run.round == at:
            marker.write_text(run.stage.name)
            a = torch.randn(1500, 1500)
            while True:
                a = torch.tanh(a @ a)
        return original(run)

    original = pipeline.PIPELINE[stage].run
    pipeline.PIPELINE[stage] = dataclasses.replace(pipeline.PIPELINE[stage], run=busy)
    from flows.cli import main
    sys.argv = ["asymre", *sys.argv[3:]]
    main()
    """
)


def _env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(Path.cwd())}
    env.pop("PREFECT_LOGGING_LEVEL", None)  # what a user has: the CLI's own default
    return env


def _stop_in(stage: str, sig: signal.Signals, store: Path, tmp: Path) -> None:
    marker = tmp / f"in-{stage}-{sig.name}"
    args = ["run", "--store", str(store), *[x for a in ROUND for x in ("--set", a)]]
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGING, stage, str(marker), *args],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while not marker.exists():  # no fixed limit: a loaded machine is slow to get there, not wrong
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        time.sleep(0.5)  # well inside the busy loop
        sent = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err[-3000:]
    assert took < 15, f"{sig.name} in {stage} took {took:.1f} s to stop"
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    label = {"base": "base", "eval": "round 1: eval"}.get(stage, f"round 0: {stage}")
    assert f"stopped by {sig.name} in {label}" in err, err[-2000:]
    assert "resume with: asymre run --store" in err, err
    runs = lineage.runs(str(store), "tiny")
    interrupted = runs.filter((pl.col("stage") == stage) & (pl.col("status") == "done"))
    if stage == "eval":  # checkpoint 0's evaluation finished before round 0; checkpoint 1's was stopped
        interrupted = interrupted.filter(pl.col("round") == 1)
    assert interrupted.is_empty(), f"{stage} marked done after {sig.name}"


def test_sigint_and_sigterm_stop_every_stage_and_resume_to_the_uninterrupted_result(tmp_path, prefect_harness):
    from flows.config import load_config
    from flows.iterate import experiment_flow

    reference = tmp_path / "reference"
    experiment_flow(load_config(None, [*ROUND, f"store={reference}"]))

    def chain(sig: signal.Signals) -> Path:
        store = tmp_path / sig.name
        for stage in STAGES:  # each run resumes the last one and is stopped in the next stage
            _stop_in(stage, sig, store, tmp_path)
        experiment_flow(load_config(None, [*ROUND, f"store={store}"]))  # the resume that finishes
        return store

    with ThreadPoolExecutor(2) as pool:
        stores = list(pool.map(chain, [signal.SIGINT, signal.SIGTERM]))
    for store in stores:
        for table in COMPARED:
            assert comparable(store, table).equals(comparable(reference, table)), (store.name, table)


def test_stop_names_where_and_leaves_no_children(tmp_path):
    """The handler itself, in a process of its own: children (here a sleeping one, as a stage child or the
    Prefect server would be) are ended with it."""
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        from flows import stop

        def work():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            print(child.pid, flush=True)
            with stop.running("round 2: rollouts"):
                time.sleep(600)

        stop.run_stoppable(work, "asymre run again")
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )  # fmt: skip
    child = int(proc.stdout.readline())
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM in round 2: rollouts (after" in err and "resume with: asymre run again" in err
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child), "the child outlived the stopped run"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_run_stoppable_returns_and_raises_what_the_work_does():
    from flows import stop

    assert stop.run_stoppable(lambda: 41 + 1, "x") == 42
    with pytest.raises(ZeroDivisionError):
        stop.run_stoppable(lambda: 1 / 0, "x")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back
