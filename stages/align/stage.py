"""align: preference alignment of the SFT model with TRL (DPO by default).

Inputs: ``sft.model`` (the merged SFT model dir, whose tokenizer carries the chat template) and
``pii.documents`` (the cleaned corpus, from which the tiny default builds its preference pairs;
``data.source`` can instead read (prompt, chosen, rejected) records from files or a ``datasets``
dataset: see ``stages.align.data``). Output ``model``: the aligned model, merged (no adapter),
saved as a Hugging Face model dir with its tokenizer and generation config, loadable with
``AutoModelForCausalLM`` / ``AutoTokenizer``. Next to it in the stage's output dir:
``preferences/{train,eval}.parquet`` (the pairs used) and, for the online RL methods,
``reward_model/`` (the trained reward model, merged).

Methods (``method``), each a TRL trainer, LoRA on the SFT model (``tuning: lora``) or the whole
model (``tuning: full``):

- ``dpo`` (default): ``trl.DPOTrainer`` on (prompt, chosen, rejected). The loss family is
  ``dpo.loss_type`` (sigmoid = DPO, ipo, hinge, robust, ... every value of trl 1.16; several with
  ``dpo.loss_weights`` combine, e.g. MPO). The reference is the SFT model: with LoRA, TRL
  computes it with the adapter disabled (no second copy in memory); with full tuning TRL loads
  a frozen copy from the SFT dir (or precomputes its log-probs, ``dpo.precompute_ref_log_probs``).
- ``orpo``: ``trl.experimental.orpo.ORPOTrainer`` (ORPO moved to ``trl.experimental`` in trl 1.x):
  SFT loss plus an odds-ratio preference term (``orpo.odds_ratio_weight``); no reference model.
- ``kto``: ``trl.KTOTrainer`` on unpaired data derived from the pairs (chosen -> desirable,
  rejected -> undesirable, shuffled with the data seed so batches mix both), reference as in DPO.
- ``rloo`` / ``grpo``: RLHF proper, in two phases (``stages.align.rl``): a reward model
  (``trl.RewardTrainer``, ``AutoModelForSequenceClassification`` with ``num_labels=1`` initialised
  from the SFT model) trained on the pairs, then online RL of the policy against it with
  ``trl.RLOOTrainer`` or ``trl.GRPOTrainer`` (completions sampled for the pair prompts, a KL
  penalty of weight ``beta`` to the SFT reference). trl 1.16 has no PPO trainer (not in
  ``trl.experimental`` either): ``method: ppo`` is rejected with that explanation.

Metrics. Curves through a TrainerCallback forwarding every Trainer log to ``ctx.log_metrics``,
prefixed with the phase (``dpo/loss``, ``dpo/eval_rewards/accuracies``, ``reward_model/eval_accuracy``,
``rloo/reward``, ``rloo/kl``, ``kto/kl``...). At the end, for every method alike, the aligned model is
loaded back from disk, greedily completes one held-out prompt (logged: it must generate), and every
held-out pair is scored under it and under the SFT model (TRL's own tokenization and log-prob
computation, see :func:`heldout_logps`): ``heldout/reward_accuracy`` and ``heldout/reward_margin``
(DPO's implicit reward ``beta * (log pi(y|x) - log pi_sft(y|x))``, share of pairs where chosen beats
rejected and mean difference) and ``heldout/logp_accuracy`` (share of pairs where the model itself
gives chosen the higher log-probability), overall and per kind of pair (``..._shuffle``...), as
exact means over the pairs. The same names are logged at step 0 for the SFT model ("before": reward
0 by construction) and at the last step for the aligned model ("after"); the SFT model's log-prob
accuracy is also returned as ``heldout_sft/logp_accuracy``. The trainers' periodic ``eval_*``
figures are means of batch means (a short last batch weighs more), so they can differ a little.

Resumable: each phase keeps Trainer checkpoints under ``<output_dir>/checkpoints/<phase>``
(``train.save_steps``); a new attempt resumes from the latest complete one (logged as
``<phase>/resumed_from_step``), and a reward model already saved is reused. The checkpoints are
deleted at the end of a successful attempt unless ``keep_checkpoints``.

Device and precision are chosen at run time: CUDA when present (bf16 where supported with
``precision: auto``), else CPU (``use_cpu=True``, float32). One process; a multi-GPU launch
(accelerate/DeepSpeed) is not wired yet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pipeline import Stage, StageContext
from pipeline.errors import LlmpipeError
from stages.align.data import PreferenceData, PreferenceDataConfig, build_pairs, conversational, write_pairs
from stages.align.rl import OnlineRlSettings, RewardModelSettings
from stages.common.chat import ChatFormatError, check_tokenizer

# Every DPO loss of trl 1.16.0 (DPOConfig.loss_type); checked here so a typo fails at config time.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AlignInputError(LlmpipeError):
    """An input of the align stage is unusable (no chat template, no pad/eos token...)."""


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16  # adapter rank
    alpha: int = 32  # scaling numerator (effective scale alpha / r)
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: tuple[str, ...] = LORA_TARGETS  # linear layers that get an adapter (never lm_head: TRL rejects it)


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 2e-3  # peak learning rate
    max_steps: int = 20  # optimizer steps; -1: train for `epochs` instead
    epochs: float = 1.0  # passes over the training pairs when max_steps is -1
    batch_size: int = 8  # pairs (dpo/orpo), examples (kto) or completions (rloo/grpo) per device step
    eval_batch_size: int = 16  # per device, for the periodic held-out evaluation
    grad_accum: int = 1  # gradient accumulation steps
    lr_scheduler: str = "cosine"  # transformers scheduler name
    warmup: float = 0.1  # warmup: a fraction of the steps if < 1, else a number of steps
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    max_length: int = 256  # tokens of prompt + completion; longer sequences are truncated
    gradient_checkpointing: bool = False  # recompute activations in backward (needed for large models)
    eval_steps: int = 10  # steps between held-out evaluations
    save_steps: int = 10  # steps between checkpoints (execution-only)
    logging_steps: int = 5  # steps between logged metrics (execution-only)
    seed: int = 0  # model init (adapter / reward head), data order and sampling


@dataclass(frozen=True)
class DpoSettings:
    loss_type: tuple[str, ...] = ("sigmoid",)  # DPO loss family (trl 1.16 names); several are summed
    loss_weights: tuple[float, ...] | None = None  # one weight per loss_type; null: all 1.0
    label_smoothing: float = 0.0  # robust: flip probability in [0, 0.5); exo_pair: epsilon > 0
    precompute_ref_log_probs: bool = False  # score the reference once before training (full tuning: frees its memory)


@dataclass(frozen=True)
class OrpoSettings:
    odds_ratio_weight: float = 0.1  # lambda of the ORPO paper: weight of the odds-ratio term (ORPOConfig.beta)


@dataclass(frozen=True)
class KtoSettings:
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"  # KTO loss, or unpaired APO-zero
    desirable_weight: float = 1.0  # weight of the losses on chosen (desirable) completions
    undesirable_weight: float = 1.0  # weight of the losses on rejected (undesirable) completions


@dataclass(frozen=True)
class AlignConfig:
    method: Literal["dpo", "orpo", "kto", "rloo", "grpo", "ppo"] = "dpo"  # alignment algorithm (ppo: not in trl 1.16)
    beta: float = 0.1  # strength of the KL penalty to the SFT reference (dpo, kto, rloo, grpo)
    tuning: Literal["lora", "full"] = "lora"  # train a LoRA adapter (merged at the end) or every weight
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on a bf16-capable CUDA GPU, else fp32
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # attention kernel
    lora: LoraSettings = field(default_factory=LoraSettings)  # adapter shape (tuning: lora)
    train: TrainSettings = field(default_factory=TrainSettings)  # optimisation of the policy
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)  # preference pairs from the corpus
    dpo: DpoSettings = field(default_factory=DpoSettings)  # method: dpo
    orpo: OrpoSettings = field(default_factory=OrpoSettings)  # method: orpo
    kto: KtoSettings = field(default_factory=KtoSettings)  # method: kto
    reward_model: RewardModelSettings = field(default_factory=RewardModelSettings)  # method: rloo / grpo, phase 1
    rl: OnlineRlSettings = field(default_factory=OnlineRlSettings)  # method: rloo / grpo, phase 2
    sample_tokens: int = 24  # tokens greedily generated from a held-out prompt at the end, logged (execution-only)
    keep_checkpoints: bool = False  # keep Trainer checkpoints after success (execution-only)

    def __post_init__(self) -> None:
        problems = config_problems(self)
        if problems:
            raise ValueError("; ".join(problems))


def config_problems(cfg: AlignConfig) -> list[str]:
    """Bad values and bad combinations, each naming the flag; checked when the config is built."""
    problems = []
    if cfg.method == "ppo":
        problems.append("method=ppo: trl 1.16.0 has no PPO trainer (neither in trl nor trl.experimental); for RLHF "
                        "with a reward model use method=rloo (or grpo)")
    if cfg.method in ("dpo", "kto") and cfg.beta <= 0:
        problems.append(f"beta={cfg.beta}: method={cfg.method} needs beta > 0")
    if cfg.method in ("rloo", "grpo") and cfg.beta < 0:
        problems.append(f"beta={cfg.beta}: must be >= 0 (0 turns the KL penalty off)")
    unknown = [t for t in cfg.dpo.loss_type if t not in DPO_LOSS_TYPES]
    if unknown or not cfg.dpo.loss_type:
        problems.append(f"dpo.loss_type={list(cfg.dpo.loss_type)}: each must be one of {', '.join(DPO_LOSS_TYPES)}")
    if cfg.dpo.loss_weights is not None and len(cfg.dpo.loss_weights) != len(cfg.dpo.loss_type):
        problems.append(f"dpo.loss_weights has {len(cfg.dpo.loss_weights)} values for "
                        f"{len(cfg.dpo.loss_type)} dpo.loss_type entries")
    if "exo_pair" in cfg.dpo.loss_type and cfg.dpo.label_smoothing <= 0:
        problems.append("dpo.loss_type exo_pair needs dpo.label_smoothing > 0 (the EXO paper uses 1e-3)")
    if "robust" in cfg.dpo.loss_type and not 0 <= cfg.dpo.label_smoothing < 0.5:
        problems.append(f"dpo.label_smoothing={cfg.dpo.label_smoothing}: loss_type robust needs it in [0, 0.5)")
    if cfg.method == "kto" and cfg.kto.loss_type == "kto" and cfg.train.batch_size < 2:
        problems.append("train.batch_size must be >= 2 for method=kto with kto.loss_type=kto (its KL estimate "
                        "pairs each example with another of the same batch)")
    if cfg.method in ("rloo", "grpo"):
        per_step = cfg.train.batch_size * cfg.train.grad_accum
        if cfg.rl.num_generations < 2:
            problems.append(f"rl.num_generations={cfg.rl.num_generations}: {cfg.method} needs >= 2 completions per "
                            "prompt (its baseline is the other completions of the same prompt)")
        elif per_step % cfg.rl.num_generations:
            problems.append(f"train.batch_size * train.grad_accum = {per_step} completions per step is not a "
                            f"multiple of rl.num_generations={cfg.rl.num_generations}")
        if cfg.train.eval_batch_size % cfg.rl.num_generations:
            problems.append(f"train.eval_batch_size={cfg.train.eval_batch_size} is not a multiple of "
                            f"rl.num_generations={cfg.rl.num_generations}")
    if cfg.tuning == "lora" and (cfg.lora.r < 1 or not cfg.lora.target_modules):
        problems.append("tuning=lora needs lora.r >= 1 and at least one lora.target_modules entry")
    if "lm_head" in cfg.lora.target_modules:
        problems.append("lora.target_modules must not contain lm_head: TRL computes log-probs from lm_head.weight "
                        "directly, so an adapter there would never train")
    if cfg.train.max_steps == 0 or (cfg.train.max_steps < 0 and cfg.train.epochs <= 0):
        problems.append("train.max_steps must be > 0 (or -1 with train.epochs > 0)")
    for name in ("batch_size", "eval_batch_size", "grad_accum", "eval_steps", "save_steps", "logging_steps"):
        if getattr(cfg.train, name) < 1:
            problems.append(f"train.{name} must be >= 1, got {getattr(cfg.train, name)}")
    return problems


# ---------------------------------------------------------------- runtime


@dataclass(frozen=True)
class Runtime:
    """Where and how this attempt trains: decided from what the machine has."""

    use_cpu: bool
    dtype: Any  # torch dtype the models are loaded in
    bf16: bool  # Trainer mixed precision
    attn_implementation: str


def resolve_runtime(cfg: AlignConfig) -> Runtime:
    import torch

    cuda = torch.cuda.is_available()
    want = cfg.precision
    if want == "auto":
        want = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if cfg.attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not (cuda and is_flash_attn_2_available()):
            raise AlignInputError("stage.align.attn_implementation=flash_attention_2 needs a CUDA GPU and the "
                                  "flash-attn package; use sdpa")
    bf16 = want == "bf16"
    # A frozen LoRA base can live in bf16; fully tuned weights stay float32 under bf16 autocast (stable AdamW).
    load_dtype = torch.bfloat16 if bf16 and cfg.tuning == "lora" else torch.float32
    return Runtime(use_cpu=not cuda, dtype=load_dtype, bf16=bf16, attn_implementation=cfg.attn_implementation)


def offline_hub() -> None:
    """Nothing in this stage may reach a model hub (telemetry included)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_tokenizer(model_dir: Path, padding_side: str | None = "left") -> Any:
    """The SFT tokenizer; it must carry a chat template and an eos token (pad falls back to eos).

    Left padding for the trainers (generation needs it; the preference collators pad themselves);
    ``padding_side=None`` keeps the saved setting, for the copy saved with the aligned model.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if not tok.chat_template:
        raise AlignInputError(f"input sft.model: the tokenizer in {model_dir} has no chat_template; the sft stage "
                              "sets one, and preference prompts are rendered with it")
    if tok.eos_token is None:
        raise AlignInputError(f"input sft.model: the tokenizer in {model_dir} has no eos_token")
    try:
        check_tokenizer(tok)  # the chat markers must be single special tokens, or turns would not line up
    except ChatFormatError as e:
        raise AlignInputError(f"input sft.model: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if padding_side:
        tok.padding_side = padding_side
    return tok


def load_policy(model_dir: Path, rt: Runtime) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=rt.dtype, attn_implementation=rt.attn_implementation,
                                                local_files_only=True)


def peft_config(cfg: AlignConfig, task_type: str = "CAUSAL_LM") -> Any:
    """The LoRA adapter config, or None for full tuning."""
    if cfg.tuning != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type=task_type)


def trainer_args(config_cls: type, train: TrainSettings, rt: Runtime, out_dir: Path, **specific: Any) -> Any:
    """A TRL config (a TrainingArguments subclass) with the settings every phase shares; ``specific`` wins."""
    common = dict(
        output_dir=str(out_dir), per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size, gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr, max_steps=train.max_steps, num_train_epochs=train.epochs,
        lr_scheduler_type=train.lr_scheduler, warmup_steps=train.warmup, weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm, logging_steps=train.logging_steps, eval_strategy="steps",
        eval_steps=train.eval_steps, save_strategy="steps", save_steps=train.save_steps, save_total_limit=2,
        report_to=[], use_cpu=rt.use_cpu, bf16=rt.bf16, gradient_checkpointing=train.gradient_checkpointing,
        seed=train.seed, data_seed=train.seed, dataloader_num_workers=0, disable_tqdm=False)
    return config_cls(**{**common, **specific})


def metrics_callback(ctx: StageContext, phase: str) -> Any:
    """A TrainerCallback that forwards every Trainer log (train and eval) to ctx.log_metrics."""
    from transformers import TrainerCallback

    class ForwardLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            numeric = {f"{phase}/{k}": v for k, v in logs.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if numeric:
                ctx.log_metrics(numeric, step=state.global_step)

    return ForwardLogs()


def last_checkpoint(phase_dir: Path, log: logging.Logger) -> str | None:
    """The newest complete checkpoint (its trainer_state.json, written last, exists), or None."""
    if not phase_dir.is_dir():
        return None
    found = []
    for d in phase_dir.glob("checkpoint-*"):
        step = d.name.rpartition("-")[2]
        if not step.isdigit():
            continue
        if (d / "trainer_state.json").exists():
            found.append((int(step), d))
        else:
            log.warning("ignoring incomplete checkpoint %s (no trainer_state.json)", d)
    return str(max(found)[1]) if found else None


def train_phase(trainer: Any, phase: str, ctx: StageContext) -> dict[str, float]:
    """Train (resuming from this phase's latest checkpoint), evaluate; the phase's final metrics."""
    resume = last_checkpoint(Path(trainer.args.output_dir), ctx.log)
    resumed_step = 0
    if resume:
        resumed_step = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
        ctx.log.info("%s: resuming from %s (step %d)", phase, resume, resumed_step)
    started = time.time()
    out = trainer.train(resume_from_checkpoint=resume)
    metrics = {f"{phase}/{k}": float(v) for k, v in out.metrics.items() if isinstance(v, (int, float))}
    metrics.update({f"{phase}/{k}": float(v) for k, v in final_eval(trainer).items() if isinstance(v, (int, float))})
    metrics[f"{phase}/steps"] = float(trainer.state.global_step)
    metrics[f"{phase}/resumed_from_step"] = float(resumed_step)
    metrics[f"{phase}/seconds"] = time.time() - started
    return metrics


def final_eval(trainer: Any) -> dict[str, Any]:
    """The held-out metrics at the last step: logged already when it was an eval step, else evaluated now."""
    evals = [h for h in trainer.state.log_history if any(k.startswith("eval_") for k in h)]
    if evals and evals[-1].get("step") == trainer.state.global_step:
        return evals[-1]
    return trainer.evaluate()


def save_model(model: Any, tok: Any, out: Path) -> None:
    """Merge a LoRA adapter into its base and save the plain model + tokenizer to ``out``, atomically."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.config.use_cache = True  # training turns the KV cache off; generation wants it
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


# ---------------------------------------------------------------- offline preference methods


def datasets_for(data: PreferenceData) -> tuple[Any, Any]:
    """Train and held-out pairs as ``datasets`` in TRL's conversational preference format."""
    from datasets import Dataset

    return (Dataset.from_list([conversational(p) for p in data.train]),
            Dataset.from_list([conversational(p) for p in data.eval]))


def train_dpo(cfg: AlignConfig, ctx: StageContext, rt: Runtime, tok: Any, data: PreferenceData) -> tuple[Any, dict]:
    from trl import DPOConfig, DPOTrainer

    train, held_out = datasets_for(data)
    args = trainer_args(DPOConfig, cfg.train, rt, ctx.output_dir / "checkpoints" / "dpo", beta=cfg.beta,
                        loss_type=list(cfg.dpo.loss_type),
                        loss_weights=list(cfg.dpo.loss_weights) if cfg.dpo.loss_weights else None,
                        label_smoothing=cfg.dpo.label_smoothing, max_length=cfg.train.max_length,
                        precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs)
    # ref_model=None: with LoRA the reference is the adapter-disabled SFT model; with full tuning TRL loads
    # a frozen copy from the SFT dir (the policy's name_or_path).
    trainer = DPOTrainer(model=load_policy(ctx.input("sft.model"), rt), ref_model=None, args=args,
                         train_dataset=train, eval_dataset=held_out, processing_class=tok,
                         peft_config=peft_config(cfg), callbacks=[metrics_callback(ctx, "dpo")])
    return trainer.model, train_phase(trainer, "dpo", ctx)


def train_orpo(cfg: AlignConfig, ctx: StageContext, rt: Runtime, tok: Any, data: PreferenceData) -> tuple[Any, dict]:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    train, held_out = datasets_for(data)
    args = trainer_args(ORPOConfig, cfg.train, rt, ctx.output_dir / "checkpoints" / "orpo",
                        beta=cfg.orpo.odds_ratio_weight, max_length=cfg.train.max_length,
                        remove_unused_columns=False)
    trainer = ORPOTrainer(model=load_policy(ctx.input("sft.model"), rt), args=args, train_dataset=train,
                          eval_dataset=held_out, processing_class=tok, peft_config=peft_config(cfg),
                          callbacks=[metrics_callback(ctx, "orpo")])
    return trainer.model, train_phase(trainer, "orpo", ctx)


def train_kto(cfg: AlignConfig, ctx: StageContext, rt: Runtime, tok: Any, data: PreferenceData) -> tuple[Any, dict]:
    from trl import KTOConfig, KTOTrainer, unpair_preference_dataset

    train, held_out = datasets_for(data)
    # chosen -> label True, rejected -> label False; unpairing lists a batch's chosen rows before its rejected
    # ones, and KTO samples sequentially, so shuffle to mix desirable and undesirable examples in each batch.
    train = unpair_preference_dataset(train).shuffle(seed=cfg.data.seed)
    held_out = unpair_preference_dataset(held_out).shuffle(seed=cfg.data.seed)
    args = trainer_args(KTOConfig, cfg.train, rt, ctx.output_dir / "checkpoints" / "kto", beta=cfg.beta,
                        loss_type=cfg.kto.loss_type, desirable_weight=cfg.kto.desirable_weight,
                        undesirable_weight=cfg.kto.undesirable_weight, max_length=cfg.train.max_length)
    trainer = KTOTrainer(model=load_policy(ctx.input("sft.model"), rt), ref_model=None, args=args,
                         train_dataset=train, eval_dataset=held_out, processing_class=tok,
                         peft_config=peft_config(cfg), callbacks=[metrics_callback(ctx, "kto")])
    return trainer.model, train_phase(trainer, "kto", ctx)


# ---------------------------------------------------------------- final checks


def heldout_logps(cfg: AlignConfig, ctx: StageContext, rt: Runtime, policy: Any,
                  data: PreferenceData) -> dict[str, list[float]]:
    """Summed completion log-probs of every held-out pair under ``policy`` and under the SFT model.

    TRL does the scoring: a DPOTrainer built on the held-out pairs tokenizes them with the chat
    template and pads them with its collator (exactly as in training), and its
    ``compute_ref_log_probs`` gives log pi(chosen|x) and log pi(rejected|x) for a batch under any
    model it has prepared. Nothing is trained. Returns lists aligned with the pairs kept by TRL (a
    pair whose prompt alone fills ``train.max_length`` is dropped), plus their kinds (corruption).
    """
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from trl import DPOConfig, DPOTrainer

    rows = [{**conversational(p), "kind": p.kind} for p in data.eval]
    args = trainer_args(DPOConfig, replace(cfg.train, max_steps=1), rt,
                        ctx.output_dir / "checkpoints" / "heldout_eval", beta=cfg.beta,
                        max_length=cfg.train.max_length, eval_strategy="no", save_strategy="no")
    scorer = DPOTrainer(model=policy, ref_model=load_policy(ctx.input("sft.model"), rt), args=args,
                        train_dataset=Dataset.from_list(rows), processing_class=load_tokenizer(ctx.output("model")))
    pairs = scorer.train_dataset  # tokenized; keeps the kind column
    loader = DataLoader(pairs.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]),
                        batch_size=cfg.train.eval_batch_size, collate_fn=scorer.data_collator, shuffle=False)
    out: dict[str, list] = {"policy_chosen": [], "policy_rejected": [], "sft_chosen": [], "sft_rejected": []}
    scorer.model.eval()
    scorer.ref_model.eval()
    for batch in loader:
        batch = {k: v.to(scorer.accelerator.device) for k, v in batch.items()}
        for name, model in (("policy", scorer.model), ("sft", scorer.ref_model)):
            chosen, rejected = scorer.compute_ref_log_probs(model, batch)
            out[f"{name}_chosen"] += chosen.float().cpu().tolist()
            out[f"{name}_rejected"] += rejected.float().cpu().tolist()
    out["kind"] = list(pairs["kind"])
    return out


