"""What `asymre run` checks before its first stage: the store, the rounds and `--from-stage` against what the
store holds, the model, the data and the stored files of the experiment. A wrong input then costs one message
and writes nothing (no table version, not even a `failed` stage run)."""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from pathlib import Path

import polars as pl

from flows.materialize import Plan, position
from flows.pipeline import PIPELINE, STAGES
from stages.config import ExperimentConfig
from storage import lineage, tables
from storage.schemas import PARTITIONS, SCHEMAS

TINY_POSITIONS = 64  # builtin:tiny's max_position_embeddings (stages/models.py build_tiny_model)
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class PreflightError(ValueError):
    """An input of `asymre run` is wrong; nothing was written. The message names the input and the fix."""


def check_run(cfg: ExperimentConfig, rounds: int, plan: Plan) -> None:
    """Everything that can be checked before a stage runs, cheapest first."""
    if rounds < 1:
        raise PreflightError(f"--rounds {rounds}: an experiment runs at least 1 round")
    check_store(cfg.store)
    check_plan(cfg, rounds, plan)
    check_stored_files(cfg.store, cfg.name)
    if base_will_run(cfg, plan):
        check_model(cfg.model.name)
    check_prompts(cfg)


def check_store(store: str) -> None:
    """The store is a folder this process can write into (created if missing), or a prefix of an S3 bucket that
    takes an object."""
    if "://" in store:
        from storage.object_store import StoreUnreachable, check_writable

        try:
            check_writable(store)
        except StoreUnreachable as err:
            raise PreflightError(str(err)) from None
        return
    root = Path(store)
    if root.exists() and not root.is_dir():
        raise PreflightError(f"--store {root} is a file; give a folder (it is made if missing)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".asymre-write-test-"):
            pass
    except OSError as err:
        raise PreflightError(
            f"--store {root} is not writable ({err.strerror or err}); give a folder you can write to"
        ) from None


def check_plan(cfg: ExperimentConfig, rounds: int, plan: Plan) -> None:
    """`--from-stage S --round k` reuses every stage before (k, S) as stored: each must have finished."""
    if plan.from_stage is None:
        return
    k, flag = plan.from_round, f"--from-stage {plan.from_stage} --round {plan.from_round}"
    if k < 0:
        raise PreflightError(f"{flag}: rounds are numbered from 0")
    if not PIPELINE[plan.from_stage].per_round and k != 0:
        raise PreflightError(f"{flag}: {plan.from_stage} runs once, before round 0; use --round 0")
    if k >= rounds:
        raise PreflightError(f"{flag}: round {k} is not among the rounds to run (0..{rounds - 1}); raise --rounds")
    done = lineage.runs(cfg.store, cfg.name).filter(pl.col("status") == "done")
    finished = set(zip(done["stage"].to_list(), done["round"].to_list(), strict=True))
    complete = lineage.completed_rounds(cfg.store, cfg.name)
    for stage, r in _nodes(rounds):
        if plan.reuse_as_stored(stage, r) and (stage, r) not in finished:
            if not finished:
                raise PreflightError(
                    f"{flag}: experiment {cfg.name} has nothing stored in {cfg.store} yet; run without --from-stage"
                )
            raise PreflightError(
                f"{flag} reuses what comes before it as stored, but stage {stage} of round {r} never finished "
                f"(experiment {cfg.name} has rounds 0..{complete - 1} complete); use --round {complete} or lower, "
                "or run without --from-stage to continue"
                if complete
                else f"{flag} reuses what comes before it as stored, but stage {stage} never finished; "
                "run without --from-stage to continue"
            )


def _nodes(rounds: int) -> list[tuple[str, int]]:
    """(stage, round) of every stage run of rounds 0..rounds−1, as the flow records them."""
    nodes = [("prompts", 0), ("base", 0), ("eval", 0)]
    nodes += [(s, k) for k in range(rounds) for s in STAGES if PIPELINE[s].per_round and s != "eval"]
    nodes += [("eval", k + 1) for k in range(rounds)]
    return sorted(nodes, key=lambda node: position(*node))


def base_will_run(cfg: ExperimentConfig, plan: Plan) -> bool:
    """Whether checkpoint 0 is (re)built from model.name, i.e. whether the model must be loadable: not when a
    finished base stage holds this config's stage key."""
    from flows.pipeline import Settings, stage_key

    stored = lineage.last_done(cfg.store, cfg.name, 0, "base")
    if stored is None or plan.force("base", 0):
        return True
    prompts = lineage.last_done(cfg.store, cfg.name, 0, "prompts")
    if prompts is None:
        return True
    stage = PIPELINE["base"]
    return stage_key(stage, Settings(cfg, stage), [prompts["stage_key"]]) != stored["stage_key"]


def check_model(name: str) -> None:
    """model.name is builtin:tiny, a GGUF file, a folder `save_pretrained` wrote, or a hub id that is cached or
    reachable."""
    if name.startswith("builtin:"):
        if name != "builtin:tiny":
            raise PreflightError(f"model.name {name!r}: the only built-in model is builtin:tiny")
        return
    from stages import gguf
    from stages.models import _looks_local

    if gguf.is_gguf(name):
        try:
            gguf.locate(name)
            gguf.require_packages()
        except gguf.GGUFError as err:
            raise PreflightError(str(err)) from None
    elif _looks_local(name):
        check_model_folder(Path(name).expanduser())
    else:
        check_hub_model(name)


def check_model_folder(path: Path) -> None:
    fix = "give the folder `save_pretrained` wrote (config.json, weights, tokenizer files)"
    if not path.exists():
        raise PreflightError(f"model.name {path}: no such file or folder; {fix}")
    if not path.is_dir():
        raise PreflightError(f"model.name {path} is a file; {fix}")
    config = path / "config.json"
    if not config.is_file():
        raise PreflightError(f"model.name {path}: no config.json in the folder; {fix}")
    try:
        json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PreflightError(f"model.name {path}: config.json is not readable JSON ({err}); {fix}") from None
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        raise PreflightError(f"model.name {path}: no weights (*.safetensors or pytorch_model*.bin); {fix}")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise PreflightError(f"model.name {path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); {fix}")


def check_hub_model(name: str) -> None:
    """A hub id must be in the local cache, or the hub must answer for it (else the load would fail after the
    prompts stage ran, or hang on a network that is not there)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    copy = (
        f"download it where there is a network (`hf download {name}`) and copy {HF_HUB_CACHE} here, or give a "
        "local folder that `save_pretrained` wrote"
    )
    if HF_HUB_OFFLINE:
        raise PreflightError(
            f"model.name {name}: not in the local cache {HF_HUB_CACHE} and HF_HUB_OFFLINE is set; {copy}"
        )
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(name, timeout=20)
    except GatedRepoError:
        raise PreflightError(f"model.name {name} is gated: accept its terms on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise PreflightError(f"model.name {name}: no such model on the hub (nor a local folder of that name)") from None
    except Exception as err:  # any network failure (requests, httpx, timeouts): the hub cannot be reached
        reason = str(err).splitlines()[0][:160]
        raise PreflightError(
            f"model.name {name}: not cached here and the hub cannot be reached ({reason}); {copy}"
        ) from None


def check_prompts(cfg: ExperimentConfig) -> None:
    """Read the data source as the prompts stage will (so a bad file or row is named now), and make sure
    builtin:tiny's 64 positions hold its prompts."""
    from stages.prompts import PromptDataError, read_prompts

    source = cfg.prompts.source
    try:
        prompts = read_prompts(cfg.prompts, cfg.seed).frame
    except PromptDataError as err:
        raise PreflightError(str(err)) from None
    except (OSError, ValueError) as err:
        raise PreflightError(f"prompts ({source}): {err}") from None
    if cfg.model.name == "builtin:tiny" and source != "builtin":
        check_tiny_fits(cfg, prompts)


def check_tiny_fits(cfg: ExperimentConfig, prompts: pl.DataFrame) -> None:
    from stages.models import build_tiny_tokenizer
    from stages.prompts import render_prompts

    tokenizer = build_tiny_tokenizer()
    rendered = render_prompts(prompts, tokenizer, cfg.prompts.template, cfg.prompts.use_chat_template)
    longest = max(len(ids) for ids in tokenizer(rendered["text"].to_list())["input_ids"])
    new = max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens or 0)
    if longest + new > TINY_POSITIONS:
        raise PreflightError(
            f"model.name=builtin:tiny holds {TINY_POSITIONS} positions, and the longest prompt of {cfg.prompts.source} "
            f"takes {longest} plus {new} new tokens (its character vocabulary covers digits and + - * = ? : Q A only); "
            "use it with prompts.source=builtin, or set model.name to a real model"
        )


