"""Rounds run by a Prefect worker, against a real `prefect server start` on loopback: `asymre serve --work-pool`
registers the deployment on a process pool it creates, a `prefect worker start` process runs two runs of one
experiment triggered at once, and they take turns (the experiment's concurrency limit): rounds 0 and 1, each
computed once, the second after the first."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import urllib.request

import polars as pl
import pytest
from frames import TINY
from test_serve import free_port, healthy, server_env, start_server, wait_for, when

from storage import lineage

pytestmark = pytest.mark.slow

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# TINY, smaller still (later --set values win): two rounds run one after the other within the test's time
SMALL = [
    *TINY,
    "prompts.n_train=100",
    "prompts.n_test=8",
    "prompts.per_round=8",
    "rollout.samples_per_prompt=2",
    "model.warm_start_steps=4",
    "model.warm_start_batch_size=16",
    "train.batch_size=16",
    "name=wk",
]


def api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{url}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    return json.load(urllib.request.urlopen(request, timeout=10))


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_two_triggered_runs_take_turns_on_a_worker(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    # the waiting run retries its slot at least every 2 s (Prefect's default: up to 30 s), and the worker
    # polls every 2 s (default 10): the test's waits, not the mechanism
    env = server_env(
        tmp_path,
        url,
        PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS="2",
        PREFECT_WORKER_QUERY_SECONDS="2",
    )
    store = tmp_path / "store"
    sets = [a for s in SMALL for a in ("--set", s)]
    worker_out = tmp_path / "worker.out"
    worker = None
    with (tmp_path / "server.log").open("w") as log:  # a file: its errors under load would fill a pipe
        server = start_server(port, env, log)
    try:
        wait_for(lambda: healthy(url), 180, "the Prefect server", [server])
        registered = subprocess.run(
            ["asymre", "serve", "--work-pool", "gpus", *sets, "--store", str(store)],
            env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert registered.returncode == 0, registered.stderr[-3000:]
        said = registered.stdout
        assert "created process work pool 'gpus'" in said and "prefect worker start --pool gpus" in said, said
        assert "prefect deployment run 'asymre-next-round/wk'" in said, said

        pool = api(url, "/work_pools/gpus")
        assert pool["type"] == "process"
        deployment = api(url, "/deployments/name/asymre-next-round/wk")
        assert deployment["work_pool_name"] == "gpus"
        assert deployment["entrypoint"] == "flows.serve.next_round"  # imported from the installed package
        assert deployment["pull_steps"] == [] and deployment["path"] is None  # no code to fetch
        assert deployment["parameters"] == {"config": None, "sets": SMALL, "store": str(store)}
        experiment_limit = api(url, "/v2/concurrency_limits/asymre-experiment-wk")
        assert experiment_limit["limit"] == 1 and experiment_limit["active"]

        with worker_out.open("w") as out:  # the runs' own output comes through the worker's
            worker = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpus"],
                env=env, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
            )  # fmt: skip
        runs = [api(url, f"/deployments/{deployment['id']}/create_flow_run", {})["id"] for _ in range(2)]

        def states() -> list[str]:
            return [api(url, f"/flow_runs/{run}")["state_type"] for run in runs]

        try:
            wait_for(lambda: TERMINAL.issuperset(states()), 600, "both runs to end", [server, worker])
        except AssertionError as failed:
            raise AssertionError(f"{failed}\nworker's output:\n{worker_out.read_text()[-5000:]}") from None
        ended = states()
        flow_runs = [api(url, f"/flow_runs/{run}") for run in runs]
        machine_limit = api(url, f"/v2/concurrency_limits/asymre-worker-{socket.gethostname()}")
        experiment_limit = api(url, "/v2/concurrency_limits/asymre-experiment-wk")
    finally:
        stop(worker)
        stop(server)
    output = worker_out.read_text()
    assert ended == ["COMPLETED", "COMPLETED"], f"{ended}\n{output[-5000:]}"
    # the worker started both runs at once (each was running before the other ended) ...
    assert max(when(r["start_time"]) for r in flow_runs) < min(when(r["end_time"]) for r in flow_runs)
    assert "wk  round 0: train reward" in output and "wk  round 1: train reward" in output, output[-5000:]
    assert machine_limit["limit"] == 1
    assert machine_limit["active_slots"] == experiment_limit["active_slots"] == 0  # both released

    # ... and yet their rounds took turns: each stage of each round computed once, round 1 after round 0
    assert lineage.completed_rounds(str(store), "wk") == 2
    done = lineage.runs(str(store), "wk").filter(pl.col("status") == "done")
    twice = done.filter(pl.len().over("stage", "round") > 1).select("stage", "round", "created_at", "wall_s")
    assert twice.is_empty(), f"stages computed twice:\n{twice}\n{output[-5000:]}"
    spans = done.with_columns(started=pl.col("created_at") - pl.duration(seconds=pl.col("wall_s")))
    first_round_ended = spans.filter((pl.col("round") == 0) | (pl.col("stage") == "eval") & (pl.col("round") == 1))
    second_round = spans.filter((pl.col("round") == 1) & (pl.col("stage") != "eval") | (pl.col("round") == 2))
    assert second_round.height == 6  # rollouts, rewards, advantages, curation, train; eval of checkpoint 2
    assert second_round["started"].min() >= first_round_ended["created_at"].max(), "round 1 overlapped round 0"


def test_a_scheduled_run_skips_while_its_experiment_runs_and_takes_both_slots_otherwise(prefect_harness, monkeypatch):
    """take_turn under the test server: a run started by its schedule while the experiment's slot is held elsewhere
    ends Cancelled without holding anything; once the slot is free a run holds the experiment's and this
    machine's slots, and gives both back when it ends."""
    from prefect.concurrency.sync import concurrency

    from flows import serve

    monkeypatch.setattr(serve, "_started_by_schedule", lambda: True)
    experiment, machine = serve.experiment_limit("busy"), serve.machine_limit()
    serve._limit(experiment)
    with concurrency(experiment, strict=True):  # a round of "busy" runs elsewhere
        state = serve.next_round(sets=["name=busy"], store="/nonexistent", return_state=True)
        assert state.is_cancelled() and "skipped" in state.message
        assert serve._limit(machine).active_slots == 0
    with contextlib.ExitStack() as held:
        assert serve.take_turn(held, "busy")
        assert serve._limit(experiment).active_slots == serve._limit(machine).active_slots == 1
    assert serve._limit(experiment).active_slots == serve._limit(machine).active_slots == 0


