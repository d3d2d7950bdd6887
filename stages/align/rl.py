"""RLHF for the align stage: a reward model trained on the preference pairs, then online RL.

Phase 1 (``reward_model``): ``AutoModelForSequenceClassification`` with ``num_labels=1`` is
initialised from the SFT model (its ``score`` head is new, seeded by ``train.seed``) and trained
with ``trl.RewardTrainer`` on the same (prompt, chosen, rejected) pairs as DPO, LoRA or full as
``tuning`` says (with LoRA the head is trained in full: PEFT's SEQ_CLS task saves ``score``).
Its held-out accuracy (share of pairs where r(chosen) > r(rejected)) and margin are logged as
``reward_model/eval_accuracy`` and ``reward_model/eval_margin``. The merged reward model is saved
to ``<output_dir>/reward_model`` (atomically); a later attempt finding it skips this phase.

Phase 2 (``rloo`` or ``grpo``): ``trl.RLOOTrainer`` / ``trl.GRPOTrainer`` sample
``rl.num_generations`` completions per pair prompt from the policy (the SFT model, LoRA or full),
score each with the reward model (prompt + completion rendered with the chat template), and
update the policy with a leave-one-out (RLOO) or group-normalised (GRPO) advantage, with a KL
penalty of weight ``beta`` to the SFT model (with LoRA: the adapter-disabled model). Logged:
``<method>/reward``, ``<method>/kl``, completion lengths, and the same on held-out prompts
(``eval_reward``). trl 1.16 has no PPO trainer; RLOO is its critic-free replacement.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline import StageContext
    from stages.align.data import PreferenceData
    from stages.align.stage import AlignConfig, Runtime


@dataclass(frozen=True)
class RewardModelSettings:
    lr: float = 1e-3  # learning rate of the reward model (the rest of its optimisation follows `train`)
    max_steps: int = 30  # optimizer steps of the reward model
    batch_size: int = 8  # pairs per device step
    center_rewards_coefficient: float | None = None  # pull mean rewards to 0 (the paper suggests 0.01); null: off


@dataclass(frozen=True)
class OnlineRlSettings:
    num_generations: int = 4  # completions sampled per prompt (>= 2: each one's baseline is the others)
    max_completion_length: int = 24  # tokens generated per completion at most
    temperature: float = 1.0  # sampling temperature of the policy


def train_reward_model(cfg: AlignConfig, ctx: StageContext, rt: Runtime, data: PreferenceData) -> tuple[Path, dict]:
    """Phase 1: train (or reuse) the reward model; its dir and metrics."""
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig, RewardTrainer

    from stages.align.stage import (
        datasets_for,
        load_tokenizer,
        metrics_callback,
        peft_config,
        save_model,
        train_phase,
        trainer_args,
    )

    out = ctx.output_dir / "reward_model"
    if (out / "config.json").exists():  # saved atomically, so present means complete
        ctx.log.info("reward model: reusing %s from an earlier attempt", out)
        return out, {"reward_model/reused": 1.0}
    sft = ctx.input("sft.model")
    rm = cfg.reward_model
    settings = replace(cfg.train, lr=rm.lr, max_steps=rm.max_steps, batch_size=rm.batch_size)
    args = trainer_args(RewardConfig, settings, rt, ctx.output_dir / "checkpoints" / "reward_model",
                        max_length=cfg.train.max_length, center_rewards_coefficient=rm.center_rewards_coefficient)
    set_seed(cfg.train.seed)  # the new score head is initialised here
    model = AutoModelForSequenceClassification.from_pretrained(
        sft, num_labels=1, dtype=rt.dtype, attn_implementation=rt.attn_implementation, local_files_only=True)
    tok = load_tokenizer(sft, padding_side="right")
    train, held_out = datasets_for(data)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                            processing_class=tok, peft_config=peft_config(cfg, task_type="SEQ_CLS"),
                            callbacks=[metrics_callback(ctx, "reward_model")])
    metrics = train_phase(trainer, "reward_model", ctx)
    save_model(trainer.model, load_tokenizer(sft, padding_side=None), out)
    ctx.log.info("reward model: held-out accuracy %.3f, margin %.3f",
                 metrics.get("reward_model/eval_accuracy", float("nan")),
                 metrics.get("reward_model/eval_margin", float("nan")))
    return out, metrics


def train_online(cfg: AlignConfig, ctx: StageContext, rt: Runtime, tok: Any,
                 data: PreferenceData) -> tuple[Any, dict]:
    """Phase 1 then phase 2; the trained policy (a PeftModel with LoRA) and the metrics of both phases."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    from stages.align.stage import (
        free_memory,
        load_policy,
        load_tokenizer,
        metrics_callback,
        peft_config,
        train_phase,
        trainer_args,
    )
    rm_dir, metrics = train_reward_model(cfg, ctx, rt, data)
    free_memory()  # the reward-model trainer, before the policy, its reference and the reward model load
    if cfg.method == "rloo":
        from trl import RLOOConfig as RlConfig
        from trl import RLOOTrainer as RlTrainer
    else:
        from trl import GRPOConfig as RlConfig
        from trl import GRPOTrainer as RlTrainer

    def prompts(pairs):
        return Dataset.from_list([{"prompt": p.prompt_messages()} for p in pairs])

    reward = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=rt.dtype,
                                                                local_files_only=True)
    args = trainer_args(RlConfig, cfg.train, rt, ctx.output_dir / "checkpoints" / cfg.method, beta=cfg.beta,
                        num_generations=cfg.rl.num_generations, max_completion_length=cfg.rl.max_completion_length,
                        temperature=cfg.rl.temperature)
    trainer = RlTrainer(model=load_policy(ctx.input("sft.model"), rt), reward_funcs=reward, args=args,
                        train_dataset=prompts(data.train), eval_dataset=prompts(data.eval), processing_class=tok,
                        reward_processing_classes=load_tokenizer(rm_dir, padding_side="right"),
                        peft_config=peft_config(cfg), callbacks=[metrics_callback(ctx, cfg.method)])
    metrics.update(train_phase(trainer, cfg.method, ctx))
    return trainer.model, metrics
