"""A store on S3, against moto's S3 server on 127.0.0.1: a whole experiment gives the tables and checkpoint hashes of
a local store, a run killed while it uploads a checkpoint resumes to the same result, four processes writing four
experiments at once lose no commit, and `asymre sql/tables/history/status/check` work on it with no credential in
their output, in views.sql or in stage_runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pyarrow.fs as pa_fs
import pytest

from storage import checkpoints, lineage, object_store, tables
from tests.frames import COMPARED, TINY, comparable

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
_ENTRY = shutil.which("asymre", path=str(Path(sys.executable).parent)) or shutil.which("asymre")
ASYMRE = [_ENTRY] if _ENTRY else [sys.executable, "-m", "flows.cli"]
KEY_ID, SECRET = "asymre-test-key-id-3f9c", "asymre-test-secret-7d2e41b0"  # found nowhere the store writes
BUCKET = "asymre-test"
# A smaller tiny experiment: 8 prompts × 4 samples a round, 12 test prompts, a 10-step warm start.
SMALL = [a for a in TINY if a.split("=")[0] not in ("prompts.per_round", "prompts.n_test")] + [
    "prompts.per_round=8", "prompts.n_test=12", "model.warm_start_steps=10", "name=tiny",
]  # fmt: skip

# moto's server answers each request in a thread of its own and checks If-None-Match before it stores the object,
# with no lock between the two: two conditional PUTs of one key that arrive together can both succeed (seen here
# with moto 5.2.5: two writers both got 200 for the same _delta_log entry). S3 itself is atomic there, so the
# server used by the tests answers one request at a time (through one lock), as S3's conditional put behaves.
SERVER = textwrap.dedent(
    """
    import sys, threading
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    app, lock = DomainDispatcherApplication(create_backend_app), threading.Lock()

    def one_at_a_time(environ, start_response):
        with lock:
            return list(app(environ, start_response))

    run_simple(sys.argv[1], int(sys.argv[2]), one_at_a_time, threaded=True)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on a free port of 127.0.0.1, stopped at the end of the session."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"  # a file: a pipe nobody reads would stall the server
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, "127.0.0.1", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto's server did not start within 60 s"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def s3(s3_endpoint, tmp_path_factory):
    """The AWS variables pointing at the server, a bucket, and this machine's cache in a temporary folder."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        env.setenv("AWS_REGION", "us-east-1")
        env.setenv("AWS_ALLOW_HTTP", "true")
        env.setenv(object_store.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        env.delenv("ASYMRE_STORE", raising=False)
        fs = pa_fs.S3FileSystem(
            access_key=KEY_ID, secret_key=SECRET, endpoint_override=s3_endpoint, region="us-east-1",
            allow_bucket_creation=True,
        )  # fmt: skip
        fs.create_dir(BUCKET)
        yield f"s3://{BUCKET}"


def tiny(store: str, *extra: str):
    from flows.config import load_config

    return load_config(None, [*SMALL, f"store={store}", *extra])


# `asymre run` that dies by SIGKILL in the middle of uploading checkpoint 2 (round 1's training): two of its
# files are in the store, the rest are not, and nothing registers it.
KILLED_IN_UPLOAD = textwrap.dedent(
    """
    import os, signal, sys
    import pyarrow.fs as pa_fs
    from storage import object_store

    upload = object_store.upload_folder

    def dying(folder, uri):
        if uri.endswith("round=2"):
            for name in sorted(p.name for p in folder.iterdir())[:2]:
                pa_fs.copy_files(str(folder / name), object_store.path_of(uri) + "/" + name,
                                 destination_filesystem=object_store.filesystem())
            os.kill(os.getpid(), signal.SIGKILL)
        return upload(folder, uri)

    object_store.upload_folder = dying
    from flows.cli import main
    sys.argv = ["asymre", *sys.argv[1:]]
    main()
    """
)


def child_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "COLUMNS": "200"}
    if PREFECT_API_URL.value():  # the test harness's server (a flow in a child then starts none of its own)
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")] if p)
    return env


@pytest.fixture(scope="module")
def on_s3(s3, tmp_path_factory, prefect_harness):
    """The same two-round experiment on a local store (run in this process) and on S3, where `asymre run` is
    killed by SIGKILL while it uploads checkpoint 2 and then run again to the end. Returns (s3 store, local
    store, what the store held after the kill)."""
    from flows.iterate import experiment_flow

    local = str(tmp_path_factory.mktemp("local") / "store")
    experiment_flow(tiny(local))
    store = f"{s3}/runs/a"
    for warm_start in (Path(local) / "cache").glob("builtin-tiny-*"):  # same key, same folder: not computed twice
        shutil.copytree(warm_start, checkpoints.cache_dir(store) / warm_start.name)
    args = ["run", "--store", store, *[x for a in SMALL for x in ("--set", a)]]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_IN_UPLOAD, *args], env=child_env(), cwd=REPO, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    after_kill = {
        "uploaded": sorted(object_store.listing(f"{store}/checkpoints/tiny/round=2")),
        "registered": tables.read(store, "checkpoints")["round"].sort().to_list(),
        "runs": lineage.runs(store, "tiny"),
    }
    experiment_flow(tiny(store))
    return store, local, after_kill


def test_an_experiment_on_s3_gives_the_tables_and_checkpoints_of_a_local_store(on_s3):
    store, local, _ = on_s3
    for table in COMPARED:
        assert comparable(store, table).equals(comparable(local, table)), table
    registry = tables.read(store, "checkpoints").sort("round")
    assert registry["round"].to_list() == [0, 1, 2]
    assert registry["path"].to_list() == [f"checkpoints/tiny/round={k}" for k in range(3)]  # relative to the store
    for row in registry.iter_rows(named=True):
        folder = f"{store}/{row['path']}"
        local_folder = Path(local) / row["path"]
        assert set(object_store.listing(folder)) == {p.name for p in local_folder.iterdir()}, folder
        copy = checkpoints.checked(store, "tiny", row["round"])["path"]  # what a stage loads: a local copy
        assert Path(copy) == checkpoints.cached_copy(row["sha256"])
        assert checkpoints.folder_sha256(copy) == row["sha256"] == checkpoints.folder_sha256(local_folder)
    staged = object_store.local_root(store) / "checkpoints"
    assert not any(p.is_file() for p in staged.rglob("*"))  # every folder written here was moved into the cache
    views = object_store.get_bytes(f"{store}/views.sql").decode()
    assert "INSTALL httpfs" in views and f"'{store}/tables/rollouts/" in views
    assert SECRET not in views and KEY_ID not in views


def test_a_run_killed_while_uploading_a_checkpoint_resumes_to_the_same_result(on_s3):
    store, _, after_kill = on_s3
    assert len(after_kill["uploaded"]) == 2  # half of checkpoint 2 was in the store ...
    assert after_kill["registered"] == [0, 1]  # ... and not registered
    done = after_kill["runs"].filter(pl.col("status") == "done")
    assert done.filter((pl.col("stage") == "train") & (pl.col("round") == 1)).is_empty()
    rerun = lineage.runs(store, "tiny").filter(pl.col("created_at") > after_kill["runs"]["created_at"].max())
    status = {(r["round"], r["stage"]): r["status"] for r in rerun.iter_rows(named=True)}
    for stage in ("rollouts", "rewards", "advantages", "curation"):
        assert status[(1, stage)] == "skipped", stage
    assert status[(1, "train")] == status[(2, "eval")] == "done"
    row = checkpoints.registered(store, "tiny", 2)
    assert len(object_store.listing(row["path"])) > 2  # uploaded whole by the rerun (equal to local: test above)


def test_registration_follows_the_upload_and_a_damaged_object_is_caught(s3, tmp_path):
    store = f"{s3}/runs/registry"
    folder = checkpoints.checkpoint_dir(store, "a", 1)
    assert object_store.local_root(store) in folder.parents  # written on this machine, then uploaded
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    version = checkpoints.register(
        store, experiment="a", round=1, path=folder, parent_version=None, loss=None, stage_key="k"
    )
    row = checkpoints.registered(store, "a", 1)
    assert row["path"] == f"{store}/checkpoints/a/round=1" and version.endswith(row["sha256"][:12])
    assert set(object_store.listing(row["path"])) == {"config.json", "model.safetensors"}

    object_store.put_bytes(f"{row['path']}/model.safetensors", b"\1" * 64)  # changed in the store
    shutil.rmtree(checkpoints.cached_copy(row["sha256"]))  # another machine: nothing cached
    with pytest.raises(checkpoints.CheckpointDamaged, match=r"content hash differs.*--from-stage train --round 0"):
        checkpoints.lookup(store, "a", 1)
    assert not checkpoints.cached_copy(row["sha256"]).exists()  # a bad download is not kept
    from storage.doctor import check_store

    problems = [str(p) for p in check_store(store, {}).problems]
    assert any("checkpoint a round=1" in p and "content hash differs" in p for p in problems), problems


# One process writing one experiment's two rounds as a flow does (each stage's table partition, its stage_runs row,
# the checkpoint it trains, uploaded and registered), released together with the others by the file `go`.
WRITER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import frames
    from storage import checkpoints, lineage, tables

    store, experiment, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    made = {"rollouts": frames.rollouts_frame, "rewards": frames.rewards_frame, "evals": frames.evals_frame}
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.002)
    versions = {}
    for k in range(2):
        where = {"experiment": experiment, "round": k}
        for table, make in made.items():
            frame = make(experiment, k, n)
            v = versions[f"{table} {k}"] = tables.write_partition(store, table, frame, partition=where, stage_key=table)
            lineage.record_run(store, experiment=experiment, round=k, stage=table, key=table, config={}, code_version="1",
                               rows=frame.height, wall_s=0.0, status="done", output_version=v)
        folder = checkpoints.checkpoint_dir(store, experiment, k + 1)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(where))
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * (n + k))
        checkpoints.register(store, experiment=experiment, round=k + 1, path=folder, parent_version=None, loss=None,
                             stage_key="train")
    print(json.dumps(versions), flush=True)
    """
)


