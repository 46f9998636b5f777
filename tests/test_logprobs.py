"""CompletionScorer: the chunked, checkpointed LM head equals the old whole-vocabulary formula (values and
parameter gradients), top-k / top-p recompute equals what transformers' sampler stored, and the forward's
peak memory does not grow with rows × completion tokens × vocab."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from stages.logprobs import CompletionScorer, completion_logprobs, left_pad_batch, recompute_logprobs
from stages.models import build_tiny_model, build_tiny_tokenizer
from stages.rollout import SamplingSpec, encode_prompts, hf_generate

QUESTIONS = ["1+1=?", "12+34=?", "99*9=?", "7-80=?"]


def old_formula(lm, input_ids, attention_mask, position_ids, completion_width, temperature=1.0):
    """The scorer before chunking: fp32 log-softmax over the whole vocabulary at every completion position."""
    logits = lm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=completion_width + 1,
        use_cache=False,
    ).logits[:, :-1]
    targets = input_ids[:, -completion_width:]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def random_qwen2(vocab: int = 1000, tie: bool = False, hidden: int = 32, layers: int = 2, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        tie_word_embeddings=tie,
        max_position_embeddings=256,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config).float().eval()


def random_gemma2(vocab: int = 1000, seed: int = 0):
    """A model whose config sets final_logit_softcapping (30): its own forward applies it to the logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=256,
        final_logit_softcapping=30.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma2ForCausalLM(config).float().eval()
    with torch.no_grad():  # logits of random weights are ~0.1: scale them up to where the cap bends them
        model.model.norm.weight.fill_(40.0)
    return model


def random_batch(vocab: int, seed: int = 0):
    """5 rows, prompts of 1-6 and completions of 1-9 tokens (one of each extreme): left padding everywhere."""
    rng = np.random.default_rng(seed)
    prompt_lengths, completion_lengths = [1, 6, 3, 4, 2], [9, 1, 5, 9, 3]
    prompts = [rng.integers(0, vocab, n).tolist() for n in prompt_lengths]
    completions = [rng.integers(0, vocab, n).tolist() for n in completion_lengths]
    return left_pad_batch(prompts, completions, pad_id=0)


MODELS = {
    "tiny": lambda: build_tiny_model(build_tiny_tokenizer(), seed=0).eval(),
    "qwen2": lambda: random_qwen2(tie=False),
    "qwen2-tied": lambda: random_qwen2(tie=True),
    "gemma2-softcap": random_gemma2,
}


@pytest.fixture(scope="module", params=list(MODELS))
def lm(request):
    return MODELS[request.param]()


def masked_sum_and_grads(fn, lm, batch):
    logp = fn()
    total = (logp * batch.completion_mask).sum()
    params = [p for p in lm.parameters() if p.requires_grad]
    return logp.detach(), torch.autograd.grad(total, params)


@pytest.mark.parametrize(  # 1000 > B × C = 45: one chunk
    ("chunk_tokens", "dtype"), [(1, torch.float32), (7, torch.float32), (1000, torch.float32), (7, torch.float64)]
)
def test_chunked_scorer_equals_the_old_formula(lm, chunk_tokens, dtype):
    """Values to 1e-5; parameter gradients of the masked sum to 1e-5 of the largest gradient entry in fp32
    (summing a weight's gradient over chunks rounds differently from one matmul over all positions) and to
    1e-10 in fp64, where rounding is out of the way."""
    if dtype == torch.float64 and not (lm.config.model_type == "qwen2" and lm.config.vocab_size == 1000):
        pytest.skip("float64 on the random Qwen2s only (Gemma 2's eager attention gives NaN in float64)")
    lm = lm.to(dtype)
    try:
        batch = random_batch(lm.config.vocab_size)
        width = batch.completion_mask.shape[1]
        args = (batch.input_ids, batch.attention_mask, batch.position_ids, width, 0.7)
        want, want_grads = masked_sum_and_grads(lambda: old_formula(lm, *args), lm, batch)
        scorer = CompletionScorer(lm, chunk_tokens=chunk_tokens)
        got, got_grads = masked_sum_and_grads(lambda: scorer(*args), lm, batch)
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)
        for g, w in zip(got_grads, want_grads, strict=True):
            scale = 1e-5 * float(w.abs().max().clamp(min=1.0)) if dtype == torch.float32 else 1e-10
            torch.testing.assert_close(g, w, atol=scale, rtol=0)
        with torch.no_grad():  # the no-grad path (in-place log Σ exp) too, at temperature 1
            torch.testing.assert_close(scorer(*args[:4]), old_formula(lm, *args[:4]).float(), atol=1e-5, rtol=0)
    finally:
        lm.float()


def test_softcapping_is_applied():
    """The Gemma 2 case above only agrees because the cap is applied: without it the values differ."""
    lm = random_gemma2()
    batch = random_batch(lm.config.vocab_size)
    width = batch.completion_mask.shape[1]
    with torch.no_grad():
        capped = CompletionScorer(lm)(batch.input_ids, batch.attention_mask, batch.position_ids, width)
        lm.config.final_logit_softcapping = None
        try:
            uncapped = CompletionScorer(lm)(batch.input_ids, batch.attention_mask, batch.position_ids, width)
        finally:
            lm.config.final_logit_softcapping = 30.0
    assert (capped - uncapped).abs().max() > 1e-2


def test_empty_completion_width():
    lm = random_qwen2()
    batch = left_pad_batch([[1, 2], [3]], [[], []], pad_id=0)
    out = completion_logprobs(lm, batch)
    assert out.shape == (2, 0)


