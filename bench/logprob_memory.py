"""Completion log-probs, before (one LM-head call over all completion positions, then an fp32 log-softmax over
the whole vocabulary) against after (CompletionScorer: the LM head chunk_tokens positions at a time,
checkpointed under autograd): peak memory and time of forward + backward of the summed log-probs (the
trainer's step) and of the no-grad recompute (log μ).

    python bench/logprob_memory.py [--rows 64] [--tokens 512] [--device cpu|cuda] [--reps N]
                                   [--chunk-tokens 8192 1024 …] [--dry-run]

The model is a Qwen2 with Qwen's vocabulary (151936) and a small body (hidden 64, 2 layers, untied head):
what the change is about is the LM head and the log-softmax, whose size is rows × tokens × vocab.
Every (mode, variant) runs in its own fresh child process, variants alternating (before, after, before, …).
Peak memory is measured after the model and the batch are built: on CUDA torch.cuda.max_memory_allocated
over memory_allocated at that point; on CPU the process's resident high-water mark (VmHWM, reset to the
current RSS through /proc/self/clear_refs; ru_maxrss where the kernel refuses) over the RSS at that point.
On CPU each child's address space is limited to what it had plus ~90 % of MemAvailable, so a variant that
does not fit stops with an allocation error (reported as "oom") instead of waking the OOM killer; a child
killed anyway is reported as "killed". Without --rows on CPU the rows are halved from 64 until the
before variant's estimated peak (3 fp32 copies of rows × (tokens + 1) × vocab) fits half of MemAvailable,
and the header says so.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import resource
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
from measure import ROOT, current_rss_mb, peak_rss_mb, print_machine, print_table, reset_peak

sys.path.insert(0, str(ROOT))

from stages.config import RolloutConfig
from stages.logprobs import CHUNK_TOKENS, CompletionScorer, left_pad_batch

VOCAB = 151936  # Qwen2 / Qwen2.5
FULL_ROWS, FULL_TOKENS = 64, 512
BEFORE_COPIES = 3  # fp32 rows × (tokens + 1) × vocab buffers the old formula holds at its peak (measured)
SEED = 0


# ---------------------------------------------------------------- one measurement (child process)


def build_model(hidden: int, layers: int, max_len: int, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        intermediate_size=4 * hidden,
        tie_word_embeddings=False,
        max_position_embeddings=max_len,
    )
    torch.manual_seed(SEED)
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


def build_batch(rows: int, tokens: int, prompt: int, device: torch.device):
    """Random token ids; prompt lengths vary from prompt/2 to prompt, so rows are left-padded."""
    generator = torch.Generator().manual_seed(SEED)
    prompt_lengths = torch.randint(max(1, prompt // 2), prompt + 1, (rows,), generator=generator).tolist()
    prompts = [torch.randint(VOCAB, (n,), generator=generator).tolist() for n in prompt_lengths]
    completions = torch.randint(VOCAB, (rows, tokens), generator=generator).tolist()
    batch = left_pad_batch(prompts, completions)
    return type(batch)(*(t.to(device) for t in batch))


def old_formula(lm, batch, temperature: float) -> torch.Tensor:
    """CompletionScorer.forward before chunking: logits of every completion position at once, fp32 log-softmax."""
    width = batch.completion_mask.shape[1]
    logits = lm(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=width + 1,
        use_cache=False,
    ).logits[:, :-1]
    targets = batch.input_ids[:, -width:]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def limit_address_space() -> None:
    """CPU: fail allocations beyond ~90 % of MemAvailable instead of having the kernel kill something."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    vm_size = int(status["VmSize"].split()[0]) * 1024
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    limit = vm_size + int(0.9 * available)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def measure_one(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    lm = build_model(args.hidden, args.layers, args.prompt + args.tokens + 1, device, dtype)
    batch = build_batch(args.rows, args.tokens, args.prompt, device)
    width = batch.completion_mask.shape[1]
    if args.variant == "before":
        score = lambda: old_formula(lm, batch, args.temperature)  # noqa: E731
    else:
        scorer = CompletionScorer(lm, chunk_tokens=args.chunk)
        score = lambda: scorer(  # noqa: E731
            batch.input_ids, batch.attention_mask, batch.position_ids, width, args.temperature
        )
    lm.train(args.mode == "train")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        limit_address_space()
        resettable = reset_peak()
        base = current_rss_mb() if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    try:
        if args.mode == "train":
            (score() * batch.completion_mask).sum().backward()
        else:
            with torch.no_grad():
                score()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "alloc" not in str(error).lower():
            raise
        return {"status": "oom", "error": str(error).splitlines()[0][:200]}
    seconds = time.perf_counter() - started
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak_mb = (peak_rss_mb() if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024) - base
    return {"status": "ok", "peak_mb": peak_mb, "seconds": seconds}


# ---------------------------------------------------------------- the comparison (parent process)


def _child(args: argparse.Namespace, send) -> None:
    try:
        send.send(measure_one(args))
    except Exception as error:
        send.send({"status": f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"})


def run_child(args: argparse.Namespace, mode: str, variant: str, chunk: int) -> dict:
    """measure_one in a fresh process: forked from a fork server that has imported torch and transformers
    and run nothing (no allocations, threads or CUDA context of ours), so children start in a second."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "transformers.models.qwen2.modeling_qwen2"])
    receive, send = context.Pipe(duplex=False)
    process = context.Process(
        target=_child,
        args=(argparse.Namespace(**{**vars(args), "mode": mode, "variant": variant, "chunk": chunk}), send),
    )
    process.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:  # died without a word
        result = None
    process.join()
    if process.exitcode is not None and process.exitcode < 0:
        name = signal.Signals(-process.exitcode).name
        why = " (out of memory?)" if process.exitcode == -signal.SIGKILL else ""
        return {"status": f"killed: {name}{why}"}
    if result is None:
        return {"status": f"failed (exit {process.exitcode})"}
    return result


def available_bytes() -> int:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(meminfo["MemAvailable"].split()[0]) * 1024


def before_bytes(rows: int, tokens: int) -> int:
    return BEFORE_COPIES * rows * (tokens + 1) * VOCAB * 4


def choose_rows(args: argparse.Namespace) -> str | None:
    """Fill in args.rows when not given; a note for the header when the CPU size is cut down."""
    if args.rows is not None:
        return None
    args.rows = FULL_ROWS
    if args.device != "cpu":
        return None
    budget = available_bytes() // 2  # others share the machine
    while args.rows > 1 and before_bytes(args.rows, args.tokens) > budget:
        args.rows //= 2
    if args.rows == FULL_ROWS:
        return None
    return (
        f"CPU: {FULL_ROWS} rows × {args.tokens} tokens would need ~{before_bytes(FULL_ROWS, args.tokens) / 1e9:.0f} GB "
        f"for 'before' ({BEFORE_COPIES} fp32 copies of rows × (tokens + 1) × {VOCAB}); MemAvailable is "
        f"{available_bytes() / 1e9:.1f} GB, so this run measures {args.rows} rows × {args.tokens} tokens "
        f"(--rows to force a size; the full size is meant for a GPU: --device cuda)"
    )


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["status"] == "ok"]
    if len(ok) < len(runs):
        return {"status": next(r["status"] for r in runs if r["status"] != "ok"), "peak_mb": None, "seconds": None}
    return {
        "status": "ok",
        "peak_mb": statistics.median(r["peak_mb"] for r in ok),
        "seconds": statistics.median(r["seconds"] for r in ok),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=None, help=f"default {FULL_ROWS} (fewer on CPU, see above)")
    parser.add_argument("--tokens", type=int, default=FULL_TOKENS, help="completion tokens per row")
    parser.add_argument("--prompt", type=int, default=32, help="longest prompt (shortest: half of it)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="cuda: bf16, cpu: fp32")
    parser.add_argument("--temperature", type=float, default=RolloutConfig().temperature)
    parser.add_argument("--chunk-tokens", type=int, nargs="+", default=[CHUNK_TOKENS], help="after variants")
    parser.add_argument("--reps", type=int, default=1, help="fresh processes per (mode, variant), alternating")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes: a smoke test in well under a minute")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.dry_run:
        args.rows, args.tokens, args.prompt, args.hidden = args.rows or 2, 16, 4, 16
        args.chunk_tokens = [8]
    note = choose_rows(args)
    print_machine()
    print(
        f"device {args.device} ({args.dtype}) | vocab {VOCAB}, hidden {args.hidden}, {args.layers} layers | "
        f"{args.rows} rows × {args.tokens} completion tokens (+ prompts ≤ {args.prompt}) | "
        f"temperature {args.temperature} | reps {args.reps} | peak: "
        + ("torch.cuda.max_memory_allocated" if args.device != "cpu" else "VmHWM growth over the RSS after the build")
    )
    if note:
        print(note)
    variants = [("before", 0)] + [("after", c) for c in args.chunk_tokens]
    runs: dict[tuple, list[dict]] = {(m, v, c): [] for m in ("train", "recompute") for v, c in variants}
    for _ in range(args.reps):
        for mode in ("train", "recompute"):
            for variant, chunk in variants:
                runs[mode, variant, chunk].append(run_child(args, mode, variant, chunk or CHUNK_TOKENS))
    table, ratios = [], []
    for (mode, variant, chunk), result in runs.items():
        stats = summarise(result)
        table.append(
            {
                "mode": "fwd+bwd" if mode == "train" else "no-grad recompute",
                "variant": variant,
                "chunk_tokens": chunk or None,
                "rows×tokens": f"{args.rows}×{args.tokens}",
                "status": stats["status"],
                "peak_mb": stats["peak_mb"],
                "seconds": stats["seconds"],
            }
        )
        before = summarise(runs[mode, "before", 0])
        if variant == "after":
            both = stats["status"] == before["status"] == "ok"
            ratios.append(
                {
                    "mode": table[-1]["mode"],
                    "chunk_tokens": chunk,
                    "peak after/before": stats["peak_mb"] / before["peak_mb"] if both else None,
                    "time after/before": stats["seconds"] / before["seconds"] if both else None,
                }
            )
    print()
    print_table(table)
    print()
    print_table(ratios)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
