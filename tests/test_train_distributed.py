"""The train stage under torch.distributed: 2 ranks (gloo, CPU, spawned here) train the tiny policy with FSDP2
to the weights and step statistics of one process; the optimizer state saved by either world size carries into
the other; activation checkpointing and bf16 mixed precision run sharded; an old-format optimizer.pt loads."""

from __future__ import annotations

import copy
import math
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from stages.config import TrainConfig
from stages.models import build_tiny_model, build_tiny_tokenizer, load_policy
from stages.train import NonFiniteError, train_round
from storage import checkpoints

WORLD = 2
TIMEOUT_S = 240  # the spawned ranks (a hang in a collective fails the test instead of blocking it)
# 13 rows in optimizer batches of 6 (micro-batches of 2): 3 micro-batches per batch, the last batch 1, so one
# rank runs 2 and the other 1 plus a dummy, or 1 and none plus a dummy; μ's recompute has 7 batches of 2.
COMMON = {"batch_size": 6, "micro_batch_size": 2, "epochs": 2, "warmup_steps": 2, "lr": 2e-3, "grad_clip": 1.0}
CASES = {
    "asymre": TrainConfig(loss="asymre", **COMMON),
    "topr": TrainConfig(loss="topr", ratio_level="sequence", behaviour_logprobs="engine", **COMMON),
}
STATS = ["loss", "ratio_mean", "ratio_min", "ratio_max", "ratio_clipped", "positive_share",
         "effective_positive_share", "grad_norm", "lr", "tokens", "logprob_gap"]  # fmt: skip
REL = 1e-5


def make_rows(tokenizer, n: int = 13, seed: int = 0) -> pl.DataFrame:
    """Rows of uneven lengths with an engine log μ off the model's (TOPR's ratios on both sides of 1)."""
    rng = np.random.default_rng(seed)
    prompts, completions = [], []
    for i in range(n):
        a, b = rng.integers(0, 999, size=2)
        prompts.append(tokenizer(f"Q: {a}+{b}=? A:")["input_ids"])
        completions.append(tokenizer(str(a + b + (i % 3)) * (1 + i % 2))["input_ids"] + [tokenizer.eos_token_id])
    return pl.DataFrame(
        {
            "prompt_token_ids": prompts,
            "completion_token_ids": completions,
            "behaviour_logprobs": [(-rng.uniform(1.5, 5.0, size=len(c))).tolist() for c in completions],
            "advantage": rng.normal(size=n),
            "weight": rng.uniform(0.5, 2.0, size=n),
            "positive": rng.random(n) < 0.4,
        }
    )


def train_folder(source: Path, out: Path, rows: pl.DataFrame, config: TrainConfig, round: int, dtype=None) -> None:
    """One round as the train stage runs it: μ from `source` (weights and optimizer.pt, the latter read by rank 0
    only), train, rank 0 saves the checkpoint (and the step log) to `out`."""
    model, tokenizer = load_policy(str(source))
    rank = dist.get_rank() if dist.is_initialized() else 0
    result = train_round(
        model, rows, config, experiment="e", round=round, temperature=0.9, pad_id=tokenizer.pad_token_id, seed=0,
        optimizer_state=checkpoints.load_optimizer_state(source) if rank == 0 else None, dtype=dtype,
    )  # fmt: skip
    if rank == 0:
        checkpoints.save(out, model, tokenizer, result.optimizer_state, state_dict=result.model_state, dtype=dtype)
        result.steps.write_parquet(out / "steps.parquet")


def non_finite_round(source: Path, out: Path, rows: pl.DataFrame, config: TrainConfig, round: int) -> None:
    """A round whose one row has a NaN advantage: each rank writes the NonFiniteError it raised to `out`."""
    model, tokenizer = load_policy(str(source))
    advantage = rows["advantage"].to_numpy().copy()
    advantage[4] = np.nan
    rows = rows.with_columns(pl.Series("advantage", advantage))
    out.mkdir(exist_ok=True)
    try:
        train_round(
            model, rows, config, experiment="e", round=round, temperature=0.9, pad_id=tokenizer.pad_token_id, seed=0
        )
    except NonFiniteError as err:
        (out / f"rank{dist.get_rank() if dist.is_initialized() else 0}.txt").write_text(str(err))