# ---------------------------------------------------------------- truncation, against transformers' sampler


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer, seed=0).eval(), tokenizer


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (5, 1.0), (0, 0.8), (5, 0.8)])
def test_truncated_recompute_matches_hf_generate(tiny, top_k, top_p):
    """hf_generate stores the log-prob of the processed (temperature → top-k → top-p) distribution; the
    recompute, in other batches and chunks of 3 positions, gives the same per token."""
    model, tokenizer = tiny
    prompts = encode_prompts(tokenizer, [f"Q: {q} A:" for q in QUESTIONS])
    spec = SamplingSpec(n=3, do_sample=True, temperature=0.7, top_k=top_k, top_p=top_p, max_new_tokens=12)
    samples = hf_generate(model, tokenizer, prompts, spec, batch_size=16, seed=0, device="cpu")
    prompt_ids = [prompts[s.prompt_index] for s in samples]
    completions = [s.completion_ids for s in samples]
    stored = np.concatenate([s.logprobs for s in samples])
    chunked = CompletionScorer(model, chunk_tokens=12)  # 12 // 4 = 3 positions per truncated chunk
    got = recompute_logprobs(chunked, prompt_ids, completions, 0.7, 5, tokenizer.pad_token_id, top_k, top_p)
    assert np.abs(np.concatenate(got) - stored).max() < 1e-5
    full = recompute_logprobs(model, prompt_ids, completions, 0.7, 5, tokenizer.pad_token_id)
    gap = np.abs(np.concatenate(full) - stored).max()
    if top_k or top_p < 1.0:
        assert gap > 0.1  # truncation changed μ: the match above is not the untruncated one in disguise
    else:
        assert gap < 1e-5


def test_truncation_boundary_and_gradient():
    """Ties at the k-th logit are all kept, the target is kept even where the boundary drops it, and the
    truncated path works under autograd too (its gradient is that of the renormalised log-prob)."""
    from stages.logprobs import _truncate

    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0], [5.0, 0.0, 0.0, 0.0, -1.0]])
    kept = _truncate(logits, torch.tensor([4, 4]), top_k=2, top_p=1.0).isfinite()
    assert kept.tolist() == [[True, True, True, False, True], [True, True, True, True, True]]
    kept = _truncate(logits, torch.tensor([0, 1]), top_k=0, top_p=0.5).isfinite()
    assert kept.tolist() == [[True, False, False, False, False], [True, True, False, False, False]]

    lm = random_qwen2(vocab=50)
    batch = random_batch(50)
    width = batch.completion_mask.shape[1]
    args = (batch.input_ids, batch.attention_mask, batch.position_ids, width, 0.7, 5, 0.9)
    with torch.no_grad():
        want = CompletionScorer(lm)(*args)
    got = CompletionScorer(lm, chunk_tokens=8)(*args)
    torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=0)
    got.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in lm.parameters())


# ---------------------------------------------------------------- memory


class PeakBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created by torch ops while active (forward and backward): each new
    storage counts from its creation until it is freed (a weakref finalizer on the storage)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._freed, key)
        return out


def peak_of(fn) -> int:
    with PeakBytes() as meter:
        fn()
    return meter.peak


def test_peak_memory_does_not_scale_with_rows_tokens_vocab():
    """vocab 50k: the old formula's peak grows with B × C × V (3 fp32 copies: logits, /T, log-softmax); the
    chunked scorer's stays at a few chunk-sized buffers (plus the embedding's gradient) when B × C grows
    4×, with grad (forward + backward), without, and with truncation."""
    vocab, chunk, width = 50_000, 16, 32
    lm = random_qwen2(vocab=vocab, tie=True, hidden=16, layers=1)
    chunk_bytes, weight_bytes = chunk * vocab * 4, lm.get_output_embeddings().weight.nbytes
    peaks: dict[tuple, int] = {}
    for rows in (2, 8):
        generator = torch.Generator().manual_seed(rows)
        completions = torch.randint(vocab, (rows, width), generator=generator).tolist()
        batch = left_pad_batch([[1, 2, 3]] * rows, completions)
        args = (batch.input_ids, batch.attention_mask, batch.position_ids, width, 0.7)
        scorer = CompletionScorer(lm, chunk_tokens=chunk)

        def backward(fn):
            fn().sum().backward()
            lm.zero_grad(set_to_none=True)

        peaks["old", rows] = peak_of(lambda args=args: backward(lambda: old_formula(lm, *args)))
        peaks["grad", rows] = peak_of(lambda args=args, scorer=scorer: backward(lambda: scorer(*args)))
        with torch.no_grad():
            peaks["no grad", rows] = peak_of(lambda args=args, scorer=scorer: scorer(*args))
            peaks["top-k/p", rows] = peak_of(lambda args=args, scorer=scorer: scorer(*args, 100, 0.9))
        full = rows * width * vocab * 4
        assert peaks["old", rows] > 2 * full  # the meter sees what the old formula holds
        assert peaks["grad", rows] < 4 * chunk_bytes + 2 * weight_bytes + full / 50
        assert peaks["no grad", rows] < 3 * chunk_bytes
        assert peaks["top-k/p", rows] < 3 * chunk_bytes
    for kind in ("grad", "no grad", "top-k/p"):
        assert peaks[kind, 8] < 1.2 * peaks[kind, 2], peaks
    assert peaks["old", 8] > 3.5 * peaks["old", 2]