def preference_scores(logps: dict[str, list], policy: str, beta: float) -> dict[str, float]:
    """Held-out preference figures of ``policy`` ("policy" or "sft") from per-pair log-probs.

    ``reward_*``: DPO's implicit reward r(y) = beta * (log pi(y|x) - log pi_sft(y|x)), as TRL's
    ``rewards/accuracies`` (share of pairs with r(chosen) > r(rejected)) and ``rewards/margins``
    (mean r(chosen) - r(rejected)), but exact means over the pairs. For the SFT model itself the
    reward is 0 by construction (accuracy 0, margin 0): the starting point of every method.
    ``logp_accuracy``: share of pairs where the model gives the chosen continuation the higher
    log-probability, a measure that needs no reference (meaningful before training too).
    Each overall and per kind of pair (the corruption: ``reward_accuracy_shuffle``...).
    """
    kinds = logps["kind"]
    groups = {"": range(len(kinds))}
    for kind in sorted(set(kinds)):
        groups[f"_{kind}"] = [i for i, k in enumerate(kinds) if k == kind]
    pc, pr = logps[f"{policy}_chosen"], logps[f"{policy}_rejected"]
    sc, sr = logps["sft_chosen"], logps["sft_rejected"]
    metrics = {}
    for suffix, idx in groups.items():
        margins = [beta * ((pc[i] - sc[i]) - (pr[i] - sr[i])) for i in idx]
        metrics[f"heldout/reward_accuracy{suffix}"] = sum(m > 0 for m in margins) / len(margins)
        metrics[f"heldout/reward_margin{suffix}"] = sum(margins) / len(margins)
        metrics[f"heldout/logp_accuracy{suffix}"] = sum(pc[i] > pr[i] for i in idx) / len(idx)
    metrics["heldout/pairs"] = float(len(kinds))
    return metrics