def _rank(rank: int, world: int, init_file: str, rows: pl.DataFrame, tasks: list[dict]) -> None:
    torch.set_num_threads(1)  # two ranks on a small machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for task in tasks:
            run = non_finite_round if task.pop("non_finite", False) else train_folder
            run(rows=rows, **task)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(rows: pl.DataFrame, tasks: list[dict], init_file: Path) -> None:
    context = mp.start_processes(_rank, args=(WORLD, str(init_file), rows, tasks), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish in {TIMEOUT_S} s (a collective hung?)")


def old_format(state: dict, names: list[str]) -> dict:
    """An optimizer.pt as earlier versions wrote it: optimizer.state_dict() (parameters by position)."""
    index = {name: i for i, name in enumerate(names)}
    named = state["optimizer"]
    return {
        "optimizer": {
            "state": {index[n]: value for n, value in named["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]],
        },
        "global_step": state["global_step"],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Round 0 and round 1 of each case in one process, with 2 ranks, and crossed (1 then 2, 2 then 1); with 2
    ranks also: activation checkpointing, bf16 mixed precision, an old-format optimizer.pt, a NaN advantage."""
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    checkpoints.save(root / "base", model, tokenizer)
    rows = make_rows(tokenizer)
    for name, config in CASES.items():
        train_folder(root / "base", root / f"{name}-1-r0", rows, config, 0)
        train_folder(root / f"{name}-1-r0", root / f"{name}-1-r1", rows, config, 1)
    shutil.copytree(root / "asymre-1-r0", root / "asymre-old-r0")
    names = [name for name, _ in model.named_parameters()]
    state = checkpoints.load_optimizer_state(root / "asymre-1-r0")
    torch.save(old_format(state, names), root / "asymre-old-r0" / checkpoints.OPTIMIZER_STATE)

    def task(source: str, out: str, config: TrainConfig, round: int, **more) -> dict:
        return {"source": root / source, "out": root / out, "config": config, "round": round, **more}

    tasks = [
        *(task("base", f"{name}-2-r0", config, 0) for name, config in CASES.items()),
        *(task(f"{name}-1-r0", f"{name}-1,2-r1", config, 1) for name, config in CASES.items()),
        task("base", "topr-2-ac-r0", CASES["topr"].model_copy(update={"activation_checkpointing": True}), 0),
        task("base", "bf16-2-r0", CASES["asymre"], 0, dtype="bfloat16"),
        task("asymre-old-r0", "asymre-old,2-r1", CASES["asymre"], 1),
        task("base", "non-finite", CASES["topr"], 0, non_finite=True),
    ]
    run_ranks(rows, tasks, root / "init")
    for name, config in CASES.items():
        train_folder(root / f"{name}-2-r0", root / f"{name}-2,1-r1", rows, config, 1)
    return root, rows


def assert_same_weights(folder: Path, reference: Path) -> None:
    """All the weights within REL relative (‖a − b‖ / ‖b‖ over every parameter), and each tensor within 1e-3: the
    key biases start at 0 and move only by their ~10 small Adam updates, so float reordering of their gradient
    sums shows as ~1e-4 of their norm (a one-process run with another micro-batch split differs as much)."""
    got, want = load_file(folder / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    a, b = torch.cat([got[k].flatten() for k in want]), torch.cat([want[k].flatten() for k in want])
    assert (a - b).norm() / b.norm() <= REL
    for name, value in want.items():
        error = (got[name] - value).norm() / value.norm().clamp(min=1e-12)
        assert error <= 1e-3, f"{name}: relative error {float(error):.2e}"


def assert_same_steps(folder: Path, reference: Path) -> None:
    got, want = pl.read_parquet(folder / "steps.parquet"), pl.read_parquet(reference / "steps.parquet")
    assert got.height == want.height > 0
    for a, b in zip(got.iter_rows(named=True), want.iter_rows(named=True)):
        for key in STATS:
            assert a[key] == pytest.approx(b[key], rel=REL, abs=1e-7), (key, a["step"])


@pytest.mark.parametrize("loss", list(CASES))
def test_two_ranks_train_as_one_process(runs, loss):
    root, rows = runs
    assert_same_weights(root / f"{loss}-2-r0", root / f"{loss}-1-r0")
    assert_same_steps(root / f"{loss}-2-r0", root / f"{loss}-1-r0")
    steps = pl.read_parquet(root / f"{loss}-1-r0" / "steps.parquet")
    assert steps.height == CASES[loss].epochs * math.ceil(rows.height / CASES[loss].batch_size)
    assert steps["grad_norm"].max() > CASES[loss].grad_clip  # clipping was exercised
    if loss == "topr":
        assert steps["ratio_clipped"].max() > 0 and steps["ratio_min"].min() < 1 < steps["ratio_max"].max()
    # the saved folder is the one a single process writes: tied weights once, the same files and config
    files = sorted(p.name for p in (root / f"{loss}-1-r0").iterdir())
    assert sorted(p.name for p in (root / f"{loss}-2-r0").iterdir()) == files
    assert (root / f"{loss}-2-r0" / "config.json").read_text() == (root / f"{loss}-1-r0" / "config.json").read_text()
    # optimizer.pt: the same names, step counters and moments whichever world size wrote it
    got = checkpoints.load_optimizer_state(root / f"{loss}-2-r0")
    want = checkpoints.load_optimizer_state(root / f"{loss}-1-r0")
    assert got["format"] == want["format"] == checkpoints.OPTIMIZER_FORMAT
    assert got["global_step"] == want["global_step"] == steps.height
    assert [g["params"] for g in got["optimizer"]["param_groups"]] == [
        g["params"] for g in want["optimizer"]["param_groups"]
    ]
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
    for name, state in want["optimizer"]["state"].items():
        assert float(got["optimizer"]["state"][name]["step"]) == float(state["step"])
        torch.testing.assert_close(got["optimizer"]["state"][name]["exp_avg"], state["exp_avg"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss", list(CASES))
def test_optimizer_state_carries_across_world_sizes(runs, loss):
    """Round 1 from a round 0 of the other world size equals round 1 after a one-process round 0."""
    root, _ = runs
    for crossed in (f"{loss}-1,2-r1", f"{loss}-2,1-r1"):
        assert_same_weights(root / crossed, root / f"{loss}-1-r1")
        assert_same_steps(root / crossed, root / f"{loss}-1-r1")
        assert checkpoints.load_optimizer_state(root / crossed)["global_step"] == 2 * 6


def test_activation_checkpointing_changes_nothing(runs):
    root, rows = runs
    assert_same_weights(root / "topr-2-ac-r0", root / "topr-1-r0")
    # and in one process, which leaves the model as it found it
    model, tokenizer = load_policy(str(root / "base"))
    config = CASES["topr"].model_copy(update={"activation_checkpointing": True})
    train_round(model, rows, config, experiment="e", round=0, temperature=0.9, pad_id=tokenizer.pad_token_id, seed=0)
    checkpoints.save(root / "topr-1-ac-r0", model, tokenizer)
    assert_same_weights(root / "topr-1-ac-r0", root / "topr-1-r0")
    assert not any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def test_bf16_mixed_precision_keeps_fp32_masters_and_saves_bf16(runs):
    root, _ = runs
    folder = root / "bf16-2-r0"
    weights = load_file(folder / "model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert '"dtype": "bfloat16"' in (folder / "config.json").read_text()
    base = load_file(root / "base" / "model.safetensors")
    assert any(not torch.equal(weights[k], base[k].to(torch.bfloat16)) for k in base)
    steps = pl.read_parquet(folder / "steps.parquet")
    assert steps["loss"].is_finite().all() and steps["grad_norm"].is_finite().all()
    # AdamW steps the fp32 master weights: its moments are fp32
    state = checkpoints.load_optimizer_state(folder)["optimizer"]["state"]
    assert {s["exp_avg"].dtype for s in state.values()} == {torch.float32}


def test_old_format_optimizer_state_loads_by_parameter_order(runs):
    """optimizer.pt of earlier versions (optimizer.state_dict(): parameters by position) loads as the same state
    by name, with 2 ranks as in one process; one for another model fails with the fix in the message."""
    root, _ = runs
    assert_same_weights(root / "asymre-old,2-r1", root / "asymre-1,2-r1")
    assert_same_steps(root / "asymre-old,2-r1", root / "asymre-1,2-r1")

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    rows = make_rows(tokenizer, n=6)
    config = TrainConfig(batch_size=6, micro_batch_size=6, warmup_steps=4, lr=1e-3)
    first = train_round(model, rows, config, experiment="e", round=0, temperature=1.0, pad_id=0, seed=0)
    old = old_format(first.optimizer_state, [name for name, _ in model.named_parameters()])
    results = []
    for state in (first.optimizer_state, old):
        trained = copy.deepcopy(model)
        result = train_round(
            trained, rows, config, experiment="e", round=1, temperature=1.0, pad_id=0, seed=0,
            optimizer_state=copy.deepcopy(state),  # AdamW would update the tensors it is given in place
        )  # fmt: skip
        results.append((trained, result))
    (a, ra), (b, rb) = results
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert ra.steps["lr"].to_list() == rb.steps["lr"].to_list() == pytest.approx([5e-4])
    group = {**old["optimizer"]["param_groups"][0], "params": list(range(5))}
    wrong = {**old, "optimizer": {**old["optimizer"], "param_groups": [group]}}
    with pytest.raises(ValueError, match="keep_optimizer=false"):
        train_round(copy.deepcopy(model), rows, config, experiment="e", round=1, temperature=1.0, pad_id=0, seed=0,
                    optimizer_state=wrong)  # fmt: skip


def test_a_non_finite_loss_stops_every_rank(runs):
    """The NaN is in one rank's micro-batch; both ranks raise the same error at the same step (no hang)."""
    root, _ = runs
    messages = [(root / "non-finite" / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert messages[0] == messages[1] and "loss is nan" in messages[0]
