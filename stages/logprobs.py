"""The policy's forward pass, shared by every stage that scores tokens: per-token log-probs of completions
(with or without grad), the teacher-forced exact-match check, and the one lr warmup rule."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint


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


CHUNK_TOKENS = 1024  # completion positions whose logits (× vocab, fp32) exist at once: ~0.6 GB each at 151,936
# (8192 held a whole 8 × 512 batch in one chunk and saved nothing in training: bench/logprob_memory.py)
TRUNCATION_SHARE = 4  # top-k / top-p hold ~5 vocab-wide buffers per position (sort values, indices, …): ¼ the rows


class CompletionScorer(torch.nn.Module):
    """A causal LM that returns the log-probs of completion tokens instead of logits. Under FSDP2 it is the
    root module (its decoder layers are sharded units), so every forward the trainer makes goes through it.

    forward(...) -> (B, C) log-softmax(logits / temperature) at the completion tokens, with top-k / top-p
    truncation (renormalised over the kept tokens, as the samplers store them) when asked; garbage where
    completion_mask is 0.

    Memory: the decoder's last hidden state goes through the LM head `chunk_tokens` positions at a time, so
    at most chunk_tokens × vocab fp32 logits exist at once (not B × C × vocab); under autograd each chunk is
    checkpointed (only its hidden rows are kept, its logits are recomputed in backward). With top-k / top-p,
    whose sort holds more vocab-wide buffers, chunk_tokens // 4 positions at a time.
    """

    def __init__(self, lm: torch.nn.Module, chunk_tokens: int = CHUNK_TOKENS):
        super().__init__()
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be ≥ 1, not {chunk_tokens}")
        self.lm = lm
        self.chunk_tokens = chunk_tokens

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
        rows = input_ids.shape[0]
        if completion_width == 0:
            return torch.zeros((rows, 0), dtype=torch.float32, device=input_ids.device)
        hidden = _decoder(self.lm)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H), final norm applied
        hidden = hidden[:, -completion_width - 1 : -1].reshape(rows * completion_width, -1)  # t predicts t+1
        targets = input_ids[:, -completion_width:].reshape(-1)  # (B·C,)
        head = self.lm.get_output_embeddings()
        truncated = top_k > 0 or top_p < 1.0
        step = max(1, self.chunk_tokens // TRUNCATION_SHARE) if truncated else self.chunk_tokens
        score = functools.partial(
            _target_logprobs,
            head,
            softcap=_final_logit_softcapping(self.lm),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )
        grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
        pieces = []
        for start in range(0, targets.shape[0], step):
            h, t = hidden[start : start + step], targets[start : start + step]
            if grad:  # keep h only; the chunk's logits are made again in backward
                pieces.append(checkpoint(score, h, t, use_reentrant=False, preserve_rng_state=False))
            else:
                pieces.append(score(h, t))
        # a fresh tensor, not a view: FSDP2 hooks the root's output for backward, which a view would defeat
        return torch.cat(pieces).view(rows, completion_width).clone()


def _decoder(lm: torch.nn.Module) -> torch.nn.Module:
    """The causal LM's body (embeddings, layers, final norm): its last_hidden_state feeds the LM head."""
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, "model", None)
    if decoder is None or decoder is lm:
        raise TypeError(f"{type(lm).__name__} has no decoder module (get_decoder() or .model) under its LM head")
    return decoder


def _final_logit_softcapping(lm: torch.nn.Module) -> float | None:
    """cap of logits = cap · tanh(logits / cap) (Gemma 2/3 set it in their config), or None."""
    config = getattr(lm, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "final_logit_softcapping", None)


def _target_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    softcap: float | None,
    temperature: float,
    top_k: int,
    top_p: float,
) -> torch.Tensor:
    """(N,) log-prob of each target token under the head's logits of (N, H) hidden rows, divided by the
    temperature and, with top_k / top_p, truncated as transformers' warpers do and renormalised."""
    logits = head(hidden)
    if softcap is not None:  # in the head's dtype, as the model's own forward does it
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.float()
    tracked = logits.requires_grad
    if temperature != 1.0:  # x / 1.0 == x: no copy
        logits = logits / temperature if tracked else logits.div_(temperature)
    if top_k > 0 or top_p < 1.0:
        logits = _truncate(logits, targets, top_k, top_p)
    if tracked:  # log_softmax saves only its output and its backward needs one more buffer: 2-3 at the peak
        return -torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    top = logits.amax(-1, keepdim=True)  # no grad: log Σ exp in place, no extra vocab-wide buffers
    return picked - logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))


def _truncate(logits: torch.Tensor, targets: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(N, V) logits with what transformers' TopKLogitsWarper then TopPLogitsWarper remove set to -inf; the
    target keeps its logit whatever the boundary says (the sampler kept it: a float tie must not give -inf)."""
    target_logits = logits.gather(-1, targets.unsqueeze(-1))
    if top_k > 0:  # keep logits ≥ the k-th largest (ties kept)
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:  # ascending; drop while the cumulative mass is ≤ 1 - top_p, always keep the largest
        ordered, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum_(dim=-1)
        del ordered
        drop_sorted = cumulative <= (1 - top_p)
        del cumulative
        drop_sorted[..., -1:] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        del order, drop_sorted
        logits = logits.masked_fill(drop, -float("inf"))
    return logits.scatter(-1, targets.unsqueeze(-1), target_logits)


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
    out: list[list[float]] = [[] for _ in prompt_ids]
    for chunk in length_batches(prompt_ids, completion_ids, batch_size):
        completions = [list(completion_ids[i]) for i in chunk]
        logp, _ = token_logprobs(
            model, [list(prompt_ids[i]) for i in chunk], completions, temperature, pad_id, top_k, top_p
        )
        logp = logp.cpu()
        for j, i in enumerate(chunk):
            out[i] = logp[j, : len(completions[j])].tolist()
    return out


def length_batches(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], batch_size: int
) -> list[np.ndarray]:
    """Row numbers in order of prompt + completion length (less padding), batch_size at a time; batches
    whose completions are all empty are left out (nothing to score, and a zero-width completion slice would
    take the whole row)."""
    lengths = np.array([len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)])
    order = np.argsort(lengths, kind="stable")
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return [b for b in batches if any(len(completion_ids[i]) for i in b)]


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