def heldout_metrics(cfg: AlignConfig, ctx: StageContext, rt: Runtime, policy: Any, data: PreferenceData,
                    step: int) -> dict[str, float]:
    """Score the held-out pairs before (the SFT model, logged at step 0) and after (``policy``, logged at ``step``).

    Both points carry the same metric names, so each is a two-point curve in MLflow; the "after"
    figures are also the stage's final metrics, the "before" ones are returned as ``heldout_sft/*``.
    """
    logps = heldout_logps(cfg, ctx, rt, policy, data)
    free_memory()
    if not logps["kind"]:
        ctx.log.warning("no held-out pair left to score: every prompt fills train.max_length=%d",
                        cfg.train.max_length)
        return {"heldout/pairs": 0.0}
    before, after = preference_scores(logps, "sft", cfg.beta), preference_scores(logps, "policy", cfg.beta)
    ctx.log_metrics(before, step=0)
    ctx.log_metrics(after, step=step)
    ctx.log.info("held-out pairs (%d): reward accuracy %.3f, margin %.4f; log-prob accuracy %.3f (SFT model %.3f)",
                 len(logps["kind"]), after["heldout/reward_accuracy"], after["heldout/reward_margin"],
                 after["heldout/logp_accuracy"], before["heldout/logp_accuracy"])
    return {**after, **{k.replace("heldout/", "heldout_sft/"): v for k, v in before.items() if "logp" in k}}


