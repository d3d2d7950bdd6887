"""The align stage's config, the schema of conf/stage/align/*.yaml (values live in the YAML only), and
the few names its two training modules share.

The ``lora:`` and ``train:`` blocks, ``precision`` and ``attn_implementation`` are the training
toolkit's (stages/common/training.py) and mean what they mean in the sft stage; the rest belongs to
alignment: the method and its settings (``beta``, ``tuning``, ``dpo``, ``orpo``, ``kto``), the
reward model and online RL phases (``reward_model``, ``rl``) and the preference pairs (``data``,
stages/align/data.py). Its own module so that the stage and its RL phases (stages/align/rl.py)
both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.schema import Invalid
from stages.align.data import PreferenceDataConfig
from stages.common.launch import LaunchConfig
from stages.common.models import check_model_spec
from stages.common.training import Attention, LoraSettings, Precision, TrainSettings

BASE_STAGES = ("pretrain", "sft")  # the stages base_model may name

# Every DPO loss of trl 1.16.0 (DPOConfig.loss_type); checked here so a typo fails at config time.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
ONLINE_METHODS = ("rloo", "grpo")
CHECKPOINTS = "checkpoints"  # <output_dir>/checkpoints/<phase>
PREFERENCES = "preferences"  # <output_dir>/preferences/{train,eval}.parquet: the pairs, for audit and for the ranks
SFT = "base model"  # how messages name the model being aligned (base_model: the sft output by default)


def base_model_dir(cfg: AlignConfig, ctx: Any) -> Path:
    """The dir of the model aligned (policy start and reference): ``base_model`` resolved (stages/common/models.py)."""
    from stages.common.models import model_dir, parse_model

    return model_dir(parse_model(cfg.base_model, BASE_STAGES), ctx)


@dataclass(frozen=True, kw_only=True)
class DpoSettings:
    loss_type: tuple[str, ...]  # DPO loss family (trl 1.16 names); several are summed
    loss_weights: tuple[float, ...] | None  # one weight per loss_type; null: all 1.0
    label_smoothing: float  # robust: flip probability in [0, 0.5); exo_pair: epsilon > 0
    precompute_ref_log_probs: bool  # score the reference once before training (full tuning: frees its memory)

    def __post_init__(self) -> None:
        problems = []
        unknown = [t for t in self.loss_type if t not in DPO_LOSS_TYPES]
        if unknown or not self.loss_type:
            problems.append(("loss_type", f"{list(self.loss_type)}: each must be one of {', '.join(DPO_LOSS_TYPES)}"))
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            problems.append(("loss_weights", f"has {len(self.loss_weights)} values for {len(self.loss_type)} "
                                             f"loss_type entries"))
        if "exo_pair" in self.loss_type and self.label_smoothing <= 0:
            problems.append(("label_smoothing", "loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses "
                                                "1e-3)"))
        if "robust" in self.loss_type and not 0 <= self.label_smoothing < 0.5:
            problems.append(("label_smoothing", f"loss_type robust needs it in [0, 0.5), got {self.label_smoothing}"))
        Invalid.check(problems)


@dataclass(frozen=True, kw_only=True)
class OrpoSettings:
    odds_ratio_weight: float  # lambda of the ORPO paper: weight of the odds-ratio term (ORPOConfig.beta)


@dataclass(frozen=True, kw_only=True)
class KtoSettings:
    loss_type: Literal["kto", "apo_zero_unpaired"]  # KTO loss, or unpaired APO-zero
    desirable_weight: float  # weight of the losses on chosen (desirable) completions
    undesirable_weight: float  # weight of the losses on rejected (undesirable) completions


@dataclass(frozen=True, kw_only=True)
class RewardModelSettings:
    lr: float  # learning rate of the reward model (the rest of its optimisation follows `train`)
    max_steps: int  # optimizer steps of the reward model
    batch_size: int  # pairs per device step
    center_rewards_coefficient: float | None  # pull mean rewards to 0 (the paper suggests 0.01); null: off

    def __post_init__(self) -> None:
        problems = [(name, f"must be at least 1, got {getattr(self, name)}")
                    for name in ("max_steps", "batch_size") if getattr(self, name) < 1]
        if self.lr <= 0:
            problems.append(("lr", f"must be positive, got {self.lr}"))
        Invalid.check(problems)


@dataclass(frozen=True, kw_only=True)
class OnlineRlSettings:
    num_generations: int  # completions sampled per prompt (>= 2: each one's baseline is the others)
    max_completion_length: int  # tokens generated per completion at most
    temperature: float  # sampling temperature of the policy


@dataclass(frozen=True, kw_only=True)
class AlignConfig:
    base_model: str  # policy start and reference: sft or pretrain (their output), a model dir, or org/name[@rev]
    method: Literal["dpo", "orpo", "kto", "rloo", "grpo", "ppo"]  # alignment algorithm (ppo: not in trl 1.16)
    beta: float  # strength of the KL penalty to the SFT reference (dpo, kto, rloo, grpo)
    tuning: Literal["lora", "full"]  # train a LoRA adapter (merged at the end) or every weight
    precision: Precision  # auto: bf16 on a bf16-capable CUDA GPU, else fp32
    attn_implementation: Attention  # attention kernel: sdpa | eager | flash_attention_2 (CUDA + flash-attn)
    lora: LoraSettings  # adapter shape (tuning: lora)
    train: TrainSettings  # optimisation, evaluation and checkpoints of the policy (and the reward model's rest)
    data: PreferenceDataConfig  # where the preference pairs come from
    dpo: DpoSettings  # method: dpo
    orpo: OrpoSettings  # method: orpo
    kto: KtoSettings  # method: kto
    reward_model: RewardModelSettings  # method: rloo / grpo, phase 1
    rl: OnlineRlSettings  # method: rloo / grpo, phase 2
    sample_max_new_tokens: int  # tokens greedily generated from a held-out prompt at the end, logged; 0: skip
    launch: LaunchConfig  # how ranks start (pretrain's launcher); one rank trains in the stage process (execution-only)

    def __post_init__(self) -> None:
        Invalid.check(config_problems(self))


def config_problems(cfg: AlignConfig) -> list[tuple[str, str]]:
    """Bad combinations across the blocks, each as (key, message); a block's own checks are its __post_init__."""
    problems = check_model_spec(cfg.base_model, BASE_STAGES)
    if cfg.method == "ppo":
        problems.append(("method", "ppo: trl 1.16.0 has no PPO trainer (neither in trl nor trl.experimental); for "
                                   "RLHF with a reward model use method rloo (or grpo)"))
    if cfg.method in ("dpo", "kto") and cfg.beta <= 0:
        problems.append(("beta", f"method {cfg.method} needs beta > 0, got {cfg.beta}"))
    if cfg.method in ONLINE_METHODS and cfg.beta < 0:
        problems.append(("beta", f"must be >= 0 (0 turns the KL penalty off), got {cfg.beta}"))
    if cfg.method == "kto" and cfg.kto.loss_type == "kto" and cfg.train.batch_size < 2:
        problems.append(("train.batch_size", "must be >= 2 for method kto with kto.loss_type kto (its KL "
                                             "estimate pairs each example with another of the same batch)"))
    if cfg.method in ONLINE_METHODS:
        per_step = cfg.train.batch_size * cfg.train.grad_accum
        if cfg.rl.num_generations < 2:
            problems.append(("rl.num_generations", f"{cfg.method} needs >= 2 completions per prompt (its baseline "
                                                   f"is the other completions of the same prompt), got "
                                                   f"{cfg.rl.num_generations}"))
        elif per_step % cfg.rl.num_generations:
            problems.append(("train.batch_size", f"train.batch_size * train.grad_accum = {per_step} completions per "
                                                 f"step is not a multiple of rl.num_generations="
                                                 f"{cfg.rl.num_generations}"))
        if cfg.rl.num_generations >= 2 and cfg.train.eval_batch_size % cfg.rl.num_generations:
            problems.append(("train.eval_batch_size", f"{cfg.train.eval_batch_size} is not a multiple of "
                                                      f"rl.num_generations={cfg.rl.num_generations}"))
    if "lm_head" in cfg.lora.target_modules:
        problems.append(("lora.target_modules", "must not contain lm_head: TRL computes log-probs from "
                                                "lm_head.weight directly, so an adapter there would never train"))
    if cfg.sample_max_new_tokens < 0:
        problems.append(("sample_max_new_tokens", f"must be >= 0, got {cfg.sample_max_new_tokens}"))
    return problems


def peft_config(cfg: AlignConfig, task_type: str = "CAUSAL_LM") -> Any:
    """The LoRA adapter config of ``cfg.lora`` (``SEQ_CLS`` for the reward model), or None for full tuning."""
    from stages.common.training import lora_config

    return lora_config(cfg.lora, task_type) if cfg.tuning == "lora" else None
