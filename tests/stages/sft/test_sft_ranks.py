"""The sft stage in 2 CPU ranks through the real DeepSpeed launcher (gloo, plain DDP), as pretrain is tested:
the stage process prepares the data, each rank trains the same SFTTrainer on its share of every batch,
rank 0 alone writes metrics and manifests, a later attempt resumes in ranks, and the stage process
exports a model that loads and chats. The world, config and checks are test_sft.py's (the same 12-step
run on the same tiny model), with ``launch.cpu_ranks: 2``. ~3-5 minutes on 2 busy cores, most of it the
launcher and the ranks' imports."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import pytest

from stages.common.train_ranks import JOB_FILE, RESULT_FILE
from stages.sft.data import read_jsonl, write_jsonl
from stages.sft.stage import CHECKPOINTS, run
from tests.stages.sft.test_sft import (  # noqa: F401  (world, one_torch_thread: fixtures)
    CFG,
    assert_trained_and_usable,
    attempt,
    chat_generate,
    curve,
    one_torch_thread,
    run_stage,
    with_train,
    world,
)

TWO_RANKS = replace(with_train(CFG, keep_checkpoints=True), launch=replace(CFG.launch, cpu_ranks=2))


def test_the_conversations_read_back_as_written(tmp_path):
    from stages.sft.data import Example

    examples = [Example([{"role": "user", "content": "q é"}, {"role": "assistant", "content": "a"}], "k", "title"),
                Example([{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}], "j")]
    write_jsonl(examples, tmp_path / "train.jsonl")
    back = read_jsonl(tmp_path / "train.jsonl")
    assert [(e.messages, e.template) for e in back] == [(e.messages, e.template) for e in examples]


@pytest.mark.integration
def test_two_cpu_ranks_train_resume_and_export(world):  # noqa: F811  (the imported fixture)
    metrics, ctx = run_stage(world, TWO_RANKS, "two-ranks")
    assert_trained_and_usable(metrics, ctx, checkpoints_kept=True)
    batch = CFG.train.batch_size * CFG.train.grad_accum
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 2 * batch
    job = json.loads((ctx.output_dir / JOB_FILE).read_text())
    assert job["world_size"] == 2 and json.loads((ctx.output_dir / RESULT_FILE).read_text())["metrics"]
    # Both ranks took part: each step took batch conversations from each, so an epoch has half the steps of
    # one process (HF counts an epoch in per-rank batches).
    steps = CFG.train.max_steps
    per_epoch = math.ceil(metrics["train_examples"] / (2 * batch))
    assert per_epoch < math.ceil(metrics["train_examples"] / batch)
    assert dict(curve(ctx, "epoch"))[steps] == pytest.approx(steps / per_epoch)
    final = ctx.output_dir / CHECKPOINTS / f"checkpoint-{steps}"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in final.iterdir()}  # each rank saved its own
    # Rank 0 alone writes metrics: one point per logged step.
    logged = [s for s, _ in curve(ctx, "train_loss")]
    assert logged == sorted(set(logged)) and logged[-1] == steps

    # The newest checkpoint is cut short: the stage process sets it aside before the launch, and the ranks
    # resume from the one before it, then finish the run.
    half = steps // 2
    os.truncate(final / "adapter_model.safetensors", 1000)
    again = run(TWO_RANKS, attempt(ctx, 2))
    assert again["resumed_from_step"] == half and again["checkpoints_set_aside"] == 1
    assert again["steps"] == steps and again["world_size"] == 2
    assert curve(ctx, "resume_step") == [(half, half)]
    records = [json.loads(line) for line in ctx.metrics_file.read_text().splitlines()]
    resumed = [r["step"] for r in records if r["attempt"] == 2 and "train_loss" in r["metrics"]]
    assert resumed and min(resumed) > half and max(resumed) == steps
    assert again["first_train_loss"] == pytest.approx(metrics["first_train_loss"])  # the history spans attempts
    text, new_tokens = chat_generate(ctx.output("model"))
    assert "<|assistant|>\n" in text and new_tokens
