"""One whole round on the CPU through the stage functions and the storage layer, without Prefect:
every table lands, every sql/checks query returns no rows, and checkpoint 1 is registered."""

from __future__ import annotations

from functools import partial

import polars as pl
import torch

from flows.config import load_config
from stages.advantage import advantages
from stages.curate import curate
from stages.evaluate import evaluate
from stages.models import build_tiny_model, build_tiny_tokenizer, warm_start
from stages.prompts import read_prompts, render_prompts, sample_round_prompts
from stages.rollout import Engine, Sampling, generate_rollouts
from stages.train import train_round, training_rows
from stages.verify import score, verify_batch
from storage import checkpoints, tables
from storage.checks import run_checks


def test_one_round_through_stages_and_storage(tmp_path):
    cfg = load_config(
        None,
        ["prompts.n_train=200", "prompts.n_test=16", "prompts.per_round=12", "rollout.samples_per_prompt=4",
         "model.warm_start_steps=30", "model.warm_start_batch_size=32", "train.batch_size=16",
         "train.micro_batch_size=8", "eval.sampled=1"],
    )  # fmt: skip
    store, exp, part = str(tmp_path), "it", {"experiment": "it", "round": 0}
    prompts = read_prompts(cfg.prompts, cfg.seed).frame
    tables.write_partition(store, "prompts", prompts, partition={"dataset": prompts["dataset"][0]}, stage_key="p")
    train_prompts = prompts.filter(pl.col("split") == "train")

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    template = (cfg.prompts.template, cfg.prompts.use_chat_template)
    warm_start(model, tokenizer, train_prompts, cfg.model, *template, 0, "cpu")
    base = tmp_path / "ckpt0"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    version0 = checkpoints.register(
        store, experiment=exp, round=0, path=base, parent_version=None, loss=None, stage_key="b"
    )

    chosen = render_prompts(sample_round_prompts(train_prompts, cfg.prompts.per_round, 0, 0), tokenizer, *template)
    rollouts = generate_rollouts(
        model, tokenizer, chosen, cfg.rollout, experiment=exp, round=0, policy_version=version0, seed=0, device="cpu"
    )
    tables.write_partition(store, "rollouts", rollouts, partition=part, stage_key="r")
    rewards = score(rollouts, train_prompts, cfg.reward)
    tables.write_partition(store, "rewards", rewards, partition=part, stage_key="w")
    adv = advantages(rewards, cfg.advantage)
    tables.write_partition(store, "advantages", adv, partition=part, stage_key="a")
    train_set = curate(rewards, rollouts, cfg.curation)
    tables.write_partition(store, "train_set", train_set, partition=part, stage_key="c")

    rows = training_rows(train_set, rollouts, adv, rewards)
    before = [p.detach().clone() for p in model.parameters()]
    result = train_round(
        model, rows, cfg.train, experiment=exp, round=0, temperature=1.0, pad_id=tokenizer.pad_token_id, seed=0
    )
    assert result.logprob_gap < 1e-4  # hf engine log μ and the trainer's forward pass agree in fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    tables.write_partition(store, "train_steps", result.steps, partition=part, stage_key="t")
    folder = tmp_path / "ckpt1"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    version1 = checkpoints.register(
        store, experiment=exp, round=1, path=folder, parent_version=version0, loss=result.mean_loss, stage_key="t"
    )

    test = render_prompts(prompts.filter(pl.col("split") == "test"), tokenizer, *template)
    r = cfg.rollout
    evals = evaluate(
        model, tokenizer, test, cfg.eval, sampling=Sampling(r.temperature, r.top_k, r.top_p),
        max_new_tokens=cfg.eval.max_new_tokens or r.max_new_tokens,
        engine=Engine(r.engine, r.batch_size, r.gpu_memory_utilization),
        verify_fn=partial(verify_batch, verifier="numeric"),
        experiment=exp, round=1, policy_version=version1, seed=1, device="cpu",
    )  # fmt: skip
    tables.write_partition(store, "evals", evals, partition={"experiment": exp, "round": 1}, stage_key="e")

    assert run_checks(store, experiment=exp, round=0) == {}
    assert tables.read(store, "rollouts").height == 12 * 4
    assert tables.read(store, "train_steps").height == 3  # ceil(48 / 16) steps, one epoch
    assert set(tables.read(store, "evals")["mode"]) == {"greedy", "sampled"}
    assert checkpoints.lookup(store, exp, 1)["parent_version"] == version0
