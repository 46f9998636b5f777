"""The round: how much of a round's wall time is spent outside stage compute (Prefect, lineage, commits,
views.sql, checks, catalog, checkpoint files), on the default experiment, and how it grows with the
prompts per round (1×, 4×, 16×).

    python bench/round_overhead.py [--quick] [--per-round 128,512,2048] [--rounds 3] [--profile]

Runs experiment_flow in this process (Prefect's ephemeral server under a temporary PREFECT_HOME, as
`asymre run` does) with every stage function and every storage/lineage/check call wrapped in a timer.
Times are attributed to the OUTERMOST wrapped call (so lineage.record_run includes its own commit and
views.sql rewrite) and, separately, exclusively to the innermost one. "Prefect + other" is the round's
wall time minus everything wrapped. Round 0 carries the warm start and the eval of checkpoint 0, so the
table reports rounds ≥ 1. The stage_runs view (Σ wall_s of the round's stage runs vs the round's wall
time) is printed too. For scales other than the first, the builtin:tiny warm-start cache is copied from
the first store (its settings do not depend on prompts.per_round), so only the rounds are run.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

_HOME = tempfile.mkdtemp(prefix="asymre-bench-prefect-")
os.environ.setdefault("PREFECT_HOME", _HOME)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import polars as pl  # noqa: E402
from measure import print_machine, print_table  # noqa: E402

COMPUTE = "compute"


class Ledger:
    """Wall time per category; `outer` counts only the outermost wrapped call, `inner` the exclusive time."""

    def __init__(self) -> None:
        self.outer: dict[str, float] = defaultdict(float)
        self.inner: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []

    def wrap(self, category: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.stack.append([category, 0.0])
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                _, children = self.stack.pop()
                self.inner[category] += elapsed - children
                if self.stack:
                    self.stack[-1][1] += elapsed
                else:
                    self.outer[category] += elapsed

        return timed

    def patch(self, module, name: str, category: str, *importers) -> None:
        """Wrap module.name, and the same function where an importer holds it by name (if the module has it:
        the script also times older checkouts of the code, through PYTHONPATH)."""
        original = getattr(module, name, None)
        if original is None:
            return
        wrapped = self.wrap(category, original)
        setattr(module, name, wrapped)
        for importer in importers:
            if getattr(importer, name, None) is original:
                setattr(importer, name, wrapped)

    def snapshot(self) -> tuple[dict, dict]:
        return dict(self.outer), dict(self.inner)


def instrument(ledger: Ledger) -> None:
    import flows.materialize
    import flows.pipeline
    import stages.advantage
    import stages.curate
    import stages.evaluate
    import stages.models
    import stages.prompts
    import stages.rollout
    import stages.train
    import stages.verify
    import storage.checks
    from storage import catalog, checkpoints, lineage, tables

    for module, name, category in [
        (stages.rollout, "generate_rollouts", f"{COMPUTE}: rollouts"),
        (stages.verify, "score", f"{COMPUTE}: rewards"),
        (stages.advantage, "advantages", f"{COMPUTE}: advantages"),
        (stages.curate, "curate", f"{COMPUTE}: curation"),
        (stages.train, "training_rows", f"{COMPUTE}: train"),
        (stages.train, "train_round", f"{COMPUTE}: train"),
        (stages.evaluate, "evaluate", f"{COMPUTE}: eval"),
        (stages.prompts, "read_prompts", f"{COMPUTE}: prompts"),
        (stages.prompts, "sample_round_prompts", f"{COMPUTE}: prompts"),
        (stages.prompts, "render_prompts", f"{COMPUTE}: prompts"),
        (stages.models, "warm_started_policy", f"{COMPUTE}: warm start"),
        (stages.models, "load_policy", "checkpoint: load"),
        (checkpoints, "save", "checkpoint: save"),
        (checkpoints, "copy", "checkpoint: save"),
        (checkpoints, "folder_sha256", "checkpoint: sha256"),
        (checkpoints, "lookup", "checkpoint: lookup"),
        (tables, "read", "storage: read"),
        (tables, "version", "storage: read"),
        (tables, "write_partition", "storage: write (conform, checks of the frame)"),
        (tables, "append", "storage: write (conform, checks of the frame)"),
        (tables, "_commit", "storage: delta commit"),
        (catalog, "write_views_sql", "catalog: views.sql rewrite"),
        (storage.checks, "connect_partition", "catalog: connect (views of the checked partition)"),
        (storage.checks, "connect", "catalog: connect (views over every table)"),  # before 2026-12-01
        (flows.materialize, "run_checks", "checks"),
        (flows.pipeline, "stage_key", "lineage"),
        (lineage, "last_done", "lineage"),
        (lineage, "output_holds", "lineage"),
        (lineage, "record_run", "lineage"),
        (tables, "compact", "lineage: compact stage_runs"),
    ]:
        ledger.patch(module, name, category, flows.pipeline, flows.materialize)


def seed_warm_start(source_store: Path, cfg) -> None:
    """Reuse the warm-start cache of another store for `cfg`: the one of the same key (the base stage's),
    or the store's only one (the warm start does not read prompts.per_round, though its key holds it)."""
    from flows.round import planned_keys

    target = Path(cfg.store) / "cache" / f"builtin-tiny-{planned_keys(cfg, 0)[0][('base', 0)]}"
    caches = sorted((source_store / "cache").glob("builtin-tiny-*"))
    source = source_store / "cache" / target.name
    source = source if source.is_dir() else (caches[0] if len(caches) == 1 else None)
    if source is not None and not target.exists():
        shutil.copytree(source, target)


def run_scale(per_round: int, rounds: int, root: Path, extra: list[str], ledger: Ledger, warm_from: Path | None):
    import flows.iterate
    from flows.config import load_config
    from storage import lineage

    store = root / f"store-{per_round}"
    cfg = load_config(None, [f"prompts.per_round={per_round}", *extra]).model_copy(
        update={"store": str(store), "name": f"bench-{per_round}"}
    )
    if warm_from is not None:
        seed_warm_start(warm_from, cfg)
    per_round_rows = []
    original = flows.iterate.round_flow

    def timed_round(cfg_, k, *rest):  # rest: plan, checkpoint (and prompts, since 2026-12-01)
        outer0, inner0 = ledger.snapshot()
        began = datetime.now(timezone.utc)
        started = time.perf_counter()
        result = original(cfg_, k, *rest)
        wall = time.perf_counter() - started
        outer1, inner1 = ledger.snapshot()
        per_round_rows.append(
            {
                "k": k,
                "wall": wall,
                "began": began,
                "ended": datetime.now(timezone.utc),
                "outer": {c: outer1.get(c, 0.0) - outer0.get(c, 0.0) for c in outer1},
                "inner": {c: inner1.get(c, 0.0) - inner0.get(c, 0.0) for c in inner1},
            }
        )
        return result

    flows.iterate.round_flow = timed_round
    try:
        flows.iterate.experiment_flow(cfg, rounds)
    finally:
        flows.iterate.round_flow = original
    runs = lineage.runs(str(store), cfg.name)
    for r in per_round_rows:
        inside = runs.filter(
            (pl.col("created_at") >= r["began"]) & (pl.col("created_at") <= r["ended"]) & (pl.col("status") == "done")
        )
        r["stage_runs_wall"] = float(inside["wall_s"].sum())
        r["stage_runs"] = {s: float(w) for s, w in zip(inside["stage"], inside["wall_s"])}
        r["rollouts"] = per_round * cfg.rollout.samples_per_prompt
    return store, per_round_rows


def summarise(per_round: int, r: dict) -> dict:
    compute = sum(v for c, v in r["outer"].items() if c.startswith(COMPUTE))
    checkpoint = sum(v for c, v in r["outer"].items() if c.startswith("checkpoint"))
    wrapped = sum(r["outer"].values())
    return {
        "per_round": per_round,
        "rollouts": r["rollouts"],
        "round": r["k"],
        "wall_s": r["wall"],
        "compute_s": compute,
        "checkpoint_io_s": checkpoint,
        "other_s": r["wall"] - compute - checkpoint,
        "outside_compute_share": 1 - compute / r["wall"],
        "excl_ckpt_io_share": (r["wall"] - compute - checkpoint) / r["wall"],
        "stage_runs_Σwall_s": r["stage_runs_wall"],
        "outside_stage_runs_share": 1 - r["stage_runs_wall"] / r["wall"],
        "prefect+other_s": r["wall"] - wrapped,
    }


def breakdown(r: dict, key: str) -> list[dict]:
    rows = [{"category": c, "seconds": v, "share_of_round": v / r["wall"]} for c, v in r[key].items() if v > 0]
    wrapped = sum(r[key].values())
    rows.append(
        {
            "category": "Prefect + other (unwrapped)",
            "seconds": r["wall"] - wrapped,
            "share_of_round": 1 - wrapped / r["wall"],
        }
    )
    return sorted(rows, key=lambda x: -x["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny task and model budget, two rounds (smoke test)")
    parser.add_argument(
        "--per-round", default=None, help="comma-separated prompts.per_round values; first is timed in detail"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds for the first scale (others run 2)")
    parser.add_argument("--profile", action="store_true", help="pyinstrument the last round of the first scale")
    parser.add_argument("--keep", action="store_true", help="keep the stores (printed) for inspection")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a loaded box)")
    parser.add_argument(
        "--warm-from",
        type=Path,
        default=None,
        help="a store whose warm-start cache fits (e.g. of `asymre run`): skip it",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    extra = []
    if args.quick:
        extra = ["prompts.n_train=400", "prompts.n_test=16", "rollout.samples_per_prompt=4",
                 "model.warm_start_steps=10", "model.warm_start_batch_size=16", "train.batch_size=16",
                 "train.micro_batch_size=16", "eval.sampled=1"]  # fmt: skip
    scales = [int(x) for x in (args.per_round or ("16,64" if args.quick else "512,128,2048")).split(",")]
    rounds = args.rounds or (2 if args.quick else 3)
    print_machine()
    ledger = Ledger()
    instrument(ledger)
    root = Path(tempfile.mkdtemp(prefix="asymre-bench-round-"))
    results, first_store = [], args.warm_from
    profiler = None
    try:
        for i, per_round in enumerate(scales):
            n_rounds = rounds if i == 0 else 2
            if args.profile and i == 0:
                from pyinstrument import Profiler

                profiler = Profiler(interval=0.005)
            store, rows = run_scale(per_round, n_rounds, root, extra, ledger, first_store)
            first_store = first_store or store
            results.append((per_round, rows))
            print(f"per_round={per_round}: " + ", ".join(f"round {r['k']} {r['wall']:.1f}s" for r in rows), flush=True)
        if profiler is not None:
            _profile_one_more_round(profiler, scales[0], rounds, root, extra, ledger)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(_HOME, ignore_errors=True)
        else:
            print(f"stores kept under {root}")
    steady = [(p, r) for p, rows in results for r in rows if r["k"] >= 1]
    print("\n# round wall time vs stage compute (rounds ≥ 1; target: outside_compute_share ≤ 0.10)")
    print_table([summarise(p, r) for p, r in steady])
    per_round0, rows0 = results[0]
    last = rows0[-1]
    print(f"\n# where round {last['k']} of per_round={per_round0} goes (outermost wrapped call)")
    print_table(breakdown(last, "outer"))
    print("\n# the same round, exclusive time of the innermost wrapped call")
    print_table(breakdown(last, "inner"))
    print("\n# stage_runs wall_s of that round")
    print_table([{"stage": s, "wall_s": w} for s, w in last["stage_runs"].items()])
    print("\n# growth with prompts per round (last round of each scale; linear = the prompt ratio)")
    base = {p: rows[-1] for p, rows in results}
    smallest = min(scales)
    growth = []
    for p in sorted(base):
        r, r0 = base[p], base[smallest]
        s, s0 = summarise(p, r), summarise(smallest, r0)
        growth.append(
            {
                "per_round": p,
                "prompt_ratio": p / smallest,
                "wall_ratio": r["wall"] / r0["wall"],
                "compute_ratio": s["compute_s"] / s0["compute_s"],
                "other_s": s["other_s"],
                "other_ratio": s["other_s"] / s0["other_s"],
            }
        )
    print_table(growth)


def _profile_one_more_round(profiler, per_round, rounds, root, extra, ledger) -> None:
    """Continue the first scale by one round under pyinstrument and print the time outside the stages."""
    import flows.iterate
    from flows.config import load_config

    cfg = load_config(None, [f"prompts.per_round={per_round}", *extra]).model_copy(
        update={"store": str(root / f"store-{per_round}"), "name": f"bench-{per_round}"}
    )
    profiler.start()
    flows.iterate.experiment_flow(cfg, rounds + 1)
    profiler.stop()
    print("\n# pyinstrument: one more round (earlier rounds are skipped by stage_key, which is in this profile)")
    print(profiler.output_text(unicode=False, color=False, show_all=False))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
