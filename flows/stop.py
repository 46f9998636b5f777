"""Ctrl-C and SIGTERM for `asymre run`: the flow runs in a worker thread and the main thread only waits, so a
signal is handled at once (not after the stage's C++ work or Prefect's unwinding, which calls a server the same
signal may have stopped). The process then leaves as a SIGKILL would: the store is built to survive that
anywhere (finished stages kept, the interrupted one re-run on resume)."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

RUNNING: dict[int, tuple[str, float]] = {}  # thread id → (label of the stage it runs, start time)
FAILED: list[str] = []  # label of the stage that raised last (what a failure message names)
GRACE_S = 3.0  # how long children get to exit on SIGTERM before SIGKILL


def running(label: str):
    """Context manager marking `label` (e.g. "round 3: train") as the stage this thread runs."""
    return _Running(label)


class _Running:
    def __init__(self, label: str):
        self.label = label

    def __enter__(self) -> None:
        RUNNING[threading.get_ident()] = (self.label, time.monotonic())

    def __exit__(self, kind, value, tb) -> None:
        RUNNING.pop(threading.get_ident(), None)
        if kind is not None:
            FAILED[:] = [self.label]


def where() -> str:
    if not RUNNING:
        return "between stages"
    label, since = next(iter(RUNNING.values()))
    return f"in {label} (after {time.monotonic() - since:.0f} s of it)"


def run_stoppable(fn: Callable[[], T], resume: str) -> T:
    """fn() in a worker thread; SIGINT/SIGTERM stop the process with one line that says where and how to
    resume (`resume`: the command). Returns fn's result or raises its exception."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as err:  # handed to the main thread, which raises it
            outcome["error"] = err

    def stop(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        sys.stderr.write(
            f"\nstopped by {name} {where()}; the store is as a kill leaves it (finished stages kept, the "
            f"interrupted one re-runs).\nresume with: {resume}\n"
        )
        sys.stderr.flush()
        _end_children()
        os._exit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    worker = threading.Thread(target=target, name="asymre-flow", daemon=True)
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.2)  # short waits: the handler runs between them
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def resume_command() -> str:
    return "asymre " + shlex.join(sys.argv[1:])


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (all its threads'), from /proc."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return found


def _end_children() -> None:
    """SIGTERM this process's children and their process groups (stage children lead their own; the Prefect
    server and worker pools are plain children), SIGKILL what is left after GRACE_S."""
    kids = _children(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in kids:
            _signal(pid, sig)
        deadline = time.monotonic() + (GRACE_S if sig == signal.SIGTERM else 0)
        while time.monotonic() < deadline and any(_alive(p) for p in kids):
            time.sleep(0.05)
        kids = [p for p in kids if _alive(p)]
        if not kids:
            return


def _signal(pid: int, sig: int) -> None:
    """Signal `pid`, and its process group when it leads one (what a stage child started goes too)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited (we never reap it: we exit next)
