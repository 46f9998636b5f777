"""The GPU check, one command: everything GPU-side of asymre on one machine, no downloads, < 8 minutes on
one H100/H200.

    python bench/gpu.py              # on a GPU machine (vLLM installed: pip install -e ".[vllm]")
    python bench/gpu.py --dry-run    # the same steps at toy sizes on CPU (CI runs this)

It builds a Qwen2-architecture policy with random weights locally (about 0.5B parameters: hidden 896,
24 layers, 14 heads / 2 KV heads, vocab 151,936, tied embeddings, as Qwen2.5-0.5B) and a tokenizer with
the same vocabulary, then prints, one section each:

  1. vLLM: the rollouts stage's engine (stages.rollout.run_engine) ÷ bare `LLM.generate` on the same
     prompts and sampling, generated tokens/s, engine start included and excluded (target ≥ 0.9);
  2. vLLM ÷ hf engine (transformers generate), tokens/s on the same prompts;
  3. memory-bounded log-probs (bench/logprob_memory.py on this device);
  4. one whole round end to end (`asymre run --rounds 1`) with every accelerator stage in a `process`
     launcher and train under torchrun on all local GPUs: wall time per stage, and the train stage's
     tokens/s and model FLOP utilisation in bf16 (target ≥ 35 %), then the train stage again on one GPU
     when there are several.

Sections that cannot run here say why (no GPU, vLLM not installed) instead of failing; --dry-run runs
2–4 on CPU at toy sizes (hf engine, gloo ranks) and must pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# bf16 dense peak of the accelerators this script targets (TFLOP/s, no sparsity), for MFU
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    prompts: int  # prompts per generation benchmark
    samples: int  # completions per prompt
    max_new_tokens: int
    hf_prompts: int  # the hf engine is slow: fewer prompts, tokens/s compared
    round_prompts: int  # prompts per round of the end-to-end run
    test_prompts: int


GPU = Size(896, 24, 14, 2, 4864, 151_936, 256, 4, 256, 32, 256, 128)
DRY = Size(64, 2, 4, 2, 128, 2_048, 8, 2, 8, 4, 8, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on CPU (hf engine, gloo ranks)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the model and store (default: tmp)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    size = GPU if cuda else DRY
    gpus = torch.cuda.device_count() if cuda else 0
    print(machine_line(cuda, gpus))
    if not cuda and not args.dry_run:
        print("no GPU here: run with --dry-run for the CPU check, or on a GPU machine")
        sys.exit(2)
    work = Path(args.out or tempfile.mkdtemp(prefix="asymre-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    folder, params = build_policy(work / "policy", size, cuda)
    print(f"policy: Qwen2 architecture, {params / 1e6:.1f}M parameters, random weights, at {folder}")
    prompt_ids = arithmetic_prompt_ids(folder, size.prompts)

    section("1. vLLM stage vs bare LLM.generate")
    if not cuda:
        print("skipped: needs a GPU")
    elif not has_vllm():
        print('skipped: vllm is not installed (pip install -e ".[vllm]")')
    else:
        vllm_vs_bare(folder, prompt_ids, size)

    section("2. vLLM vs hf engine")
    hf_tps = hf_tokens_per_s(folder, prompt_ids[: size.hf_prompts], size, cuda)
    print(f"hf engine: {hf_tps:,.0f} generated tokens/s ({size.hf_prompts} prompts × {size.samples})")
    if cuda and has_vllm():
        vllm_tps = VLLM_RESULT.get("stage_tps")
        if vllm_tps:
            print(f"vLLM ÷ hf: {vllm_tps / hf_tps:.1f}×")
    else:
        print("vLLM ÷ hf: skipped (no GPU or no vllm)")

    section("3. memory-bounded log-probs")
    logprob_memory(cuda, args.dry_run)

    section("4. one round end to end, process launchers, train under torchrun")
    round_end_to_end(work, folder, size, cuda, gpus, params)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


# ---------------------------------------------------------------- the policy


def build_tokenizer(vocab: int):
    """A fast tokenizer with `vocab` tokens: the built-in policy's characters (prompts encode to them) and
    filler tokens up to the size (so every id the random model samples decodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from stages.models import TINY_CHARS, TINY_SPECIALS

    tokens = [*TINY_SPECIALS, *TINY_CHARS]
    tokens += [f"<t{i}>" for i in range(vocab - len(tokens))]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def build_policy(folder: Path, size: Size, cuda: bool) -> tuple[Path, int]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(size.vocab)
    config = Qwen2Config(
        vocab_size=size.vocab, hidden_size=size.hidden, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, intermediate_size=size.intermediate,
        tie_word_embeddings=True, max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, dtype="bfloat16" if cuda else "float32",
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32)
    params = sum(p.numel() for p in model.parameters())
    if not (folder / "config.json").is_file():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder, params


def arithmetic_prompt_ids(folder: Path, n: int) -> list[list[int]]:
    from stages.config import PromptsConfig
    from stages.models import load_tokenizer
    from stages.prompts import builtin_prompts
    from stages.rollout import encode_prompts

    tokenizer = load_tokenizer(str(folder))
    frame = builtin_prompts(PromptsConfig(n_train=n, n_test=1), 0)
    questions = frame.filter(split="train")["prompt"].to_list()[:n]
    return encode_prompts(tokenizer, [f"Q: {q} A:" for q in questions])


# ---------------------------------------------------------------- 1–2 generation

VLLM_RESULT: dict[str, float] = {}


def has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def vllm_vs_bare(folder: Path, prompt_ids: list[list[int]], size: Size) -> None:
    """Alternating stage / bare, twice each, each in a fresh process (a vLLM engine per process, as a round)."""
    runs: dict[str, list[dict]] = {"stage": [], "bare": []}
    for _ in range(2):
        for kind in runs:
            runs[kind].append(
                _child("vllm_child", str(folder), kind, json.dumps(prompt_ids), json.dumps(size.__dict__))
            )
    for kind, results in runs.items():
        best = min(results, key=lambda r: r["total_s"])
        print(
            f"{kind:<6} {best['tokens']:>9,} tokens  generate {best['generate_s']:6.1f} s "
            f"({best['tokens'] / best['generate_s']:,.0f} tok/s)  with engine start {best['total_s']:6.1f} s"
        )
    stage, bare = (min(r["generate_s"] for r in runs[k]) for k in ("stage", "bare"))
    stage_total, bare_total = (min(r["total_s"] for r in runs[k]) for k in ("stage", "bare"))
    tokens = runs["stage"][0]["tokens"]
    VLLM_RESULT["stage_tps"] = tokens / stage
    print(f"stage ÷ bare tokens/s: {bare / stage:.3f} generation only, {bare_total / stage_total:.3f} with start "
          f"(target ≥ 0.9)")  # fmt: skip


def vllm_child(folder: str, kind: str, prompt_ids: str, size: str) -> dict:
    from stages.models import load_tokenizer
    from stages.rollout import Engine, SamplingSpec, run_engine

    ids, s = json.loads(prompt_ids), Size(**json.loads(size))
    spec = SamplingSpec(s.samples, True, 1.0, 0, 1.0, s.max_new_tokens)
    started = time.perf_counter()
    if kind == "stage":
        import vllm

        init = vllm.LLM.__init__
        built: dict[str, float] = {}

        def timed_init(self, *a, **k):  # the engine start, to split it from the stage's generation time
            t = time.perf_counter()
            init(self, *a, **k)
            built["s"] = time.perf_counter() - t

        vllm.LLM.__init__ = timed_init
        tokenizer = load_tokenizer(folder)
        engine = Engine("vllm", 0, 0.85, engines=1)  # one engine, as the bare side has
        samples = run_engine(None, tokenizer, ids, spec, engine, seed=0, device="cuda",
                             model_path=folder)  # fmt: skip
        total = time.perf_counter() - started
        tokens = sum(len(x.completion_ids) for x in samples)
        return {"tokens": tokens, "total_s": total, "generate_s": total - built["s"]}
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=folder, seed=0, dtype="auto", max_model_len=max(map(len, ids)) + s.max_new_tokens,
              gpu_memory_utilization=0.85, logprobs_mode="processed_logprobs",
              max_num_seqs=256, enable_prefix_caching=True)  # the stage's defaults  # fmt: skip
    built = time.perf_counter()
    params = SamplingParams(n=s.samples, temperature=1.0, max_tokens=s.max_new_tokens, logprobs=0, seed=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
    done = time.perf_counter()
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"tokens": tokens, "total_s": done - started, "generate_s": done - built}


