"""What a user watches while rounds run: a bar per stage and a line per round (rich), or nothing. A stage
run in a child process reports as marked lines on its stdout (`LineReporter`), which the flow's process
replays into its own reporter (`Replay`): the user sees the same bars either way."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    """Silent reporter (tests, scheduled runs); `RichReporter` draws."""

    @contextmanager
    def stage(self, label: str, total: int | None = None):
        yield lambda done, total=None, info="": None

    @contextmanager
    def running(self, label: str):
        """Around one stage's run. A stage that opens no bar of its own (the quick CPU stages: advantages,
        curation) still gets one line when it ends, with the rows it reports through the yielded function."""
        yield lambda rows: None

    def skipped(self, label: str, reason: str) -> None: ...

    def line(self, text: str) -> None: ...


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        if not self.console.is_terminal:
            self.console.width = 160  # logs: keep a round's line on one line
        self.bars = 0  # stage bars opened so far (a child's replayed ones too): how `running` tells

    @contextmanager
    def running(self, label: str):
        bars, started, rows = self.bars, time.perf_counter(), []
        yield rows.append
        if self.bars == bars:
            width = 22 if self.console.is_terminal else 28  # as the stage lines around it
            done = f"{rows[-1]} rows" if rows else "done"
            self.console.print(f"  {label:<{width}} {done}  {time.perf_counter() - started:.1f}s", highlight=False)

    @contextmanager
    def stage(self, label: str, total: int | None = None):
        self.bars += 1
        if not self.console.is_terminal:  # logs and CI: one plain line per finished stage
            state = {"done": 0, "total": total, "info": ""}
            started = time.perf_counter()

            def note(done: int, total: int | None = None, info: str = "") -> None:
                state.update(done=done, total=total or state["total"], info=info or state["info"])

            yield note
            took = time.perf_counter() - started
            self.console.print(f"  {label:<28} {state['done']}/{state['total'] or '?'}  {took:6.1f}s  {state['info']}")
            return
        columns = [
            TextColumn(f"  {label:<22}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(label, total=total, info="")

            def update(done: int, total: int | None = None, info: str = "") -> None:
                bar.update(task, completed=done, total=total, info=info)

            yield update

    def skipped(self, label: str, reason: str) -> None:
        self.console.print(f"  [dim]{label:<22} skipped: {reason}[/dim]")

    def line(self, text: str) -> None:
        self.console.print(text)


def duration(seconds: float) -> str:
    """At most 4 characters, for lines that must stay narrow: 9.9s, 412s, 17m, 2.5h, 30h."""
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    if seconds < 999.5:
        return f"{seconds:.0f}s"
    if seconds < 99.5 * 60:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h" if seconds < 9.95 * 3600 else f"{seconds / 3600:.0f}h"


# The prefix of a progress line a child writes (printable: str.splitlines would split at control characters).
MARK = "::asymre-progress:: "


class LineReporter(Reporter):
    """A child process's reporter: every event one marked JSON line on `stream` (stdout), flushed at once;
    updates at most every `min_interval_s` (the last one of a stage is always sent)."""

    def __init__(self, stream: TextIO | None = None, min_interval_s: float = 0.1):
        self.stream = stream or sys.stdout
        self.min_interval_s = min_interval_s
        self._stages = 0

    def _emit(self, **event) -> None:
        self.stream.write(MARK + json.dumps(event) + "\n")
        self.stream.flush()

    @contextmanager
    def stage(self, label: str, total: int | None = None):
        self._stages += 1
        sid, pending, last = self._stages, None, 0.0
        self._emit(event="start", id=sid, label=label, total=total)

        def update(done: int, total: int | None = None, info: str = "") -> None:
            nonlocal pending, last
            pending = {"event": "update", "id": sid, "done": done, "total": total, "info": info}
            now = time.monotonic()
            if now - last >= self.min_interval_s:
                self._emit(**pending)
                pending, last = None, now

        try:
            yield update
        finally:
            if pending is not None:
                self._emit(**pending)
            self._emit(event="end", id=sid)

    def skipped(self, label: str, reason: str) -> None:
        self._emit(event="skipped", label=label, reason=reason)

    def line(self, text: str) -> None:
        self._emit(event="line", text=text)


class Replay:
    """Replays a child's progress lines into a reporter (default: this process's REPORTER): a stage in a
    child draws the same bars as one run inline. `close` ends the bars a child left open (it died)."""

    def __init__(self, reporter: Reporter | None = None):
        self.reporter = reporter or REPORTER
        self._open: dict[int, tuple] = {}  # child's stage id → (context manager, its update function)

    def feed(self, line: str) -> str:
        """Replay the event a line holds; returns the rest of the line (its text before the mark, or all
        of it when it holds no event), which the caller shows as the child's output."""
        at = line.find(MARK)
        if at < 0:
            return line
        try:
            event = json.loads(line[at + len(MARK) :])
            self._replay(event)
        except (ValueError, KeyError, TypeError):
            return line
        return line[:at]

    def _replay(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            manager = self.reporter.stage(event["label"], event["total"])
            self._open[event["id"]] = (manager, manager.__enter__())
        elif kind == "update" and event["id"] in self._open:
            self._open[event["id"]][1](event["done"], event["total"], event["info"])
        elif kind == "end" and event["id"] in self._open:
            self._open.pop(event["id"])[0].__exit__(None, None, None)
        elif kind == "skipped":
            self.reporter.skipped(event["label"], event["reason"])
        elif kind == "line":
            self.reporter.line(event["text"])

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1][0].__exit__(None, None, None)


REPORTER: Reporter = Reporter()


def use(reporter: Reporter) -> None:
    global REPORTER
    REPORTER = reporter
