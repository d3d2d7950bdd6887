"""RLHF for the align stage: a reward model trained on the preference pairs, then online RL.

Phase 1 (``reward_model``): ``AutoModelForSequenceClassification`` with ``num_labels=1`` is
initialised from the SFT model (its ``score`` head is new, seeded by ``train.seed``) and trained
with ``trl.RewardTrainer`` on the same (prompt, chosen, rejected) pairs as DPO, LoRA or full as
``tuning`` says (with LoRA the head is trained in full: PEFT's SEQ_CLS task saves ``score``). It
follows the ``train:`` block except for ``reward_model.lr``, ``max_steps`` and ``batch_size``.
Its curves and metrics carry the prefix ``reward_model/`` (``reward_model/train_loss``; held-out
accuracy, the share of pairs where r(chosen) > r(rejected), and margin as
``reward_model/eval_accuracy`` and ``reward_model/eval_margin``). The merged reward model is saved
to ``<output_dir>/reward_model`` (atomically); a later attempt finding it skips this phase.

Phase 2 (``rloo`` or ``grpo``): ``trl.RLOOTrainer`` / ``trl.GRPOTrainer`` sample
``rl.num_generations`` completions per pair prompt from the policy (the SFT model, LoRA or full),
score each with the reward model (prompt + completion rendered with the chat template), and
update the policy with a leave-one-out (RLOO) or group-normalised (GRPO) advantage, with a KL
penalty of weight ``beta`` to the SFT model (with LoRA: the adapter-disabled model). Logged under
TRL's names: ``reward``, ``kl``, completion lengths, and the same on held-out prompts
(``eval_reward``). trl 1.16 has no PPO trainer; RLOO is its critic-free replacement.

Both phases train through stages/common/training.py (checkpoints, resume, metrics), as the
offline methods of stages/align/stage.py do, in the stage process or in launched ranks (each phase
a launch of its own: the stage process merges and saves the reward model between them, so that
exactly one process writes it and every rank of phase 2 reads the same one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.align.config import CHECKPOINTS, SFT, AlignConfig, base_model_dir, peft_config
from stages.align.data import PreferenceData, datasets_for

if TYPE_CHECKING:
    from pipeline import StageContext
    from stages.common.training import Runtime

REWARD_MODEL = "reward_model"  # the phase: its checkpoints, its output dir and its metrics' prefix
SEQ_CLS = "AutoModelForSequenceClassification"


def reward_model(cfg: AlignConfig, ctx: StageContext, rt: Runtime,
                 train_phase: Callable[[str], tuple[Path, dict]]) -> dict[str, float]:
    """Phase 1: the reward model, trained by ``train_phase(REWARD_MODEL)`` (here or in launched ranks), merged
    and saved to ``<output_dir>/reward_model`` by this process, or reused from an earlier attempt; its metrics."""
    from stages.common.training import load_model, load_tokenizer, merged_model, write_model

    out = ctx.output_dir / REWARD_MODEL
    if (out / "config.json").exists():  # saved atomically, so present means complete
        ctx.log.info("reward model: reusing %s from an earlier attempt", out)
        return {f"{REWARD_MODEL}/reused": 1.0}
    final, metrics = train_phase(REWARD_MODEL)
    sft = base_model_dir(cfg, ctx)
    model = merged_model(final, sft, lambda path: load_model(path, "model", rt, dtype=rt.export_dtype,
                                                             auto_class=SEQ_CLS, num_labels=1))
    write_model(model, load_tokenizer(sft, SFT), out)
    ctx.log.info("reward model: held-out accuracy %.3f, margin %.3f",
                 metrics.get(f"{REWARD_MODEL}/final_eval_accuracy", float("nan")),
                 metrics.get(f"{REWARD_MODEL}/final_eval_margin", float("nan")))
    return metrics


def train_reward_model(cfg: AlignConfig, ctx: StageContext, rt: Runtime, tok: Any,
                       data: PreferenceData) -> tuple[Path, dict]:
    """Phase 1's training (in this process or a launched rank): the final checkpoint and its metrics. The
    reward model pads on the right with its own copy of the tokenizer (``tok``, the policy's, pads left)."""
    from stages.common.train_ranks import synced
    from stages.common.training import check_model, load_model, load_tokenizer, train_or_resume

    sft = base_model_dir(cfg, ctx)
    rm = cfg.reward_model
    settings = replace(cfg.train, lr=rm.lr, max_steps=rm.max_steps, batch_size=rm.batch_size)
    checkpoints = ctx.output_dir / CHECKPOINTS / REWARD_MODEL
    rm_tok = load_tokenizer(sft, SFT, padding_side="right")

    def build(resume: Any) -> Any:
        from transformers import set_seed
        from trl import RewardConfig, RewardTrainer

        from stages.common.training import training_args

        args = training_args(RewardConfig, settings, rt, checkpoints, max_length=cfg.train.max_length,
                             center_rewards_coefficient=rm.center_rewards_coefficient)
        set_seed(cfg.train.seed)  # the new score head is initialised here
        model = load_model(sft, SFT, rt, auto_class=SEQ_CLS, num_labels=1)
        check_model(model, rm_tok, sft, stage="align", source=SFT, max_length=cfg.train.max_length,
                    lora=cfg.lora if cfg.tuning == "lora" else None)
        train, held_out = datasets_for(data)
        return RewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                             processing_class=rm_tok, peft_config=peft_config(cfg, "SEQ_CLS"))

    return train_or_resume(synced(build, rt), checkpoints, ctx, prefix=f"{REWARD_MODEL}/")


def train_online(cfg: AlignConfig, ctx: StageContext, rt: Runtime, tok: Any,
                 data: PreferenceData) -> tuple[Path, dict]:
    """Phase 2 (in this process or a launched rank), against the reward model phase 1 saved: the policy's
    final checkpoint and its metrics."""
    from stages.common.train_ranks import synced
    from stages.common.training import load_model, load_tokenizer, train_or_resume

    rm_dir = ctx.output_dir / REWARD_MODEL
    checkpoints = ctx.output_dir / CHECKPOINTS / cfg.method

    def build(resume: Any) -> Any:
        from datasets import Dataset

        from stages.common.training import training_args

        if cfg.method == "rloo":
            from trl import RLOOConfig as RlConfig
            from trl import RLOOTrainer as RlTrainer
        else:
            from trl import GRPOConfig as RlConfig
            from trl import GRPOTrainer as RlTrainer

        def prompts(pairs):
            return Dataset.from_list([{"prompt": p.prompt_messages()} for p in pairs])

        reward = load_model(rm_dir, "reward model", rt, auto_class=SEQ_CLS, num_labels=1)
        args = training_args(RlConfig, cfg.train, rt, checkpoints, beta=cfg.beta,
                             num_generations=cfg.rl.num_generations,
                             max_completion_length=cfg.rl.max_completion_length, temperature=cfg.rl.temperature)
        return RlTrainer(model=load_model(base_model_dir(cfg, ctx), SFT, rt), reward_funcs=reward, args=args,
                         train_dataset=prompts(data.train), eval_dataset=prompts(data.eval), processing_class=tok,
                         reward_processing_classes=load_tokenizer(rm_dir, "reward model", padding_side="right"),
                         peft_config=peft_config(cfg, "CAUSAL_LM"))

    return train_or_resume(synced(build, rt), checkpoints, ctx)
