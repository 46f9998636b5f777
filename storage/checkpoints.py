"""Checkpoints on disk: `save_pretrained` folders (and the optimizer state) under
<store>/checkpoints/<experiment>/round=<k>/, written by a folder swap and registered with a content hash.

In a store on S3 a checkpoint is written to a local folder (`checkpoint_dir`), uploaded one object per file when it
is registered, and registered only once the upload is complete; a stage that loads it gets a local copy from this
machine's cache of checkpoints by content hash (<cache>/checkpoints/<sha256>), downloaded once and checked against the
registered hash before it is used.

The optimizer state (optimizer.pt) does not depend on how many processes trained: AdamW's full state keyed by
the Hugging Face parameter names (OPTIMIZER_FORMAT), the same from one process as from FSDP2 ranks, so a round
trained in one process and the next under torchrun carry the state across (and back). Under a process group the
functions that gather or load state are collectives: every rank calls them.

torch is imported only by the functions that read or write model or optimizer state (storage never needs it to
list)."""

from __future__ import annotations

import copy as _copy
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from storage import object_store, tables

OPTIMIZER_STATE = "optimizer.pt"
# optimizer.pt: {"format": 2, "optimizer": {"state": {name: {...}}, "param_groups": [{..., "params": [name, ...]}]},
# "global_step": n}. Files without "format" (earlier versions) hold optimizer.state_dict() itself, keyed by the
# parameters' positions; they are converted by parameter order when loaded.
OPTIMIZER_FORMAT = 2
RECORD = "record.json"  # written last into a cached folder: its presence marks the folder complete


def checkpoint_dir(store: str, experiment: str, round: int) -> Path:
    """The folder checkpoint `round` of `experiment` is written to: in the store, or for a store on S3 a folder
    of this machine that `register` uploads."""
    return object_store.local_root(tables.resolve_store(store)) / "checkpoints" / experiment / f"round={round}"


def cache_dir(store: str) -> Path:
    """Where stages cache what their key fully determines (the built-in policy's warm start): in the store, or
    for a store on S3 in this machine's cache, shared by every store (the key says what the folder holds)."""
    root = tables.resolve_store(store)
    return object_store.cache_root() / "cache" if object_store.is_remote(root) else Path(root) / "cache"


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


def save(
    folder: Path,
    model,
    tokenizer,
    optimizer_state: dict | None = None,
    record: dict | None = None,
    *,
    state_dict: dict | None = None,
    dtype=None,
) -> None:
    """The model and tokenizer as a `save_pretrained` folder, with the optimizer state and a record file
    when given, swapped in whole.

    `state_dict`: full weights to save instead of the model's own parameters (e.g. gathered from FSDP2 shards by
    `full_model_state`), in `dtype` (a torch dtype or its name) when given: saved through a copy of the model's
    class on the meta device, so the folder is the one `model.save_pretrained` would write for those weights
    (tied weights stored once, config.json's dtype that of the weights)."""

    def fill(tmp: Path) -> None:
        target = model if state_dict is None else _model_with(model, state_dict, dtype)
        target.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if optimizer_state is not None:
            import torch

            torch.save(optimizer_state, tmp / OPTIMIZER_STATE)
        if record is not None:
            (tmp / RECORD).write_text(json.dumps(record, indent=1, default=str))

    replace_dir(folder, fill)


def _model_with(model, state_dict: dict, dtype=None):
    """A model of `model`'s class and config holding `state_dict` (no copy of the tensors, none initialised)."""
    import torch

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    with torch.device("meta"):
        shell = type(model)(_copy.deepcopy(model.config))
    shell.load_state_dict(state_dict, assign=True)
    shell.tie_weights()  # the loaded copies of tied weights become one parameter again
    return shell


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


def _process_group() -> tuple[int, int] | None:
    """(rank, world size) under an initialised torch.distributed process group, else None."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else None


def full_model_state(module, prefix: str = "") -> dict | None:
    """The full weights of an FSDP2-sharded `module` on rank 0's CPU, names without `prefix` (e.g. "lm." of
    the trainer's CompletionScorer); None on the other ranks. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    group = _process_group()
    if group is not None and group[0] != 0:
        return None
    return {_unprefixed(name, prefix): value for name, value in state.items()}