def hf_tokens_per_s(folder: Path, prompt_ids: list[list[int]], size: Size, cuda: bool) -> float:
    from stages.models import load_policy
    from stages.rollout import SamplingSpec, hf_generate

    device = "cuda" if cuda else "cpu"
    model, tokenizer = load_policy(str(folder), "bfloat16" if cuda else "float32", device)
    spec = SamplingSpec(size.samples, True, 1.0, 0, 1.0, size.max_new_tokens)
    hf_generate(model, tokenizer, prompt_ids[:2], spec, batch_size=4096, seed=0, device=device)  # warm-up
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    samples = hf_generate(model, tokenizer, prompt_ids, spec, batch_size=4096, seed=0, device=device)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    del model
    if cuda:
        torch.cuda.empty_cache()
    return sum(len(s.completion_ids) for s in samples) / elapsed


# ---------------------------------------------------------------- 3 log-probs


def logprob_memory(cuda: bool, dry_run: bool) -> None:
    script = ROOT / "bench" / "logprob_memory.py"
    if not script.is_file():
        print("skipped: bench/logprob_memory.py is missing")
        return
    cmd = [sys.executable, str(script), "--device", "cuda" if cuda else "cpu"]
    if dry_run:
        cmd.append("--dry-run")
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(result.stdout.rstrip())
    if result.returncode != 0:
        raise SystemExit(f"bench/logprob_memory.py failed ({result.returncode}):\n{result.stderr[-3000:]}")