def test_a_triggered_run_waits_for_the_machine_and_says_so(prefect_harness, monkeypatch, capsys):
    """A run triggered by hand while this machine runs another experiment's round says what it waits for and
    waits, holding its experiment's slot; it takes the machine's once that is free, and gives both back."""
    from prefect.concurrency.sync import concurrency

    from flows import serve

    monkeypatch.setattr(serve, "_started_by_schedule", lambda: False)
    experiment, machine = serve.experiment_limit("queued"), serve.machine_limit()
    took, finish, said = [], threading.Event(), []

    def run() -> None:
        with contextlib.ExitStack() as held:
            took.append(serve.take_turn(held, "queued"))
            finish.wait(60)

    def heard(line: str) -> bool:
        said.append(capsys.readouterr().out)
        return line in "".join(said)

    serve._limit(machine)
    waiting = threading.Thread(target=run, daemon=True)
    try:
        with concurrency(machine, strict=True):  # another experiment's round holds the machine
            waiting.start()
            wait_for(lambda: heard("queued  waiting: this machine runs a round (asymre-worker-"), 60, "the line")
            assert not took and serve._limit(experiment).active_slots == 1
        wait_for(lambda: took, 60, "the machine's slot")
        assert took == [True] and serve._limit(machine).active_slots == 1
    finally:
        finish.set()
        waiting.join(timeout=60)
    assert serve._limit(experiment).active_slots == serve._limit(machine).active_slots == 0
