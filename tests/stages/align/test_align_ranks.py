"""The align stage (DPO, LoRA) in 2 CPU ranks through the real DeepSpeed launcher, under ZeRO-2 handed to
the HF Trainer (``train.zero_stage: 2``; DeepSpeed's CPU accelerator over gloo): each rank keeps its
shard of the optimizer state, rank 0 alone writes metrics and manifests, a later attempt resumes from a
DeepSpeed checkpoint in ranks, and the stage process merges, samples and scores the model as it does
after an in-process run. The inputs, config and checks are test_align.py's. ~4-6 minutes on 2 busy cores
(the first DeepSpeed launch on a machine also builds its shared-memory op, ~1 minute)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from stages.align import stage as align
from stages.align.data import build_pairs, read_pairs, write_pairs
from tests.stages.align.test_align import (  # noqa: F401  (corpus, inputs, one_torch_thread: fixtures)
    DATA,
    TRAIN,
    assert_loadable_model,
    assert_weights_moved,
    config,
    corpus,
    curves,
    inputs,
    make_ctx,
    one_torch_thread,
)

STEPS = 8
ZERO2 = config(train=dataclasses.replace(TRAIN, max_steps=STEPS, eval_steps=4, save_steps=4, logging_steps=2,
                                         keep_checkpoints=True, zero_stage=2),
               launch=dataclasses.replace(config().launch, cpu_ranks=2))


def test_the_pairs_read_back_as_written(corpus, tmp_path):  # noqa: F811  (the imported fixture)
    data = build_pairs(corpus, dataclasses.replace(DATA, max_pairs=30))
    write_pairs(data, tmp_path)
    back = read_pairs(tmp_path)
    assert back.train == data.train and back.eval == data.eval


@pytest.mark.integration
def test_dpo_in_two_cpu_ranks_under_zero2_trains_resumes_and_exports(inputs, tmp_path):  # noqa: F811
    ctx = make_ctx(tmp_path, inputs)
    metrics = align.run(ZERO2, ctx)
    batch = TRAIN.batch_size * TRAIN.grad_accum
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 2 * batch
    assert metrics["steps"] == STEPS and metrics["resumed_from_step"] == 0
    # ZeRO-2 partitioned the optimizer state over both ranks: each wrote its shard of every checkpoint.
    checkpoints = ctx.output_dir / "checkpoints" / "dpo"
    final = checkpoints / f"checkpoint-{STEPS}"
    shards = sorted(p.name for p in (final / f"global_step{STEPS}").iterdir())
    assert [s for s in shards if "optim_states" in s] == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                           "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"] \
        or [s for s in shards if "optim_states" in s] == ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                          "zero_pp_rank_1_mp_rank_00_optim_states.pt"], shards
    logged = curves(tmp_path)
    assert [s for s, _ in logged["train_loss"]] == [1, 2, 4, 6, 8]  # rank 0 alone: one point per logged step
    assert [s for s, _ in logged["eval_loss"]] == [4, 8]
    assert "rewards/margins" in logged and metrics["heldout/pairs"] == metrics["data/pairs_eval"]
    assert_loadable_model(ctx.output("model"))
    assert_weights_moved(inputs["sft.model"], ctx.output("model"))
    first_model = (ctx.output("model") / "model.safetensors").read_bytes()

    # The newest checkpoint's trainer state is cut short: the stage process sets it aside, the ranks load
    # the DeepSpeed checkpoint of step 4 and train the last 4 steps again.
    os.truncate(final / "trainer_state.json", 10)
    again = align.run(ZERO2, make_ctx(tmp_path, inputs, attempt=2))
    assert again["resumed_from_step"] == STEPS // 2 and again["checkpoints_set_aside"] == 1
    assert again["steps"] == STEPS and again["world_size"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["step"] for r in records if r["attempt"] == 2 and "train_loss" in r["metrics"]]
    assert resumed == [6, 8]
    # The same steps from the same state: the same model, to float rounding.
    assert again["final_train_loss"] == pytest.approx(metrics["final_train_loss"], rel=1e-3)
    assert_loadable_model(ctx.output("model"))
    assert len((ctx.output("model") / "model.safetensors").read_bytes()) == len(first_model)
