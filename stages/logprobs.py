"""The policy's forward pass, shared by every stage that scores tokens: per-token log-probs of completions
(with or without grad), the teacher-forced exact-match check, and the one lr warmup rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch


class LeftPadBatch(NamedTuple):
    input_ids: torch.Tensor  # (B, T) prompt + completion, left-padded so every completion ends at T
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T) cumsum(mask) - 1, clamped: Qwen2 and friends need it with left padding
    completion_mask: torch.Tensor  # (B, C) 1 where column j of the last C positions is a completion token


def left_pad_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int = 0):
    """Pack (prompt, completion) pairs right-aligned; completion token j of row i sits at column C - len_i + j."""
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(s) for s in seqs)
    c_width = max(len(c) for c in completion_ids)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), c_width), dtype=torch.bool)
    for i, (s, c) in enumerate(zip(seqs, completion_ids, strict=True)):
        input_ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, width - len(s) :] = 1
        completion_mask[i, c_width - len(c) :] = True
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return LeftPadBatch(input_ids, attention_mask, position_ids, completion_mask)


class CompletionScorer(torch.nn.Module):
    """A causal LM that returns the log-probs of completion tokens instead of logits. Under FSDP2 it is the
    root module (its decoder layers are sharded units), so every forward the trainer makes goes through it.

    forward(...) -> (B, C) log-softmax(logits / temperature) at the completion tokens, with top-k / top-p
    truncation (renormalised over the kept tokens, as the samplers store them) when asked; garbage where
    completion_mask is 0.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        completion_width: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> torch.Tensor:
        if top_k or top_p < 1.0:
            raise NotImplementedError("top-k / top-p truncation")
        logits = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=completion_width + 1,
            use_cache=False,
        ).logits[:, :-1]  # (B, C, V): position t predicts token t+1
        targets = input_ids[:, -completion_width:]  # (B, C)
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def scorer(model: torch.nn.Module) -> CompletionScorer:
    """`model` itself when it is a CompletionScorer (e.g. FSDP-wrapped), else a scorer around it."""
    return model if isinstance(model, CompletionScorer) else CompletionScorer(model)


def completion_logprobs(
    model, batch: LeftPadBatch, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """(B, C) log-probs at the completion tokens (garbage where completion_mask is 0), from a causal LM or a
    CompletionScorer. Differentiable: the trainer calls it under autograd."""
    return scorer(model)(
        batch.input_ids, batch.attention_mask, batch.position_ids, batch.completion_mask.shape[1], temperature,
        top_k, top_p,
    )  # fmt: skip


def token_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    temperature: float,
    pad_id: int,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y_t | x, y_<t) at temperature T for every completion token, (B, T) with token t of each
    completion at column t, and its (B, T) mask: `completion_logprobs` re-aligned to the left."""
    device = next(model.parameters()).device
    batch = LeftPadBatch(*(t.to(device) for t in left_pad_batch(prompts, completions, pad_id)))
    right = completion_logprobs(model, batch, temperature, top_k, top_p)  # (B, C): completion i ends at column C
    width = right.shape[1]
    lengths = torch.tensor([len(c) for c in completions], device=device)
    columns = torch.arange(width, device=device)
    mask = columns.unsqueeze(0) < lengths.unsqueeze(1)  # (B, C)
    index = ((width - lengths).unsqueeze(1) + columns.unsqueeze(0)).clamp(max=width - 1)
    return right.gather(1, index), mask.float()


@torch.no_grad()
def recompute_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    temperature: float,
    batch_size: int,
    pad_id: int = 0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> list[list[float]]:
    """Per completion token log-softmax(logits / temperature) of every row ([] for an empty completion),
    truncated to top-k / top-p and renormalised when those are set (as the samplers store μ).

    Rows go through in order of prompt + completion length (less padding), batch_size at a time, and come
    back in their own order.
    """
    lengths = np.array([len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)])
    order = np.argsort(lengths, kind="stable")
    out: list[list[float]] = [[] for _ in prompt_ids]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        completions = [list(completion_ids[i]) for i in chunk]
        if max(len(c) for c in completions) == 0:
            continue  # nothing to score, and a zero-width completion slice would take the whole row
        logp, _ = token_logprobs(
            model, [list(prompt_ids[i]) for i in chunk], completions, temperature, pad_id, top_k, top_p
        )
        logp = logp.cpu()
        for j, i in enumerate(chunk):
            out[i] = logp[j, : len(completions[j])].tolist()
    return out


def greedy_exact_match(model, batch: LeftPadBatch) -> float:
    """Share of rows whose greedy answer is exactly the gold, for a batch of (prompt, gold answer + eos): with
    teacher forcing, greedy decoding emits the gold (and then stops) iff the argmax is the gold token at every
    answer position, eos included."""
    model.eval()
    with torch.no_grad():
        device = next(model.parameters()).device
        mask = batch.attention_mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=mask, position_ids=position_ids).logits
        width = batch.completion_mask.shape[1]
        predicted = logits[:, -width - 1 : -1].argmax(-1)  # (B, C): the prediction for each answer token
        target = batch.input_ids[:, -width:].to(device)
        hit = (predicted == target) | ~batch.completion_mask.to(device).bool()
    return float(hit.all(-1).float().mean())


def warmup_lr(step: int, peak: float, warmup_steps: int) -> float:
    """The lr of optimizer step `step` (from 0): linear warmup to `peak` over `warmup_steps`, then flat."""
    return peak * min(1.0, (step + 1) / warmup_steps) if warmup_steps else peak