def check_stored_files(store: str, experiment: str) -> None:
    """Every data file the latest version of each table lists for this experiment is there (a deleted file
    would fail a stage in the middle of a round); names the run that rebuilds a missing one."""
    if "://" in store:
        return
    for name in SCHEMAS:
        if name.startswith("bandit_"):
            continue
        where = {"experiment": experiment} if "experiment" in PARTITIONS[name] else {}
        try:
            tables.files(store, name, where=where, must_exist=True)
        except tables.DataFileMissing as err:
            raise PreflightError(f"{err}: {rebuild_hint(err.table, err.partition)}") from None


def rebuild_hint(table: str, partition: dict) -> str:
    """How to rebuild one partition of `table` (the rule lives with `asymre check`, storage/doctor.py)."""
    from storage.doctor import rebuild

    return rebuild(table, partition.get("round"))


# ---- a full disk -----------------------------------------------------------------------------------


def disk_full(err: BaseException | None) -> BaseException | None:
    """The error in `err`'s chain that says the disk is full (an OSError ENOSPC, or delta-rs/safetensors text
    carrying "os error 28"), else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "errno", None) == errno.ENOSPC or any(
            s in str(err) for s in ("No space left on device", "os error 28")
        ):
            return err
        err = err.__cause__ or err.__context__
    return None


def disk_full_message(store: str, experiment: str, err: BaseException) -> str:
    from flows import stop

    stage = stop.FAILED[-1] if stop.FAILED else "a stage"
    free = shutil.disk_usage(store).free if Path(store).exists() else 0
    need = round_size(store, experiment)
    size = (
        f"a round of experiment {experiment} writes about {_mb(sum(need[1:]))} (round {need[0]}: tables "
        f"{_mb(need[1])}, checkpoint {_mb(need[2])})"
        if need
        else "no round of this experiment has finished yet to measure what one writes"
    )
    return (
        f"disk full: {stage} could not write to the store {store} ({_mb(free)} free); {size}. The store keeps "
        "every finished stage (the failed write left the table at its previous version): free space and rerun "
        "the same command to resume"
    )


def round_size(store: str, experiment: str) -> tuple[int, int, int] | None:
    """(round, bytes of its table partitions, bytes of the checkpoint it trained) of the experiment's last
    finished round, or None."""
    from storage.checkpoints import checkpoint_dir

    finished = lineage.completed_rounds(store, experiment)
    if finished == 0:
        return None
    k = finished - 1
    data = 0
    for name in SCHEMAS:
        if PARTITIONS[name] == ["experiment", "round"]:
            for uri in tables.files(store, name, where={"experiment": experiment, "round": k}):
                data += _size(Path(uri.removeprefix("file://")))
    folder = checkpoint_dir(store, experiment, k + 1)
    weights = sum(_size(f) for f in folder.rglob("*")) if folder.is_dir() else 0
    return k, data, weights


def _size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"