def optimizer_state(module, optimizer, global_step: int, prefix: str = "") -> dict:
    """What optimizer.pt holds (OPTIMIZER_FORMAT): the optimizer's full state keyed by parameter name (names of
    `module` without `prefix`) and the global step counter (the lr warmup clock).

    Under a process group (FSDP2-sharded `module`) the full state is gathered onto rank 0's CPU (a collective);
    the other ranks get an empty "optimizer"."""
    group = _process_group()
    if group is None or not optimizer.state:  # nothing sharded to gather (no step taken, nothing loaded)
        local = optimizer.state_dict()
        names = _parameter_names(module, optimizer, prefix)
        named = {
            "state": {names[i]: value for i, value in local["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in local["param_groups"]],
        }
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(
            module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        named = {}
        if group[0] == 0:
            named = {
                "state": {_unprefixed(n, prefix): value for n, value in full["state"].items()},
                "param_groups": [
                    {**g, "params": [_unprefixed(n, prefix) for n in g["params"]]} for g in full["param_groups"]
                ],
            }
    return {"format": OPTIMIZER_FORMAT, "optimizer": named, "global_step": global_step}


def load_optimizer(module, optimizer, state: dict | None, prefix: str = "") -> int:
    """Load `state` (from `optimizer_state` or optimizer.pt, this format or the old one) into `optimizer` and
    return its global step; 0 and nothing loaded when `state` is None.

    Under a process group this is a collective and rank 0's `state` is the one loaded (the others may pass
    None): its full tensors are broadcast and each rank keeps its shards. A state whose parameter names are not
    the model's fails with the names that differ, on every rank."""
    group = _process_group()
    names = _parameter_names(module, optimizer, prefix)
    if group is None:
        if state is None:
            return 0
        named = _named_optimizer_state(state, names)
        index = {name: i for i, name in enumerate(names)}  # load_state_dict pairs ids by position: in our order
        optimizer.load_state_dict(
            {
                "state": {index[n]: value for n, value in named["state"].items()},
                "param_groups": [{**g, "params": sorted(index[n] for n in g["params"])} for g in named["param_groups"]],
            }
        )
        return int(state["global_step"])

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    named, header = {}, [None]  # rank 0 tells every rank: (global step, error) or None (nothing to load)
    if group[0] == 0 and state is not None:
        try:
            named = _named_optimizer_state(state, names)
            header = [(int(state["global_step"]), None)]
        except Exception as err:  # raised on every rank below, not on rank 0 alone (the others would wait)
            header = [(0, f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err))]
    dist.broadcast_object_list(header, src=0)
    if header[0] is None:
        return 0
    global_step, error = header[0]
    if error is not None:
        raise ValueError(error)
    if named:
        named = {
            "state": {prefix + n: value for n, value in named["state"].items()},
            "param_groups": [{**g, "params": [prefix + n for n in g["params"]]} for g in named["param_groups"]],
        }
    set_optimizer_state_dict(
        module, optimizer, named, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    return global_step


def _parameter_names(module, optimizer, prefix: str) -> list[str]:
    """The names (without `prefix`) of the optimizer's parameters, in its order (the ids of its state_dict)."""
    by_id = {id(p): _unprefixed(name, prefix) for name, p in module.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _named_optimizer_state(state: dict, names: list[str]) -> dict:
    """The "optimizer" part of `state` keyed by name, checked against the model's `names`. An old-format state
    (optimizer.state_dict() itself, integer ids) is converted by parameter order: id i is the model's i-th
    parameter, as the trainer's AdamW(model.parameters()) numbered them."""
    optimizer = state["optimizer"]
    if state.get("format") is None:
        ids = [i for g in optimizer["param_groups"] for i in g["params"]]
        if sorted(ids) != list(range(len(names))):
            raise ValueError(
                f"the optimizer state (old format: parameters by position) holds {len(ids)} parameters and this "
                f"model has {len(names)}; it was saved for another model (set train.keep_optimizer=false to start "
                "AdamW afresh)"
            )
        return {
            "state": {names[i]: value for i, value in optimizer["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optimizer["param_groups"]],
        }
    if state["format"] != OPTIMIZER_FORMAT:
        raise ValueError(f"optimizer state format {state['format']!r}: this version reads {OPTIMIZER_FORMAT}")
    saved = [n for g in optimizer["param_groups"] for n in g["params"]]
    if sorted(saved) != sorted(names) or not set(optimizer["state"]) <= set(names):
        unknown = sorted(set(saved) - set(names))[:3]
        missing = sorted(set(names) - set(saved))[:3]
        raise ValueError(
            f"the optimizer state does not match the model's parameters (saved only: {unknown}, model only: "
            f"{missing}); it was saved for another model (set train.keep_optimizer=false to start AdamW afresh)"
        )
    return optimizer


def _unprefixed(name: str, prefix: str) -> str:
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


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


# Hashes this process computed, by folder and the (name, size, mtime) of its files: a round uses μ_k in
# rollouts, eval and train, and hashing a 500 MB folder takes seconds. A file rewritten in place changes
# its mtime, so it is hashed again; a new process always hashes again.
_HASHES: dict[str, tuple[tuple, str]] = {}


def _stamp(folder: Path) -> tuple:
    return tuple(
        (str(p.relative_to(folder)), st.st_size, st.st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (st := p.stat())
    )


def cached_sha256(folder: str | Path) -> str:
    """folder_sha256, computed once per process for as long as the folder's files keep their size and mtime."""
    folder = Path(folder)
    stamp = _stamp(folder)
    held = _HASHES.get(str(folder))
    if held is not None and held[0] == stamp:
        return held[1]
    sha = folder_sha256(folder)
    _HASHES[str(folder)] = (stamp, sha)
    return sha


def stored_path(store: str, path: str | Path) -> str:
    """What the registry holds for a checkpoint folder: its path relative to the store root when it lies in
    the store (so a store copied elsewhere still finds its checkpoints), else the absolute path."""
    absolute = Path(path).expanduser().resolve()
    try:
        return absolute.relative_to(tables.resolve_store(store)).as_posix()
    except ValueError:
        return str(absolute)


def location(store: str, stored: str) -> str:
    """Where the folder a registry row names is now: a local path, or for a store on S3 its s3:// URI."""
    root = tables.resolve_store(store)
    if object_store.is_remote(root) and not Path(stored).is_absolute():
        return f"{root}/{stored}"
    return str(resolve_path(store, stored))


def resolve_path(store: str, stored: str) -> Path:
    """The folder a registry row names, in the store as it is now. Rows written before paths were relative
    hold absolute paths: one that no longer exists is taken from its `checkpoints/` part on, in this store."""
    root = Path(tables.resolve_store(store))
    path = Path(stored)
    if not path.is_absolute():
        return root / path
    if not path.exists() and "checkpoints" in path.parts:
        at = len(path.parts) - 1 - path.parts[::-1].index("checkpoints")
        moved = root.joinpath(*path.parts[at:])
        if moved.exists():
            return moved
    return path


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
    """Hash the folder, record it as μ_round of `experiment`, and return its policy_version. For a store on S3
    the folder is uploaded first (registered only once every file is there) and then kept in this machine's
    cache of checkpoints, from where the next stages load it."""
    sha = cached_sha256(path)  # the folder was just written: rollouts and eval of the next round reuse this
    root = tables.resolve_store(store)
    if object_store.is_remote(root):
        stored = f"checkpoints/{experiment}/round={round}"
        object_store.upload_folder(Path(path), f"{root}/{stored}")
    else:
        stored = stored_path(store, path)
    version = f"{experiment}/round={round}@{sha[:12]}"
    row = {
        "experiment": experiment,
        "round": round,
        "policy_version": version,
        "parent_version": parent_version,
        "path": stored,
        "loss": loss,
        "sha256": sha,
        "created_at": datetime.now(timezone.utc),
    }
    frame = pl.DataFrame([row], schema_overrides={"round": pl.Int32, "loss": pl.Float64, "parent_version": pl.String})
    tables.write_partition(
        store, "checkpoints", frame, partition={"experiment": experiment, "round": round}, stage_key=stage_key
    )
    if object_store.is_remote(root):
        _keep(Path(path), sha)
    return version


def _keep(folder: Path, sha: str) -> None:
    """Move an uploaded folder into the cache of checkpoints as the copy of `sha` (unless one is there)."""
    target = cached_copy(sha)
    target.parent.mkdir(parents=True, exist_ok=True)
    stamp = _stamp(folder)
    try:
        folder.rename(target)
    except OSError:  # another process cached the same content first
        shutil.rmtree(folder, ignore_errors=True)
        return
    _HASHES[str(target)] = (stamp, sha)  # a rename keeps names, sizes and mtimes: no need to hash it again


def cached_copy(sha: str) -> Path:
    """This machine's copy of the checkpoint whose content hash is `sha` (a store on S3)."""
    return object_store.cache_root() / "checkpoints" / sha


def fetch(row: dict) -> Path:
    """This machine's copy of the registered checkpoint `row` of a store on S3 (its `path` an s3:// URI): from the
    cache of checkpoints, else downloaded into it; CheckpointDamaged if the objects are gone or do not make up
    the registered content (nothing is cached then). A cached copy that no longer matches is fetched afresh."""
    target = cached_copy(row["sha256"])
    if target.is_dir():
        if cached_sha256(target) == row["sha256"]:
            return target
        shutil.rmtree(target, ignore_errors=True)
    download = target.with_name(f".{row['sha256']}.{uuid.uuid4().hex}")
    try:
        if object_store.download_folder(row["path"], download) == 0:
            raise CheckpointDamaged(*_damage(row, "its folder is missing"))
        wrong = problem({**row, "path": str(download)})
        if wrong is not None:
            raise CheckpointDamaged(*_damage(row, wrong))
        stamp = _stamp(download)
        try:
            os.rename(download, target)
            _HASHES[str(target)] = (stamp, row["sha256"])
        except OSError:  # another process downloaded it first
            pass
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return target


class CheckpointDamaged(RuntimeError):
    """A registered checkpoint's folder is gone or its content differs from the hash registered with it."""

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message  # what is wrong, without the checkpoint's name and the fix


def rebuild_command(round: int) -> str:
    """The run that writes checkpoint `round` again: training of round k−1 makes checkpoint k; checkpoint 0
    is the base stage's."""
    stage = "base --round 0" if round == 0 else f"train --round {round - 1}"
    return f"asymre run CONFIG --from-stage {stage}"


def registered(store: str, experiment: str, round: int, version: int | None = None) -> dict | None:
    """The registry row of μ_round of `experiment` (in the table's `version`, default latest) with its `path`
    resolved against the store as it is now, or None when none is registered."""
    rows = tables.read(store, "checkpoints", version=version, experiment=experiment, round=round)
    if rows.is_empty():
        return None
    row = rows.row(0, named=True)
    return {**row, "path": location(store, row["path"])}


def lookup(store: str, experiment: str, round: int, version: int | None = None) -> dict | None:
    """The registered checkpoint μ_round of `experiment` (in the table's `version`, default latest), verified
    against its registered hash, or None when none is registered or its folder is gone (`checked` says which).
    Raises CheckpointDamaged when its files differ from what was registered: it is never handed out to a
    stage (rollouts, training, evaluation) unverified."""
    row = registered(store, experiment, round, version)
    if row is None:
        return None
    if object_store.is_remote(row["path"]):
        if not cached_copy(row["sha256"]).is_dir() and not object_store.holds(row["path"]):
            return None
    elif not Path(row["path"]).exists():
        return None
    return _verified(row)


def checked(store: str, experiment: str, round: int, version: int | None = None) -> dict:
    """`lookup`, raising CheckpointDamaged (with the rebuild command) when the checkpoint is not there either."""
    row = registered(store, experiment, round, version)
    if row is None:
        raise CheckpointDamaged(
            f"checkpoint {round} of experiment {experiment!r} is not registered in {tables.resolve_store(store)}; "
            f"build it with `{rebuild_command(round)}`"
        )
    return _verified(row)


def problem(row: dict) -> str | None:
    """What is wrong with a registered checkpoint's folder (its `path` resolved), or None when it matches its hash.
    On S3 the folder is fetched into this machine's cache to be checked (so `asymre check` downloads each
    checkpoint once)."""
    if object_store.is_remote(row["path"]):
        try:
            fetch(row)
        except CheckpointDamaged as err:
            return err.problem
        return None
    folder = Path(row["path"])
    if not folder.is_dir():
        return "its folder is missing"
    if cached_sha256(folder) == row["sha256"]:
        return None
    names = {p.name for p in folder.iterdir()}
    if "config.json" not in names:
        return "file config.json is missing"
    if not names & {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}:
        return "its weights file (model.safetensors) is missing"
    for weights in sorted(folder.glob("*.safetensors")):
        short = _safetensors_shortfall(weights)
        if short:
            return f"file {weights.name} is truncated ({short} bytes short of what its header says)"
    return f"its content hash differs from the registered one ({row['sha256'][:12]}…): a file was changed, added or removed"


def _safetensors_shortfall(path: Path) -> int:
    """How many bytes a .safetensors file lacks (its header gives the length of every tensor); 0 if none."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if not 0 < header_len <= size - 8:
                return 0  # no header to go by (cut inside it, or other bytes): the hash message says enough
            header = json.loads(handle.read(header_len))
            ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return 0
    return max(8 + header_len + max(ends, default=0) - size, 0)


def _damage(row: dict, wrong: str) -> tuple[str, str]:
    return (
        f"checkpoint {row['round']} of experiment {row['experiment']!r} ({row['path']}) is damaged: {wrong}; "
        f"rebuild it with `{rebuild_command(row['round'])}`",
        wrong,
    )


def _verified(row: dict) -> dict:
    """`row` with its hash checked; for a store on S3 with `path` this machine's copy of it."""
    if object_store.is_remote(row["path"]):
        return {**row, "path": str(fetch(row))}
    wrong = problem(row)
    if wrong is not None:
        raise CheckpointDamaged(*_damage(row, wrong))
    return row


def verify(row: dict) -> bool:
    return folder_sha256(row["path"]) == row["sha256"]
