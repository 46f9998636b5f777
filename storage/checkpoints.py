"""Checkpoints on disk: `save_pretrained` folders (and the optimizer state) under
<store>/checkpoints/<experiment>/round=<k>/, written by a folder swap and registered with a content hash.

torch is imported only by the functions that read or write optimizer state (storage never needs it to list)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from storage import tables

OPTIMIZER_STATE = "optimizer.pt"
RECORD = "record.json"  # written last into a cached folder: its presence marks the folder complete


def checkpoint_dir(store: str, experiment: str, round: int) -> Path:
    return Path(tables.resolve_store(store)) / "checkpoints" / experiment / f"round={round}"


def replace_dir(folder: Path, fill: Callable[[Path], object]) -> None:
    """Fill a sibling folder and swap it in, so that a crash never leaves half a checkpoint."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    fill(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def save(folder: Path, model, tokenizer, optimizer_state: dict | None = None, record: dict | None = None) -> None:
    """The model and tokenizer as a `save_pretrained` folder, with the optimizer state and a record file
    when given, swapped in whole."""

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if optimizer_state is not None:
            import torch

            torch.save(optimizer_state, tmp / OPTIMIZER_STATE)
        if record is not None:
            (tmp / RECORD).write_text(json.dumps(record, indent=1, default=str))

    replace_dir(folder, fill)


def complete(folder: Path) -> bool:
    """A folder written by `save` with a record (a cache entry) is complete once its record is there."""
    return (folder / RECORD).is_file()


def copy(source: Path, folder: Path) -> None:
    """A copy of a cached folder as a checkpoint, without its record (which holds wall times: leaving it
    out keeps the checkpoint's content hash reproducible)."""
    replace_dir(folder, lambda tmp: shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(RECORD)))


def load_optimizer_state(folder: str | Path) -> dict | None:
    """The optimizer state saved next to a checkpoint, or None (checkpoint 0 has none)."""
    path = Path(folder) / OPTIMIZER_STATE
    if not path.exists():
        return None
    import torch

    return torch.load(path, weights_only=False)


def folder_sha256(path: str | Path) -> str:
    """sha256 over (relative name, bytes) of every file in the folder, in name order."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def register(
    store: str,
    *,
    experiment: str,
    round: int,
    path: str | Path,
    parent_version: str | None,
    loss: float | None,
    stage_key: str,
) -> str:
    """Hash the folder, record it as μ_round of `experiment`, and return its policy_version."""
    sha = folder_sha256(path)
    version = f"{experiment}/round={round}@{sha[:12]}"
    row = {
        "experiment": experiment,
        "round": round,
        "policy_version": version,
        "parent_version": parent_version,
        "path": str(path),
        "loss": loss,
        "sha256": sha,
        "created_at": datetime.now(timezone.utc),
    }
    frame = pl.DataFrame([row], schema_overrides={"round": pl.Int32, "loss": pl.Float64, "parent_version": pl.String})
    tables.write_partition(
        store, "checkpoints", frame, partition={"experiment": experiment, "round": round}, stage_key=stage_key
    )
    return version


def lookup(store: str, experiment: str, round: int, version: int | None = None) -> dict | None:
    """The registered checkpoint μ_round of `experiment` (in the table's `version`, default latest) whose
    folder exists, or None (`verify` checks its hash)."""
    rows = tables.read(store, "checkpoints", version=version, experiment=experiment, round=round)
    if rows.is_empty():
        return None
    row = rows.row(0, named=True)
    if not Path(row["path"]).exists():
        return None
    return row


def verify(row: dict) -> bool:
    return folder_sha256(row["path"]) == row["sha256"]
