"""Unit and invariant tests of stages/losses.py: hand-computed values, closed-form gradients, a Python-loop
twin, the equivalences between losses, gradient- and statistics-accumulation invariance and the p̃ identity."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from stages.losses import AGGREGATIONS, LOSSES, RATIO_LEVELS, STATS_KEYS, SUM_KEYS, finish_stats, sequence_logratio

NAMES = ("asymre", "topr", "reinforce", "sft")
ALL = [
    (name, aggregation, level)
    for name, aggregation, level in itertools.product(NAMES, AGGREGATIONS, RATIO_LEVELS)
    if name == "topr" or level == "sequence"  # only TOPR reads ratio_level
]


# --- hand-computed batch: 3 rows of lengths 2, 3, 1 (T = 3) -------------------------------------------------
# padding holds garbage (logp 9, log μ -30) that would change every number if it leaked in.
DELTAS = [[1.0, -0.5], [0.2, -0.4, 0.1], [0.3]]  # log π − log μ on the real tokens


def hand_batch():
    logp = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, -1.5, -1.0], [-3.0, 9.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    mu_logp = torch.full((3, 3), -30.0)
    for i, deltas in enumerate(DELTAS):
        for t, delta in enumerate(deltas):
            mu_logp[i, t] = logp[i, t].item() - delta
    advantage = torch.tensor([0.5, -1.0, -0.5])
    weight = torch.tensor([1.0, 2.0, 1.0])
    positive = torch.tensor([True, False, False])
    return logp, mu_logp, mask, advantage, weight, positive


def _topr_by_hand(row1_sum: float, row1_mean: float) -> dict[str, float]:
    # row 0 positive: −0.5·1·(−1 − 2) = 1.5; row 2 negative with ρ = e^0.3 > 1 clipped to 1: −(−0.5)·1·(−3) = −1.5
    return {
        "token-mean": (1.5 + row1_sum - 1.5) / 6,
        "seq-mean-token-sum": (1.5 + row1_sum - 1.5) / 3,
        "seq-mean-token-mean": (1.5 / 2 + row1_mean - 1.5 / 1) / 3,
    }


# row 1 terms −A·w·logp_t = 2·logp_t = (−1, −3, −2), times the clipped ratio
E_SEQ, E_TOK, E_GEO = math.exp(-0.1), math.exp(-0.4), math.exp(-0.1 / 3)
EXPECTED = {
    ("asymre", "sequence"): {
        "token-mean": -1.0,
        "seq-mean-token-sum": -2.0,
        "seq-mean-token-mean": (0.75 - 2.0 - 1.5) / 3,
    },
    ("topr", "sequence"): _topr_by_hand(-6 * E_SEQ, -2 * E_SEQ),
    ("topr", "token"): _topr_by_hand(-1 - 3 * E_TOK - 2, (-1 - 3 * E_TOK - 2) / 3),  # tokens 1 and 3 clipped
    ("topr", "geometric"): _topr_by_hand(-6 * E_GEO, -2 * E_GEO),
    ("sft", "sequence"): {"token-mean": 3 / 6, "seq-mean-token-sum": 3 / 3, "seq-mean-token-mean": (3 / 2) / 3},
}
EXPECTED[("reinforce", "sequence")] = EXPECTED[("asymre", "sequence")]


@pytest.mark.parametrize(("name", "aggregation", "level"), ALL)
def test_values_by_hand(name, aggregation, level):
    loss, _ = LOSSES[name](*hand_batch(), aggregation=aggregation, ratio_level=level)
    assert loss.item() == pytest.approx(EXPECTED[(name, level)][aggregation], rel=1e-6)


def test_sequence_logratio_by_hand():
    logp, mu_logp, mask, *_ = hand_batch()
    torch.testing.assert_close(sequence_logratio(logp, mu_logp, mask), torch.tensor([0.5, -0.1, 0.3]))


@pytest.mark.parametrize(
    ("name", "level"), [("asymre", "sequence"), ("sft", "sequence"), *(("topr", lv) for lv in RATIO_LEVELS)]
)
def test_stats_by_hand(name, level):
    _, sums = LOSSES[name](*hand_batch(), aggregation="token-mean", ratio_level=level)
    assert tuple(sums) == SUM_KEYS
    assert all(type(v) is float for v in sums.values())
    stats = finish_stats([sums])
    assert tuple(stats) == STATS_KEYS
    ratios = [math.exp(0.5), math.exp(-0.1), math.exp(0.3)]
    assert stats["ratio_mean"] == pytest.approx(sum(ratios) / 3)
    assert stats["ratio_min"] == pytest.approx(ratios[1])
    assert stats["ratio_max"] == pytest.approx(ratios[0])
    # negative rows 1 and 2: sequence/geometric clip row 2 only; token clips 2 of 3 tokens of row 1 and row 2's
    clipped = {"sequence": 0.5, "geometric": 0.5, "token": (2 / 3 + 1) / 2}[level] if name == "topr" else 0.0
    assert stats["ratio_clipped"] == pytest.approx(clipped)
    assert stats["positive_share"] == pytest.approx(1 / 3)
    assert stats["effective_positive_share"] == pytest.approx(0.5 / (0.5 + 2 * 1.0 + 1 * 0.5))


# --- random batches, a Python-loop twin and closed-form gradients ---------------------------------------------


def random_batch(seed: int, rows: int = 6, width: int = 5, spread: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()  # (B, T)
    logp = -3 * torch.rand(rows, width, generator=g)
    mu_logp = logp + spread * torch.randn(rows, width, generator=g)
    logp = torch.where(mask.bool(), logp, 50 * torch.randn(rows, width, generator=g))  # garbage padding
    advantage = torch.randn(rows, generator=g)
    weight = 0.5 + torch.rand(rows, generator=g)
    positive = torch.rand(rows, generator=g) < 0.5
    return logp.requires_grad_(), mu_logp, mask, advantage, weight, positive


def naive_coefficients(name, level, logp, mu_logp, mask, advantage, weight, positive):
    """c[i][t] such that the loss is Σ_i Σ_t −c[i][t]·logp[i][t] / D_i: a loop over rows and tokens."""
    coefficients = []
    for i in range(logp.shape[0]):
        tokens = [t for t in range(logp.shape[1]) if mask[i, t] > 0]
        deltas = {t: logp[i, t].item() - mu_logp[i, t].item() for t in tokens}
        row = {}
        for t in tokens:
            if name == "sft":
                row[t] = weight[i].item() if positive[i] else 0.0
                continue
            taper = 1.0
            if name == "topr" and advantage[i] < 0:
                log_ratio = {
                    "sequence": sum(deltas.values()),
                    "token": deltas[t],
                    "geometric": sum(deltas.values()) / len(tokens),
                }[level]
                taper = min(1.0, math.exp(min(log_ratio, 20.0)))
            row[t] = taper * advantage[i].item() * weight[i].item()
        coefficients.append(row)
    return coefficients


def naive_denominators(aggregation, mask, num_seqs, num_tokens):
    lengths = [int(mask[i].sum().item()) for i in range(mask.shape[0])]
    if aggregation == "token-mean":
        return [num_tokens] * len(lengths)
    if aggregation == "seq-mean-token-sum":
        return [num_seqs] * len(lengths)
    return [num_seqs * n for n in lengths]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("name", "aggregation", "level"), ALL)
def test_loop_twin_and_closed_form_gradient(name, aggregation, level, seed):
    batch = random_batch(seed)
    logp, _, mask, *_ = batch
    loss, _ = LOSSES[name](*batch, aggregation=aggregation, ratio_level=level)
    loss.backward()

    coefficients = naive_coefficients(name, level, *batch)
    denominators = naive_denominators(aggregation, mask, num_seqs=logp.shape[0], num_tokens=int(mask.sum().item()))
    value = sum(-c * logp[i, t].item() / denominators[i] for i, row in enumerate(coefficients) for t, c in row.items())
    grad = torch.zeros_like(logp)  # dL/dlogp_it = −c_it / D_i on real tokens, 0 on padding
    for i, row in enumerate(coefficients):
        for t, c in row.items():
            grad[i, t] = -c / denominators[i]
    assert loss.item() == pytest.approx(value, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(logp.grad, grad)


def naive_stats(name, level, logp, mu_logp, mask, advantage, weight, positive):
    ratios, clipped, positive_mass, mass = [], [], 0.0, 0.0
    for i in range(logp.shape[0]):
        deltas = [logp[i, t].item() - mu_logp[i, t].item() for t in range(logp.shape[1]) if mask[i, t] > 0]
        ratios.append(math.exp(sum(deltas)))
        if advantage[i] < 0:
            clipped.append(sum(d > 0 for d in deltas) / len(deltas) if level == "token" else float(sum(deltas) > 0))
        row_mass = weight[i].item() * abs(advantage[i].item())
        mass += row_mass
        positive_mass += row_mass if advantage[i] > 0 else 0.0
    return {
        "ratio_mean": sum(ratios) / len(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_clipped": sum(clipped) / len(clipped) if name == "topr" and clipped else 0.0,
        "positive_share": sum(bool(p) for p in positive) / len(positive),
        "effective_positive_share": positive_mass / mass,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("name", "level"), [("asymre", "sequence"), ("sft", "sequence"), *(("topr", lv) for lv in RATIO_LEVELS)]
)
def test_stats_loop_twin(name, level, seed):
    batch = random_batch(seed, rows=9)  # `positive` drawn independently of the sign of the advantage
    _, sums = LOSSES[name](*batch, ratio_level=level)
    assert finish_stats([sums]) == pytest.approx(naive_stats(name, level, *batch), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bounds", [(0, 9), (0, 3, 6, 9), (0, 1, 7, 9), (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)])
@pytest.mark.parametrize(("name", "level"), [("asymre", "sequence"), *(("topr", lv) for lv in RATIO_LEVELS)])
def test_stats_of_micro_batches_equal_the_batch_loop_twin(name, level, seed, bounds):
    """The sums of any split into micro-batches give the statistics of the whole batch (not a mean of
    per-micro-batch ratios, which differs for ratio_clipped and p̃)."""
    batch = random_batch(seed, rows=9)
    parts = []
    for start, end in itertools.pairwise(bounds):
        _, sums = LOSSES[name](*(x[start:end] for x in batch), ratio_level=level)
        parts.append(sums)
    assert finish_stats(parts) == pytest.approx(naive_stats(name, level, *batch), rel=1e-5)


def test_closed_form_gradient_by_hand_topr_token():
    # row 1 (A = −1, w = 2, len 3), seq-mean-token-mean: dL/dlogp_t = −min(1, ρ_t)·A·w / (N·len) = 2·min(1, ρ_t) / 9
    logp, *rest = hand_batch()
    loss, _ = LOSSES["topr"](logp, *rest, aggregation="seq-mean-token-mean", ratio_level="token")
    loss.backward()
    torch.testing.assert_close(logp.grad[1], torch.tensor([2 / 9, 2 * math.exp(-0.4) / 9, 2 / 9]))
    torch.testing.assert_close(logp.grad[0], torch.tensor([-0.5 / 6, -0.5 / 6, 0.0]))  # −A·w/(N·len), padding 0


# --- equivalences between losses ----------------------------------------------------------------------------


def _loss_and_grad(name, batch, **kwargs):
    logp = batch[0].detach().clone().requires_grad_()
    loss, sums = LOSSES[name](logp, *batch[1:], **kwargs)
    loss.backward()
    return loss.detach(), logp.grad, finish_stats([sums])


@pytest.mark.parametrize(("aggregation", "level"), itertools.product(AGGREGATIONS, RATIO_LEVELS))
def test_topr_on_positives_is_sft(aggregation, level):
    logp, mu_logp, mask, _, _, _ = random_batch(3)
    rows = logp.shape[0]
    batch = (logp, mu_logp, mask, torch.ones(rows), torch.ones(rows), torch.ones(rows, dtype=torch.bool))
    topr = _loss_and_grad("topr", batch, aggregation=aggregation, ratio_level=level)
    sft = _loss_and_grad("sft", batch, aggregation=aggregation, ratio_level=level)
    torch.testing.assert_close(topr[:2], sft[:2])


@pytest.mark.parametrize(("aggregation", "level"), itertools.product(AGGREGATIONS, RATIO_LEVELS))
def test_topr_is_asymre_on_policy(aggregation, level):
    logp, _, mask, _, weight, _ = random_batch(4, rows=8)
    reward = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, -1.0, -1.0, 1.0])
    batch = (logp, logp.detach().clone(), mask, reward - 0.3, weight, reward > 0)  # π = μ: every ratio is 1
    topr = _loss_and_grad("topr", batch, aggregation=aggregation, ratio_level=level)
    asymre = _loss_and_grad("asymre", batch, aggregation=aggregation, ratio_level=level)
    torch.testing.assert_close(topr[:2], asymre[:2])
    assert topr[2]["ratio_clipped"] == 0.0 and topr[2]["ratio_min"] == topr[2]["ratio_max"] == 1.0


def test_reinforce_is_asymre():
    assert LOSSES["reinforce"] is LOSSES["asymre"]


# --- invariants -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("micro", [1, 3])
@pytest.mark.parametrize(("name", "aggregation", "level"), ALL)
def test_gradient_accumulation_invariance(name, aggregation, level, micro):
    """Micro-batches (each trimmed to its own longest row) summed = one batch of 8, given the batch denominators."""
    logp, mu_logp, mask, advantage, weight, positive = random_batch(5, rows=8, width=7)
    full, _ = LOSSES[name](logp, mu_logp, mask, advantage, weight, positive, aggregation=aggregation, ratio_level=level)
    full.backward()
    full_grad, logp.grad = logp.grad.clone(), None

    num_seqs, num_tokens = 8, int(mask.sum().item())
    total = 0.0
    for start in range(0, 8, micro):
        rows = slice(start, start + micro)
        width = int(mask[rows].sum(-1).max().item())
        part = (x[rows, :width] for x in (logp, mu_logp, mask))
        loss, _ = LOSSES[name](
            *part,
            advantage[rows],
            weight[rows],
            positive[rows],
            aggregation=aggregation,
            ratio_level=level,
            num_seqs=num_seqs,
            num_tokens=num_tokens,
        )
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(full.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(logp.grad, full_grad)


@pytest.mark.parametrize("c", [-0.8, -0.5, -0.1, 0.0, 0.2, 0.5, 0.8])
@pytest.mark.parametrize("k", [1, 3, 10, 17, 19])
def test_effective_positive_share_identity(c, k):
    rows = 20
    reward = torch.tensor([1.0] * k + [-1.0] * (rows - k))
    batch = random_batch(6, rows=rows)
    _, sums = LOSSES["asymre"](*batch[:3], reward - c, torch.ones(rows), reward > 0)
    stats = finish_stats([sums])
    p = k / rows
    assert stats["positive_share"] == pytest.approx(p)
    assert stats["effective_positive_share"] == pytest.approx(p * (1 - c) / (1 + c * (1 - 2 * p)), rel=1e-5)


def test_effective_positive_share_zero_mass():
    logp, mu_logp, mask, _, weight, positive = random_batch(7)
    _, sums = LOSSES["topr"](logp, mu_logp, mask, torch.zeros(logp.shape[0]), weight, positive)
    assert finish_stats([sums])["effective_positive_share"] == 0.0


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize(("name", "aggregation", "level"), ALL)
def test_huge_log_ratios_stay_finite(name, aggregation, level, sign):
    logp, _, mask, advantage, weight, positive = random_batch(8)
    mu_logp = logp.detach() - sign * 1000.0  # log-ratio ±1000 per token, ±5000 per sequence
    loss, sums = LOSSES[name](
        logp, mu_logp, mask, advantage, weight, positive, aggregation=aggregation, ratio_level=level
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in finish_stats([sums]).values())


def test_huge_ratio_tapers_as_expected():
    # π ≫ μ: the clip binds, negatives weigh 1 (= AsymRE); π ≪ μ: negatives weigh e^-20, essentially 0
    logp, _, mask, advantage, weight, positive = random_batch(9)
    negative = -advantage.abs()
    high = _loss_and_grad("topr", (logp, logp.detach() - 1000.0, mask, negative, weight, positive))
    plain = _loss_and_grad(
        "asymre", (logp, logp.detach(), mask, negative, weight, positive), aggregation="seq-mean-token-mean"
    )
    torch.testing.assert_close(high[:2], plain[:2])
    assert high[2]["ratio_clipped"] == 1.0
    low = _loss_and_grad("topr", (logp, logp.detach() + 1000.0, mask, negative, weight, positive))
    # the documented clamp of the log-ratio at −20 (atol 0: the weight is tiny, not zero)
    torch.testing.assert_close(low[1], math.exp(-20.0) * plain[1], rtol=1e-5, atol=0.0)
    assert (high[2]["ratio_max"], low[2]["ratio_max"]) == pytest.approx((math.exp(20.0), math.exp(-20.0)))


@pytest.mark.parametrize(("name", "aggregation", "level"), ALL)
def test_padding_and_mask_dtype_do_not_matter(name, aggregation, level):
    logp, mu_logp, mask, *rest = random_batch(10)
    reference = _loss_and_grad(name, (logp, mu_logp, mask, *rest), aggregation=aggregation, ratio_level=level)
    pad = ~mask.bool()
    dirty_logp = logp.detach().masked_fill(pad, float("-inf"))
    dirty_mu = mu_logp.masked_fill(pad, float("nan"))
    dirty = _loss_and_grad(name, (dirty_logp, dirty_mu, mask.bool(), *rest), aggregation=aggregation, ratio_level=level)
    torch.testing.assert_close(dirty[:2], reference[:2])
    assert dirty[2] == pytest.approx(reference[2])


@pytest.mark.parametrize("name", NAMES)
def test_unknown_names_fail_with_the_choices(name):
    batch = random_batch(11)
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        LOSSES[name](*batch, aggregation="seq-mean")
    with pytest.raises(ValueError, match="geometric"):
        LOSSES[name](*batch, ratio_level="tokens")