def test_four_processes_write_four_experiments_to_one_store_and_lose_no_commit(s3, tmp_path):
    store, go = f"{s3}/runs/four", tmp_path / "go"
    sizes = {f"e{i}": i + 2 for i in range(4)}  # n_prompts (evals: test prompts) of each experiment
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    argv = [[sys.executable, "-c", WRITER, store, name, str(n), str(go)] for name, n in sizes.items()]
    procs = [subprocess.Popen(args, env=child_env(), cwd=REPO, **pipes) for args in argv]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.communicate()[1][-3000:]
        go.touch()
        outputs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    returned = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    rows_per_prompt = {"rollouts": 3, "rewards": 3, "evals": 1}  # G = 3
    for table, per_prompt in rows_per_prompt.items():
        counts = {(e, r): n for e, r, n in tables.read(store, table).group_by("experiment", "round").len().iter_rows()}
        assert counts == {(e, k): per_prompt * n for e, n in sizes.items() for k in range(2)}, table
        # eight commits, none lost, and each write returned the version its own commit landed as
        commits = {c["version"]: json.loads(c["asymre.partition"]) for c in tables.history(store, table)}
        assert sorted(commits) == list(range(8)), table
        for (name, _), versions in zip(sizes.items(), returned):
            for k in range(2):
                assert commits[versions[f"{table} {k}"]] == {"experiment": name, "round": k}, table
    registry = tables.read(store, "checkpoints")
    assert sorted(registry.select("experiment", "round").iter_rows()) == [(e, k) for e in sizes for k in (1, 2)]
    for row in registry.iter_rows(named=True):
        assert (
            checkpoints.folder_sha256(checkpoints.checked(store, row["experiment"], row["round"])["path"])
            == row["sha256"]
        )
    runs = lineage.runs(store)
    assert runs.height == 4 * 2 * len(rows_per_prompt)  # every stage_runs row of every process
    assert runs.select("experiment", "round", "stage").n_unique() == runs.height