def free_memory() -> None:
    """Drop the finished trainer (its optimizer state, its model copies) before loading models again: trainers
    and their callbacks reference each other, so only the cycle collector frees them."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sample_generation(model: Any, tok: Any, prompt: list[dict[str, str]], max_new_tokens: int) -> tuple[str, int]:
    """Greedy completion of one chat prompt: (text, number of new tokens)."""
    import torch

    enc = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:]
    return tok.decode(new, skip_special_tokens=True), int(new.numel())


# ---------------------------------------------------------------- stage


def run(cfg: AlignConfig, ctx: StageContext) -> dict[str, float]:
    started = time.time()
    offline_hub()
    rt = resolve_runtime(cfg)
    ctx.log.info("align: method=%s tuning=%s on %s, dtype %s, bf16 autocast %s", cfg.method, cfg.tuning,
                 "cpu" if rt.use_cpu else "cuda", rt.dtype, rt.bf16)
    tok = load_tokenizer(ctx.input("sft.model"))
    data = build_pairs(ctx.input("pii.documents"), cfg.data)
    write_pairs(data, ctx.output_dir / "preferences")
    metrics = data.metrics()
    ctx.log.info("preference pairs: %d train, %d held out (%s)", len(data.train), len(data.eval),
                 ", ".join(f"{k}={v}" for k, v in sorted(data.counts.items())))

    if cfg.method in ("rloo", "grpo"):
        from stages.align.rl import train_online

        model, phase_metrics = train_online(cfg, ctx, rt, tok, data)
    else:
        model, phase_metrics = {"dpo": train_dpo, "orpo": train_orpo, "kto": train_kto}[cfg.method](
            cfg, ctx, rt, tok, data)
    metrics.update(phase_metrics)
    save_model(model, load_tokenizer(ctx.input("sft.model"), padding_side=None), ctx.output("model"))
    del model
    free_memory()

    # Load the saved model back: it must load and generate, and it is what the held-out score measures.
    policy = load_policy(ctx.output("model"), rt)
    if not rt.use_cpu:
        policy.to("cuda")  # the trainers place their models; this one generates before any trainer sees it
    text, new_tokens = sample_generation(policy, tok, data.eval[0].prompt_messages(),
                                         cfg.sample_tokens)
    ctx.log.info("sample from the aligned model: %r", text)
    metrics["sample/new_tokens"] = float(new_tokens)
    metrics.update(heldout_metrics(cfg, ctx, rt, policy, data, int(phase_metrics[f"{cfg.method}/steps"])))
    if not cfg.keep_checkpoints:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(ctx.output_dir / "checkpoints")
    metrics["seconds_total"] = time.time() - started
    return metrics


STAGE = Stage(
    name="align",
    config=AlignConfig,
    run=run,
    inputs=("sft.model", "pii.documents"),
    outputs=("model",),
    unhashed=frozenset(["train.save_steps", "train.logging_steps", "sample_tokens", "keep_checkpoints"]),
    resumable=True,
    description="Preference alignment (DPO by default) with TRL.",
)
