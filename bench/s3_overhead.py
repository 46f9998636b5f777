"""The store on S3: what one round of the default costs in bookkeeping (reads, commits, lineage, checks, views.sql,
checkpoint upload and download) on an s3:// store against a local store, per stage and per call.

    python bench/s3_overhead.py [--quick] [--reps 2]

Each repetition runs the default experiment's start (prompts, checkpoint 0, its evaluation) and round 0 in this
process on a fresh local store (A) and on a fresh prefix of an S3 bucket (B), alternating A B A B, with every stage
function and every storage call wrapped in a timer (exclusive time: a commit inside record_run counts as a commit).
Bookkeeping is a stage's wall time (materialize and its views.sql rewrite) minus its compute (the stage functions
of stages/ and the model loads and saves, which are the same on both stores). The S3 server is moto's, started here
on 127.0.0.1 (its requests one at a time, as in tests/test_s3_store.py): this measures the client-side cost of a
store on S3 and moto's own per-request work on the same CPUs, not a network's latency. The warm start is computed
once and copied into the other stores' caches, so every repetition runs the same stages.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

_HOME = tempfile.mkdtemp(prefix="asymre-bench-prefect-")
os.environ.setdefault("PREFECT_HOME", _HOME)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from measure import load_average, print_machine, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMPUTE = "compute"
SERVER = """
import sys, threading
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple
app, lock = DomainDispatcherApplication(create_backend_app), threading.Lock()
def one_at_a_time(environ, start_response):
    with lock:
        return list(app(environ, start_response))
run_simple(sys.argv[1], int(sys.argv[2]), one_at_a_time, threaded=True)
"""
QUICK = [
    "prompts.n_train=400", "prompts.n_test=16", "prompts.per_round=16", "rollout.samples_per_prompt=4",
    "model.warm_start_steps=10", "model.warm_start_batch_size=16", "train.batch_size=16",
    "train.micro_batch_size=16", "eval.sampled=1",
]  # fmt: skip


class Ledger:
    """Exclusive wall time and calls per (stage, category): the stage is the one being materialised."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.stack: list[list] = []
        self.stage = "(outside stages)"

    def wrap(self, category: str, fn, sets_stage: bool = False):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if sets_stage:  # _materialize(stage, cfg, plan, round, inputs)
                stage = args[0]
                self.stage = f"{stage.name} {args[3]}" if stage.per_round else stage.name
            self.stack.append([category, 0.0])
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                _, children = self.stack.pop()
                self.seconds[(self.stage, category)] += elapsed - children
                self.calls[(self.stage, category)] += 1
                if self.stack:
                    self.stack[-1][1] += elapsed

        return timed

    def patch(self, module, name: str, category: str, *importers, sets_stage: bool = False) -> None:
        original = getattr(module, name)
        wrapped = self.wrap(category, original, sets_stage)
        setattr(module, name, wrapped)
        for importer in importers:
            if getattr(importer, name, None) is original:
                setattr(importer, name, wrapped)

    def take(self) -> tuple[dict, dict]:
        seconds, calls = dict(self.seconds), dict(self.calls)
        self.seconds.clear()
        self.calls.clear()
        return seconds, calls