def cli(*args: str) -> str:
    """`asymre ARGS` in this process (the installed entry point's app); its output, which holds no credential."""
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, list(args))
    output = result.output
    assert result.exit_code == 0, output
    assert SECRET not in output and KEY_ID not in output
    return output


def test_sql_tables_history_status_and_check_on_s3_show_no_credentials(on_s3):
    store, _, _ = on_s3
    # the entry point as a user runs it, in a process of its own
    query = "select round, count(*) as n from rollouts group by round order by round"
    rounds = subprocess.run([*ASYMRE, "sql", query, "--format", "csv", "--store", store], env=child_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rounds.returncode == 0 and rounds.stdout.split() == ["round,n", "0,32", "1,32"], rounds.stderr
    assert SECRET not in rounds.stdout + rounds.stderr and KEY_ID not in rounds.stdout + rounds.stderr
    pinned = cli(
        "sql", "--as-of", "rollouts=0", "select count(*) as n from rollouts", "--format", "csv", "--store", store
    )
    assert pinned.split() == ["n", "32"]  # version 0 holds round 0 only
    line = next(x for x in cli("tables", "--store", store).splitlines() if x.startswith("rollouts "))
    assert line.split()[1:] == ["1", "2", "64", "2"]  # version, versions, rows, partitions
    history = cli("history", "rollouts", "--store", store).splitlines()
    assert len(history) == 3 and '"round": 1' in history[1] and '"round": 0' in history[2]
    status = cli("status", "tiny", "--store", store)
    assert "experiment tiny" in status and "FAILED" not in status
    assert "no problems" in cli("check", "--store", store)
    stage_runs = tables.read(store, "stage_runs")
    text = stage_runs.select(pl.all().cast(pl.String)).write_csv()
    assert SECRET not in text and KEY_ID not in text and stage_runs.height > 0
    for table in tables.existing_tables(store):
        for commit in tables.history(store, table):
            assert SECRET not in str(commit) and KEY_ID not in str(commit), table


def test_a_store_that_cannot_be_written_is_one_line_naming_the_fix(s3, monkeypatch):
    from flows.preflight import PreflightError, check_store

    with pytest.raises(PreflightError, match="bucket no-such-bucket does not exist"):
        check_store("s3://no-such-bucket/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(PreflightError, match=r"cannot write to the S3 server at .*check AWS_ENDPOINT_URL") as err:
        check_store(f"{s3}/x")
    assert SECRET not in str(err.value) and "\n" not in str(err.value)
    monkeypatch.delenv("AWS_ALLOW_HTTP")
    with pytest.raises(PreflightError, match="set AWS_ALLOW_HTTP=true"):
        check_store(f"{s3}/x")
