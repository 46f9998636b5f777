"""Policy-gradient losses for one micro-batch: AsymRE, TOPR, naive REINFORCE and SFT (each cites its paper).

Pure functions on tensors; `LOSSES[name](...)` returns `(loss, sums)`: the loss and monitoring sums (the same
keys for every loss) that add across micro-batches; `finish_stats` turns a step's sums into its statistics.

Shared arguments of every loss (B rows, T padded completion tokens):
    logp       (B, T) float  log π(y_t | x, y_<t), with grad
    mu_logp    (B, T) float  log μ(y_t | x, y_<t) of the behaviour policy, no grad
    mask       (B, T) float or bool, 1 on real completion tokens
    advantage  (B,)   A = r − V, computed upstream
    weight     (B,)   per-row curation weight w
    positive   (B,)   bool, the completion was correct
    aggregation        "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum"
    ratio_level        "sequence" | "token" | "geometric" (TOPR only; checked but unused by the others)
    num_seqs, num_tokens  denominators of the whole optimizer batch (None: this micro-batch's own counts).
        Every reduction is a sum over rows divided by a batch constant, so summing the gradients of
        micro-batches that share these denominators gives exactly the gradient of the full batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
RATIO_LEVELS = ("sequence", "token", "geometric")
# The step statistics (columns of train_steps) and the per-micro-batch sums they are made of.
STATS_KEYS = ("ratio_mean", "ratio_min", "ratio_max", "ratio_clipped", "positive_share", "effective_positive_share")
SUM_KEYS = (
    "rows",
    "ratio_sum",
    "ratio_min",
    "ratio_max",
    "clipped_sum",
    "negative_rows",
    "positive_rows",
    "positive_mass",
    "mass",
)

# Log-ratios are clamped to ±20 before exp (as verl does) so that exp never overflows, even in fp32/bf16.
# The ratio only enters the loss through clip(ρ, 0, 1), so the upper clamp changes nothing; the lower clamp
# floors a negative's weight at e^-20 ≈ 2e-9 instead of ~0, a negligible difference. Monitoring stats
# report the clamped ratio (ratio_max ≤ e^20 ≈ 4.9e8).
LOG_RATIO_CLAMP = 20.0


def sequence_logratio(logp: torch.Tensor, mu_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log ρ(y) = Σ_t (log π − log μ) over real tokens. Padding is excluded with `where` (not a product),
    so garbage or -inf in padded positions cannot turn into NaN."""
    real = mask.bool()  # (B, T)
    return torch.where(real, logp - mu_logp, 0.0).sum(-1)  # (B,)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str,
    num_seqs: int | None = None,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """Reduce per-token loss terms (B, T) to a scalar; the denominators are the whole batch's (see module doc)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; use one of {', '.join(AGGREGATIONS)}")
    real = mask.bool()  # (B, T)
    per_token = torch.where(real, per_token, 0.0)  # (B, T)
    if aggregation == "token-mean":
        denominator = num_tokens if num_tokens is not None else real.sum().clamp(min=1)
        return per_token.sum() / denominator
    denominator = num_seqs if num_seqs is not None else per_token.shape[0]
    if aggregation == "seq-mean-token-sum":
        return per_token.sum() / denominator
    lengths = real.sum(-1).clamp(min=1)  # (B,) a row with no real token contributes 0, not 0/0
    return (per_token.sum(-1) / lengths).sum() / denominator


def asymre_loss(
    logp: torch.Tensor,
    mu_logp: torch.Tensor,
    mask: torch.Tensor,
    advantage: torch.Tensor,
    weight: torch.Tensor,
    positive: torch.Tensor,
    *,
    aggregation: str = "token-mean",
    ratio_level: str = "sequence",
    num_seqs: int | None = None,
    num_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """AsymRE, Asymmetric REINFORCE (Arnal et al., arXiv 2506.20520): per-token term −A·w·log π(y_t),
    no importance weights; the asymmetry lives in the baseline V inside A. Also the `reinforce` baseline
    (the same loss with δV = 0 upstream)."""
    _check_ratio_level(ratio_level)
    per_token = -(advantage * weight)[:, None] * logp  # (B, T)
    loss = aggregate(per_token, mask, aggregation, num_seqs, num_tokens)
    return loss, _sums(logp, mu_logp, mask, advantage, weight, positive, clipped=None)


def topr_loss(
    logp: torch.Tensor,
    mu_logp: torch.Tensor,
    mask: torch.Tensor,
    advantage: torch.Tensor,
    weight: torch.Tensor,
    positive: torch.Tensor,
    *,
    aggregation: str = "seq-mean-token-mean",
    ratio_level: str = "sequence",
    num_seqs: int | None = None,
    num_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """TOPR, Tapered Off-Policy REINFORCE (Le Roux et al., arXiv 2503.14286): positives (A ≥ 0) −A·w·log π,
    negatives (A < 0) −sg(clip(ρ, 0, 1))·A·w·log π, with ρ at `ratio_level`:
    `sequence` exp(Σ_t log-ratio) (the paper), `token` exp(log-ratio_t) per token, `geometric`
    exp(mean_t log-ratio)."""
    _check_ratio_level(ratio_level)
    ratio = tapering_ratio(logp, mu_logp, mask, ratio_level)  # (B, T) or (B, 1), detached
    negative = (advantage < 0)[:, None]  # (B, 1)
    coefficient = torch.where(negative, ratio.clamp(max=1.0), 1.0)  # (B, T) or (B, 1)
    per_token = -coefficient * (advantage * weight)[:, None] * logp  # (B, T)
    loss = aggregate(per_token, mask, aggregation, num_seqs, num_tokens)
    if ratio_level == "token":
        real = mask.bool()  # (B, T)
        clipped = ((ratio > 1.0) & real).sum(-1) / real.sum(-1).clamp(min=1)  # (B,) share of the row's tokens
    else:
        clipped = (ratio[:, 0] > 1.0).float()  # (B,)
    return loss, _sums(logp, mu_logp, mask, advantage, weight, positive, clipped=clipped)


def sft_loss(
    logp: torch.Tensor,
    mu_logp: torch.Tensor,
    mask: torch.Tensor,
    advantage: torch.Tensor,
    weight: torch.Tensor,
    positive: torch.Tensor,
    *,
    aggregation: str = "token-mean",
    ratio_level: str = "sequence",
    num_seqs: int | None = None,
    num_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SFT on positives: rejection sampling / expert iteration (RAFT, Dong et al., arXiv 2304.06767;
    ReST-EM, Singh et al., arXiv 2312.06585). Term −w·log π on positive rows, 0 on negatives; `advantage`
    is ignored.

    The denominators count ALL rows (and all real tokens) of the batch, negatives included: the trainer
    passes the same batch constants to every loss, so accumulation invariance needs no knowledge of the
    loss, the loss keeps the scale of the others (each sample carries 1/N, whatever the pass rate), and it
    is exactly TOPR with c = −1 up to a factor 2 (A = 2 on positives, 0 on negatives). The cost is that the
    gradient norm scales with the batch's positive share."""
    _check_ratio_level(ratio_level)
    per_token = -(weight * positive.to(logp.dtype))[:, None] * logp  # (B, T)
    loss = aggregate(per_token, mask, aggregation, num_seqs, num_tokens)
    return loss, _sums(logp, mu_logp, mask, advantage, weight, positive, clipped=None)