# ---------------------------------------------------------------- 4 a round


def round_config(folder: Path, size: Size, cuda: bool, ranks: int) -> dict:
    return {
        "name": "gpu-check",
        "device": "cuda" if cuda else "cpu",
        "prompts": {"per_round": size.round_prompts, "n_test": size.test_prompts, "use_chat_template": False},
        "model": {"name": str(folder), "dtype": "bfloat16" if cuda else "float32"},
        "rollout": {
            "engine": "vllm" if cuda and has_vllm() else "hf",
            "samples_per_prompt": size.samples,
            "max_new_tokens": size.max_new_tokens,
        },
        "train": {"batch_size": 256 if cuda else 8, "micro_batch_size": 32 if cuda else 4, "lr": 1e-6},
        "eval": {"sampled": 0},
        "launch": {
            "base": {"kind": "process"},
            "rollouts": {"kind": "process"},
            "eval": {"kind": "process"},
            "train": {"kind": "torchrun", "nproc_per_node": ranks},
        },
    }


def round_end_to_end(work: Path, folder: Path, size: Size, cuda: bool, gpus: int, params: int) -> None:
    import yaml

    ranks = max(gpus, 1) if cuda else 2
    store = work / "store"
    config = work / "round.yaml"
    config.write_text(yaml.safe_dump(round_config(folder, size, cuda, ranks)))
    env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    cmd = [sys.executable, "-m", "flows.cli", "run", str(config), "--rounds", "1", "--store", str(store)]
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"the round failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    print(f"`asymre run --rounds 1`: {wall:.0f} s end to end (train on {ranks} {'GPU' if cuda else 'gloo'} ranks)")
    print_stage_walls(store)
    train_throughput(store, params, cuda, ranks)
    if cuda and gpus > 1:  # the same train stage on one GPU
        cmd1 = [*cmd, "--from-stage", "train", "--round", "0", "--set", "launch.train.nproc_per_node=1"]
        one = subprocess.run(cmd1, cwd=ROOT, env=env, capture_output=True, text=True)
        if one.returncode != 0:
            raise SystemExit(f"the 1-GPU train rerun failed:\n{one.stderr[-4000:]}")
        train_throughput(store, params, cuda, 1)


def print_stage_walls(store: Path) -> None:
    from storage import tables

    runs = tables.read(str(store), "stage_runs").filter(status="done").sort("created_at")
    for row in runs.select("stage", "round", "wall_s").iter_rows(named=True):
        print(f"  {row['stage']:<11} round {row['round']}  {row['wall_s']:7.1f} s")


def train_throughput(store: Path, params: int, cuda: bool, ranks: int) -> None:
    """Completion tokens/s from train_steps; MFU from every token the forward/backward passes see (prompt +
    completion of the selected rows) at 6·N FLOPs per token (fwd + bwd), over the steps' wall time."""
    import polars as pl

    from storage import tables

    steps = tables.read(str(store), "train_steps", experiment="gpu-check", round=0)
    selected = tables.read(str(store), "train_set", experiment="gpu-check", round=0).filter(pl.col("selected"))
    rollouts = tables.read(str(store), "rollouts", experiment="gpu-check", round=0)
    rows = selected.join(rollouts, on=["experiment", "round", "prompt_id", "sample_idx"])
    all_tokens = int((rows["prompt_token_ids"].list.len() + rows["completion_token_ids"].list.len()).sum())
    seconds = float((steps["tokens"] / steps["tokens_per_s"]).sum())
    tps = all_tokens / seconds
    label = f"{ranks} rank{'s' if ranks > 1 else ''}"
    line = f"train ({label}): {steps['tokens'].sum() / seconds:,.0f} completion tokens/s, {tps:,.0f} tokens/s in all"
    if cuda:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak:
            mfu = 6 * params * tps / (peak * 1e12 * ranks)
            line += f", MFU {100 * mfu:.1f} % of {peak:.0f} TFLOP/s bf16 per GPU (target ≥ 35 %)"
    print(line)


# ---------------------------------------------------------------- helpers


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def machine_line(cuda: bool, gpus: int) -> str:
    import platform

    device = f"{gpus} × {torch.cuda.get_device_name(0)}" if cuda else "CPU only"
    return (
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, {device}; torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}"
    )


def _child(fn: str, *args: str) -> dict:
    """Run `fn(*args)` of this file in a fresh Python process; its dict result."""
    code = f"import json, sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import gpu; " \
           f"print('RESULT ' + json.dumps(gpu.{fn}(*sys.argv[1:])))"  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{fn} failed:\n{result.stderr[-4000:]}")
    line = next(x for x in result.stdout.splitlines()[::-1] if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


if __name__ == "__main__":
    main()