def instrument(ledger: Ledger) -> None:
    import flows.iterate
    import flows.materialize
    import flows.pipeline
    import storage.checks
    from storage import catalog, checkpoints, lineage, object_store, tables

    pipeline = flows.pipeline
    for name in ("read_prompts", "sample_round_prompts", "render_prompts", "warm_started_policy", "load_policy",
                 "load_sampler", "generate_rollouts", "score", "advantage_rows", "curate", "training_rows",
                 "train_round", "evaluate"):  # fmt: skip
        ledger.patch(pipeline, name, COMPUTE)
    for module, name, category in [
        (checkpoints, "save", COMPUTE),  # into a local folder on both stores
        (checkpoints, "copy", COMPUTE),
        (tables, "read", "read"),
        (tables, "version", "read"),
        (tables, "write_partition", "write: conform"),
        (tables, "append", "write: conform"),
        (tables, "_commit", "write: delta commit"),
        (lineage, "last_done", "lineage"),
        (lineage, "output_holds", "lineage"),
        (lineage, "record_run", "lineage"),
        (tables, "compact", "lineage"),
        (flows.materialize, "run_checks", "checks"),
        (catalog, "write_views_sql", "views.sql"),
        (checkpoints, "cached_sha256", "checkpoint: sha256"),
        (object_store, "upload_folder", "checkpoint: upload"),
        (object_store, "download_folder", "checkpoint: download"),
        (checkpoints, "registered", "checkpoint: registry"),
        (object_store, "holds", "checkpoint: registry"),
    ]:
        ledger.patch(module, name, category, pipeline, flows.materialize, flows.iterate, checkpoints, storage.checks)
    # the stage is set by _materialize; views.sql is written after it, in materialize's finally, for that stage
    ledger.patch(flows.materialize, "_materialize", "other (Prefect task, keys, wiring)", sets_stage=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3(work: Path) -> subprocess.Popen:
    port = free_port()
    log = (work / "moto.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, "127.0.0.1", str(port)], stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"moto's server did not start: {(work / 'moto.log').read_text()[-2000:]}") from None
            time.sleep(0.2)
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret",
        AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true", ASYMRE_CACHE=str(work / "cache"),
    )  # fmt: skip
    import pyarrow.fs as pa_fs

    fs = pa_fs.S3FileSystem(
        access_key="bench", secret_key="bench-secret", region="us-east-1",
        endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True,
    )  # fmt: skip
    fs.create_dir("bench")
    return proc


def run_once(store: str, extra: list[str], ledger: Ledger) -> tuple[float, dict, dict]:
    from flows.config import load_config
    from flows.iterate import experiment_flow

    cfg = load_config(None, [*extra, "name=bench"]).model_copy(update={"store": store})
    ledger.take()
    started = time.perf_counter()
    experiment_flow(cfg, 1)
    wall = time.perf_counter() - started
    seconds, calls = ledger.take()
    return wall, seconds, calls


def seed_warm_start(source: Path, target: Path) -> None:
    """Copy the builtin:tiny warm-start caches of one cache folder into another (same keys, same content)."""
    for folder in source.glob("builtin-tiny-*"):
        if not (target / folder.name).exists():
            shutil.copytree(folder, target / folder.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes (16 prompts × 4 samples, 16 test prompts)")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of A (local) and B (s3), alternated")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a loaded box)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    extra = QUICK if args.quick else []
    work = Path(tempfile.mkdtemp(prefix="asymre-bench-s3-"))
    server = start_s3(work)
    from storage import checkpoints

    ledger = Ledger()
    instrument(ledger)
    print_machine()
    print(f"sizes: {'toy (--quick): ' + ' '.join(QUICK) if args.quick else 'the default (asymre run)'}")
    results: dict[str, list[tuple[float, dict, dict]]] = {"local": [], "s3": []}
    try:
        for rep in range(args.reps):
            for kind in ("local", "s3"):
                store = str(work / f"local-{rep}") if kind == "local" else f"s3://bench/rep-{rep}"
                if rep > 0 or kind == "s3":
                    seed_warm_start(work / "local-0" / "cache", checkpoints.cache_dir(store))
                print(f"rep {rep} {kind}: {store} (load {load_average()})", flush=True)
                results[kind].append(run_once(store, extra, ledger))
                print(f"  wall {results[kind][-1][0]:.1f} s", flush=True)
    finally:
        server.terminate()
        server.wait(10)
    report(results)
    shutil.rmtree(work, ignore_errors=True)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def report(results: dict[str, list[tuple[float, dict, dict]]]) -> None:
    stages = list(dict.fromkeys(s for runs in results.values() for _, sec, _ in runs for s, _ in sec))
    stages = [s for s in stages if s != "(outside stages)"]

    def per_stage(kind: str, stage: str, bookkeeping: bool) -> list[float]:
        out = []
        for _, seconds, _ in results[kind]:
            total = sum(v for (s, c), v in seconds.items() if s == stage)
            compute = sum(v for (s, c), v in seconds.items() if s == stage and c == COMPUTE)
            out.append(total - compute if bookkeeping else compute)
        return out

    print("\nper stage: bookkeeping = stage wall − compute (medians over the repetitions)")
    rows = []
    for stage in stages:
        local, s3 = _median(per_stage("local", stage, True)), _median(per_stage("s3", stage, True))
        rows.append({
            "stage": stage, "compute_local_s": _median(per_stage("local", stage, False)),
            "compute_s3_s": _median(per_stage("s3", stage, False)), "bookkeeping_local_s": local,
            "bookkeeping_s3_s": s3, "s3/local": s3 / local if local else float("nan"),
        })  # fmt: skip
    total_local = sum(r["bookkeeping_local_s"] for r in rows)
    total_s3 = sum(r["bookkeeping_s3_s"] for r in rows)
    rows.append({"stage": "all stages", "compute_local_s": sum(r["compute_local_s"] for r in rows),
                 "compute_s3_s": sum(r["compute_s3_s"] for r in rows), "bookkeeping_local_s": total_local,
                 "bookkeeping_s3_s": total_s3, "s3/local": total_s3 / total_local})  # fmt: skip
    print_table(rows)

    print("\nper call, by category (all stages; medians over the repetitions)")
    categories = sorted({c for runs in results.values() for _, sec, _ in runs for _, c in sec} - {COMPUTE})
    rows = []
    for category in categories:
        row: dict = {"category": category}
        for kind in ("local", "s3"):
            secs = [sum(v for (s, c), v in sec.items() if c == category) for _, sec, _ in results[kind]]
            calls = [sum(n for (s, c), n in cnt.items() if c == category) for _, _, cnt in results[kind]]
            row[f"calls_{kind}"] = int(_median(calls))
            row[f"{kind}_s"] = _median(secs)
            row[f"{kind}_ms/call"] = 1000 * _median(secs) / max(_median(calls), 1)
        row["s3/local"] = row["s3_s"] / row["local_s"] if row["local_s"] else float("nan")
        rows.append(row)
    print_table(rows)
    walls = {kind: [w for w, _, _ in runs] for kind, runs in results.items()}
    print(
        f"\nwall of start + round 0 (incl. Prefect): local {' / '.join(f'{w:.1f}' for w in walls['local'])} s, "
        f"s3 {' / '.join(f'{w:.1f}' for w in walls['s3'])} s; load {load_average()}"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