def tapering_ratio(logp: torch.Tensor, mu_logp: torch.Tensor, mask: torch.Tensor, ratio_level: str) -> torch.Tensor:
    """TOPR's importance ratio π/μ, detached and clamped in log space: (B, T) for `token` (1 on padding),
    (B, 1) for `sequence` and `geometric`."""
    real = mask.bool()  # (B, T)
    logratio = torch.where(real, logp.detach().float() - mu_logp.float(), 0.0)  # (B, T)
    if ratio_level == "sequence":
        logratio = logratio.sum(-1, keepdim=True)  # (B, 1)
    elif ratio_level == "geometric":
        logratio = logratio.sum(-1, keepdim=True) / real.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    return torch.exp(logratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _sums(
    logp: torch.Tensor,
    mu_logp: torch.Tensor,
    mask: torch.Tensor,
    advantage: torch.Tensor,
    weight: torch.Tensor,
    positive: torch.Tensor,
    clipped: torch.Tensor | None,
) -> dict[str, float]:
    """Monitoring sums over the micro-batch's rows (SUM_KEYS). `ratio_*` is the sequence-level ratio whatever
    the loss; `clipped_sum` adds over negative rows `clipped` (B,): 1/0 whether the row's ratio exceeded 1
    (sequence, geometric), or the share of its tokens whose ratio exceeded 1 (token level); 0 without one."""
    with torch.no_grad():
        logratio = sequence_logratio(logp.detach().float(), mu_logp.float(), mask)  # (B,)
        ratio = torch.exp(logratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # (B,)
        negative = advantage < 0  # (B,)
        clipped_sum = torch.zeros((), dtype=torch.float32, device=ratio.device)
        if clipped is not None:
            clipped_sum = torch.where(negative, clipped.float(), 0.0).sum()
        mass = (weight * advantage.abs()).float()  # (B,) w|A|
        values = torch.stack(
            [
                ratio.sum(),
                ratio.min(),
                ratio.max(),
                clipped_sum,
                negative.sum().float(),
                positive.sum().float(),
                torch.where(advantage > 0, mass, 0.0).sum(),
                mass.sum(),
            ]
        ).tolist()  # one device sync instead of eight
    return dict(zip(SUM_KEYS, [float(logp.shape[0]), *values], strict=True))


def finish_stats(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """The step's statistics (STATS_KEYS) from the sums of its micro-batches: sums add, extremes stay extremes.

    ratio_clipped is the mean of `clipped` over negative rows (0 without any); effective_positive_share is
    p̃ = Σ w|A| over rows with A > 0 / Σ w|A| (0 when there is no advantage mass).
    """
    total = {key: sum(part[key] for part in parts) for key in SUM_KEYS}
    total["ratio_min"] = min(part["ratio_min"] for part in parts)
    total["ratio_max"] = max(part["ratio_max"] for part in parts)
    values = (
        total["ratio_sum"] / total["rows"],
        total["ratio_min"],
        total["ratio_max"],
        total["clipped_sum"] / max(total["negative_rows"], 1.0),
        total["positive_rows"] / total["rows"],
        total["positive_mass"] / total["mass"] if total["mass"] > 0 else 0.0,
    )
    return dict(zip(STATS_KEYS, values, strict=True))


def _check_ratio_level(ratio_level: str) -> None:
    """Checked by every loss (not only TOPR) so that a typo fails whichever loss the run uses."""
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; use one of {', '.join(RATIO_LEVELS)}")


LOSSES = {
    "asymre": asymre_loss,
    "topr": topr_loss,
    "reinforce": asymre_loss,  # AsymRE with δV = 0: the difference lives in the advantages
    "sft": sft_loss,
}
