"""Generation engines at scale, on CPU: prompt shards in their own processes (how vLLM runs one engine per
GPU) give exactly the samples of the shards run in place, failures name the shard, and the engine settings
reach the engine."""

from __future__ import annotations

import pytest

from stages.config import RolloutConfig
from stages.models import build_tiny_model, build_tiny_tokenizer
from stages.rollout import (
    Engine,
    SamplingSpec,
    encode_prompts,
    eos_token_ids,
    hf_shard,
    run_engine,
    run_shards,
    shard_bounds,
)

QUESTIONS = ["1+1=?", "12+34=?", "99*9=?", "7-80=?", "5*5=?"]
SPEC = SamplingSpec(n=3, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=5)
ENGINE = Engine("hf", batch_size=64, gpu_memory_utilization=0.85)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    path = tmp_path_factory.mktemp("policy")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer, encode_prompts(tokenizer, [f"Q: {q} A:" for q in QUESTIONS])


def test_shard_bounds_cover_every_prompt_once():
    for n, parts in [(5, 2), (7, 3), (2, 4), (8, 8), (1, 1)]:
        bounds = shard_bounds(n, parts)
        assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_shards_in_processes_equal_the_shards_in_place(folder):
    path, tokenizer, prompt_ids = folder
    eos = eos_token_ids(None, tokenizer, str(path))
    progress = []
    sharded = run_shards(
        "hf", str(path), eos, prompt_ids, SPEC, ENGINE, seed=11, parts=2, progress=lambda d, n: progress.append((d, n))
    )
    in_place = []
    for start, stop in shard_bounds(len(prompt_ids), 2):
        in_place += hf_shard(str(path), eos, prompt_ids[start:stop], SPEC, ENGINE, seed=11, first_index=start)
    assert sharded == in_place
    assert [s.prompt_index for s in sharded] == [i for i in range(len(QUESTIONS)) for _ in range(SPEC.n)]
    assert progress[-1] == (len(QUESTIONS) * SPEC.n, len(QUESTIONS) * SPEC.n) and len(progress) == 2


def test_a_failing_shard_names_itself_and_its_output(folder, tmp_path):
    _, _, prompt_ids = folder
    with pytest.raises(RuntimeError) as err:
        run_shards("hf", str(tmp_path / "missing"), [0], prompt_ids, SPEC, ENGINE, seed=0, parts=2)
    message = str(err.value)
    assert "rollout shard 0 (prompts 0..1, hf engine) exited with code 1" in message
    assert "missing" in message  # the child's own error, from its output tail


def test_vllm_engines_need_their_gpus(folder, monkeypatch):
    path, tokenizer, prompt_ids = folder
    monkeypatch.setattr("stages.rollout.visible_gpus", lambda: ["0", "1", "2"])
    engine = Engine.of(RolloutConfig(engine="vllm", engines=2, tensor_parallel_size=2))
    with pytest.raises(ValueError, match=r"rollout.engines=2 × rollout.tensor_parallel_size=2 needs 4 GPUs; 3 are"):
        run_engine(None, tokenizer, prompt_ids, SPEC, engine, seed=0, device="cpu", model_path=str(path))


def test_engine_settings_come_from_the_rollout_section():
    config = RolloutConfig(
        engine="vllm", tensor_parallel_size=2, engines=4, max_num_seqs=64, enable_prefix_caching=False,
        enforce_eager=True, dtype="bfloat16", gpu_memory_utilization=0.5, batch_size=9,
    )  # fmt: skip
    assert Engine.of(config) == Engine("vllm", 9, 0.5, 2, 4, 64, False, True, "bfloat16")


def test_eos_of_a_folder_without_a_model_in_memory(folder):
    path, tokenizer, _ = folder
    assert tokenizer.eos_token_id in eos_token_ids(None, tokenizer, str(path))
