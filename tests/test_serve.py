"""Scheduled rounds against a real Prefect server started on loopback: `asymre serve --interval` runs a
round of a tiny experiment, which lands in the tables, prints one line for it, skips the runs that fell
due meanwhile, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest
from frames import TINY

from storage import tables

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for p in procs:
            if p.poll() is not None:
                said = p.stderr.read()[-3000:] if p.stderr else ""
                raise AssertionError(f"{what}: a process exited early ({p.args[:3]}): {said}")
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
    except OSError:
        return False


def flow_runs(url: str) -> list[dict]:
    request = urllib.request.Request(
        f"{url}/flow_runs/filter",
        data=json.dumps({"limit": 200}).encode(),
        headers={"content-type": "application/json"},
    )
    return json.load(urllib.request.urlopen(request, timeout=10))


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def server_env(tmp_path, url: str, **extra: str) -> dict[str, str]:
    """The environment of a real Prefect server on loopback and of the commands that talk to it."""
    return {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        **extra,
    }


def start_server(port: int, env: dict[str, str], log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_interval_schedule_runs_a_round(tmp_path):
    """`asymre serve --interval 5` with rounds far slower than 5 s: one line per finished round and no
    Prefect INFO stream, the runs that fell due meanwhile skipped (none left waiting in SCHEDULED), and
    SIGTERM ends it with one line, no traceback, exit code 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = server_env(tmp_path, url)
    with (tmp_path / "server.log").open("w") as log:  # a file: its errors under load would fill a pipe
        server = start_server(port, env, log)
    store = tmp_path / "store"
    sets = [a for s in [*TINY, "name=sched", "rounds=1"] for a in ("--set", s)]
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    serve = None
    try:
        wait_for(lambda: healthy(url), 180, "the Prefect server", [server])
        with out.open("w") as stdout, err.open("w") as stderr:  # files: a pipe nobody reads would fill up
            serve = subprocess.Popen(
                ["asymre", "serve", "--interval", "5", *sets, "--store", str(store)],
                env={k: v for k, v in env.items() if k != "PREFECT_LOGGING_LEVEL"},  # the command's own default
                stdout=stdout, stderr=stderr, text=True,
            )  # fmt: skip
        wait_for(lambda: "skipped (cancelled), not queued" in out.read_text(), 120, "the serving banner", [server])

        def round_line() -> re.Match | None:
            return ROUND_LINE.search(out.read_text())

        try:
            wait_for(round_line, 420, "a scheduled round's line", [server, serve])
        except AssertionError as failed:
            raise AssertionError(f"{failed}\nserve's output:\n{out.read_text()}\n{err.read_text()[-3000:]}") from None
        line = round_line()
        ended = datetime.strptime(line["at"], "%Y-%m-%d %H:%M:%S").astimezone(timezone.utc)
        runs = flow_runs(url)
        waiting = [
            r["name"]
            for r in runs
            if r["state_type"] == "SCHEDULED" and when(r["expected_start_time"]) < ended - timedelta(seconds=2)
        ]
        assert not waiting, f"runs due before round 0 ended still wait: {waiting}"
        assert any(r["state_type"] == "CANCELLED" for r in runs), "a run fell due during the round: skipped"
        deployment = json.load(urllib.request.urlopen(f"{url}/deployments/name/asymre-next-round/sched", timeout=10))
        assert deployment["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
        assert deployment["global_concurrency_limit"]["limit"] == 1

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=120) in (0, 143)
    finally:
        for proc in (serve, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    said, logged = out.read_text(), err.read_text()
    assert said.rstrip().splitlines()[-1].startswith("stopped by SIGTERM"), said
    for noise in ("Traceback", "| INFO", "| ERROR"):
        assert noise not in said + logged, f"{noise!r} in:\n{said}\n{logged}"
    assert line["round"] == "0" and 0.0 <= float(line["reward"]) <= 1.0
    rollouts = tables.read(str(store), "rollouts", experiment="sched", round=0)
    assert rollouts.height == 16 * 4
    assert tables.read(str(store), "checkpoints", experiment="sched", round=1).height == 1


# what `serve` prints when a round ends: time, experiment, the round's one line (flows/iterate.format_summary)
ROUND_LINE = re.compile(
    r"^(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)  sched  round (?P<round>\d+): train reward +(?P<reward>[-\d.]+)  "
    r"test greedy +[\d.]+ T=1",
    re.MULTILINE,
)
