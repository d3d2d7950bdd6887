"""pretrain: DeepSpeed ZeRO pretraining of a Llama-architecture model from random weights.

The stage process checks its inputs, writes a DeepSpeed config and a job file into its output
dir, and starts the ranks with the DeepSpeed launcher (stages/common/launch.py: 2 CPU ranks
here, the GPUs of a node, or every node of a cluster). Each rank runs
``python -m stages.pretrain.loop`` (the training loop); this process waits, then returns the
summary rank 0 wrote.

Why the DeepSpeed engine (``deepspeed.initialize``) and not the HF Trainer: pretraining on packed
token shards needs no collator, no label logic and no callbacks; owning the ~100-line loop gives
exact control over what a checkpoint means (the step, from which the data position follows, so a
resumed run continues mid-epoch without replaying the loader), over per-step metrics (tokens/s,
MFU, grad norm) and over the ZeRO-3 export, and it keeps the stage's hot path identical to a plain
``deepspeed.initialize`` script (bench/train.py measures the difference). The Trainer would add
accelerate's CPU quirks (``use_cpu``) for nothing we use.

Output ``model``: a Hugging Face model dir (safetensors weights, config.json,
generation_config.json) with the tokenizer's files copied in, written atomically by rank 0 at
the end (ZeRO-3 shards are consolidated first). Checkpoints live in ``checkpoints/`` of the
output dir, which persists across attempts of the same fingerprint: a re-run resumes from the
newest complete checkpoint, one whose files match its manifest (stages/pretrain/checkpoints.py);
a corrupt newer one is set aside with a warning. The summary says where the attempt started
(``resumed_from_step``, 0 for a clean start) and how many checkpoints it set aside
(``checkpoints_set_aside``). When the ranks fail, the stage's error carries the first failing
rank's exception (a checkpoint DeepSpeed cannot load, say), not only the log.

Before a time limit (pipeline/save_request.py: Slurm's signal, ``cluster.slurm.signal_lead_s`` ahead),
the ranks agree at the next optimizer-step boundary that a save was requested, save a checkpoint of
that step and exit without exporting; the stage then fails with SavedOnRequest ("saved at step N on
the time-limit signal"), and the requeued job resumes from exactly that checkpoint.

What is fingerprinted: the model, the data order (seed, global batch), the optimisation (lr
schedule, AdamW, clipping, steps) and the precision. Execution-only (``unhashed``): how the same
computation is laid out (micro batch and so gradient accumulation, number of ranks, ZeRO stage,
offload, gradient checkpointing, attention kernel) and how it is observed (log, eval and
checkpoint intervals, MFU peak). The global batch is fixed and the data sampler hands every step
the same sequences whatever the number of ranks, so these change only floating-point rounding,
not the result. One caveat: DeepSpeed cannot load a ZeRO checkpoint into another number of ranks
or another ZeRO stage, so a resume with a different layout stops with a CheckpointLayoutError
instead of silently restarting.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import Stage, StageContext
from pipeline.errors import LlmpipeError
from pipeline.files import write_json_atomic
from pipeline.save_request import SavedOnRequest, request_path
from pipeline.schema import Invalid, to_plain
from stages.common.config import ModelConfig
from stages.common.launch import (
    RANK_ERRORS,
    REPO_ROOT,
    LaunchConfig,
    LaunchPlan,
    free_port,
    plan_launch,
    rank_failure,
    run_launch,
)
from stages.pretrain.checkpoints import Resume, checkpoint_tag, choose_resume, complete_checkpoints

LOOP_MODULE = "stages.pretrain.loop"
DS_CONFIG_FILE = "ds_config.json"
JOB_FILE = "pretrain_job.json"
SUMMARY_FILE = "train_summary.json"
HOSTFILE = "hostfile"
CHECKPOINTS = "checkpoints"
SAVED_ON_REQUEST = "saved_on_request.json"  # the step the ranks saved at and stopped, on a save request
OFFLOAD = Literal["none", "cpu", "nvme"]


class PretrainInputError(LlmpipeError):
    """The tokenizer or token shards cannot train this model (sizes disagree, a split is too small...)."""


class TrainingFailed(LlmpipeError):
    """The launched ranks exited with an error (their traceback is in the stage log above this)."""


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    model: ModelConfig  # architecture (usually ${model})
    seed: int  # weight initialisation and data order
    global_batch_size: int  # sequences per optimizer step, over all ranks and accumulation steps
    micro_batch_size: int  # sequences per rank per forward pass; accumulation makes up the global batch
    max_steps: int  # optimizer steps (unused when max_tokens is set)
    max_tokens: int | None  # train on this many tokens instead: ceil(tokens / (global batch x seq_len)) steps
    lr: float  # peak learning rate
    min_lr_ratio: float  # the cosine decay ends at lr x min_lr_ratio
    warmup_steps: int  # linear warmup from lr / warmup_steps up to lr
    weight_decay: float  # AdamW decoupled weight decay (norm weights and biases are exempt)
    adam_beta1: float  # AdamW first-moment decay
    adam_beta2: float  # AdamW second-moment decay
    adam_eps: float  # AdamW epsilon
    grad_clip: float  # clip the global gradient norm to this; 0 turns clipping off
    precision: Literal["auto", "bf16", "fp32"]  # auto: bf16 on a GPU that supports it, else fp32
    zero_stage: int  # DeepSpeed ZeRO stage: 0 none, 1 optimizer, 2 + gradients, 3 + parameters sharded
    offload_optimizer: OFFLOAD  # ZeRO offload of optimizer states (stage >= 1)
    offload_param: OFFLOAD  # ZeRO offload of parameters (stage 3 only)
    nvme_path: str | None  # local NVMe directory for nvme offload
    gradient_checkpointing: bool  # recompute activations in the backward pass to save memory
    attention: Literal["sdpa", "eager", "flash_attention_2"]  # attention kernel
    eval_every: int  # steps between evaluations on the val split (also at step 0 and at the end)
    eval_sequences: int  # val sequences per evaluation, seeded across the split (all of a smaller split)
    checkpoint_every: int  # steps between checkpoints (also one at the end)
    keep_checkpoints: int  # newest complete checkpoints kept; 2+ leaves one to fall back to if the newest is corrupt
    log_every: int  # steps between metric records
    loader_workers: int  # DataLoader worker processes per rank (0: load in the training process)
    peak_tflops: float | None  # one accelerator's peak for MFU; null: a table by device name
    launch: LaunchConfig  # how the ranks are started

    def __post_init__(self) -> None:
        problems = [(name, f"must be at least 1, got {getattr(self, name)}")
                    for name in ("global_batch_size", "micro_batch_size", "max_steps", "warmup_steps", "eval_every",
                                 "eval_sequences", "checkpoint_every", "keep_checkpoints", "log_every")
                    if getattr(self, name) < 1]
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append(("max_tokens", f"must be positive or null, got {self.max_tokens}"))
        if self.loader_workers < 0:
            problems.append(("loader_workers", f"must be >= 0, got {self.loader_workers}"))
        if not 0 <= self.zero_stage <= 3:
            problems.append(("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}"))
        if self.offload_optimizer != "none" and self.zero_stage < 1:
            problems.append(("offload_optimizer", f"{self.offload_optimizer} needs zero_stage >= 1, "
                                                  f"got zero_stage={self.zero_stage}"))
        if self.offload_param != "none" and self.zero_stage != 3:
            problems.append(("offload_param", f"{self.offload_param} needs zero_stage 3, "
                                              f"got zero_stage={self.zero_stage}"))
        if "nvme" in (self.offload_optimizer, self.offload_param) and not self.nvme_path:
            problems.append(("nvme_path", "nvme offload needs nvme_path (a directory on a local NVMe drive)"))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"))
        if self.lr <= 0:
            problems.append(("lr", f"must be positive, got {self.lr}"))
        for name in ("grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                problems.append((name, f"must be >= 0, got {getattr(self, name)}"))
        Invalid.check(problems)


# ---------------------------------------------------------------- inputs and schedule


@dataclass(frozen=True)
class DataInfo:
    """What the inputs say about the run: embedding size, sequence length, split sizes, special ids."""

    vocab_size: int
    seq_len: int
    train_sequences: int
    val_sequences: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None


@dataclass(frozen=True)
class Schedule:
    """The run's arithmetic for a number of ranks."""

    steps: int
    grad_accum: int
    world_size: int
    tokens_per_step: int


def inspect_inputs(cfg: PretrainConfig, tokenizer_dir: Path, tokens_dir: Path) -> DataInfo:
    """Check the tokenizer and token shards against the model config; fail with a named error."""
    from transformers import AutoTokenizer

    from stages.common.modeling import check_vocab
    from stages.common.token_shards import read_meta, stream_sequences

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PretrainInputError(f"tokenize.tokenizer {tokenizer_dir}: cannot load it with AutoTokenizer: "
                                 f"{exc}") from exc
    vocab = check_vocab(len(tok), cfg.model, tokenizer_dir)
    meta = read_meta(tokens_dir)
    if int(meta["vocab_size"]) > vocab:
        raise PretrainInputError(f"{tokens_dir}/meta.json: token ids go up to {int(meta['vocab_size']) - 1} but the "
                                 f"tokenizer {tokenizer_dir} has only {vocab} tokens: the shards and the tokenizer "
                                 f"do not belong together")
    seq_len = int(meta["seq_len"])
    if seq_len > cfg.model.max_seq_len:
        raise PretrainInputError(f"{tokens_dir}/meta.json: seq_len={seq_len} is longer than "
                                 f"model.max_seq_len={cfg.model.max_seq_len}")
    splits = meta["splits"]
    train, val = stream_sequences(meta, "train"), int(splits["val"]["sequences"])  # train: the mixture's stream
    if train < cfg.global_batch_size:
        raise PretrainInputError(f"{tokens_dir}: the train split has {train} sequences, fewer than one global "
                                 f"batch (stage.pretrain.global_batch_size={cfg.global_batch_size})")
    if val < 1:
        raise PretrainInputError(f"{tokens_dir}: the val split has no sequence, so there is nothing to evaluate "
                                 f"on (raise stage.tokenize.validation_fraction or set keep_partial: true)")
    return DataInfo(vocab, seq_len, train, val, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def make_schedule(cfg: PretrainConfig, world_size: int, seq_len: int) -> Schedule:
    """Steps and gradient accumulation: the global batch must split evenly over ranks and micro batches."""
    per_pass = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_pass:
        raise PretrainInputError(f"stage.pretrain.global_batch_size={cfg.global_batch_size} is not a multiple of "
                                 f"micro_batch_size ({cfg.micro_batch_size}) x ranks ({world_size}) = {per_pass}: "
                                 f"change micro_batch_size or the number of ranks")
    tokens_per_step = cfg.global_batch_size * seq_len
    steps = math.ceil(cfg.max_tokens / tokens_per_step) if cfg.max_tokens else cfg.max_steps
    if cfg.warmup_steps >= steps:
        raise PretrainInputError(f"stage.pretrain.warmup_steps={cfg.warmup_steps} is not below the {steps} "
                                 f"training steps: the cosine decay would never start")
    return Schedule(steps, cfg.global_batch_size // per_pass, world_size, tokens_per_step)


def choose_bf16(precision: str, accelerator: str, bf16_supported: bool) -> bool:
    """bf16 on a GPU that has it (auto or asked); fp32 on CPU. Asking for bf16 without it is an error."""
    if precision == "bf16" and (accelerator != "cuda" or not bf16_supported):
        raise PretrainInputError(f"stage.pretrain.precision=bf16 needs a GPU with bf16 (accelerator here: "
                                 f"{accelerator}); use auto or fp32")
    return precision == "bf16" or (precision == "auto" and accelerator == "cuda" and bf16_supported)


def deepspeed_config(cfg: PretrainConfig, schedule: Schedule, bf16: bool, accelerator: str) -> dict[str, Any]:
    """The DeepSpeed config of this run (written to ds_config.json in the output dir)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "contiguous_gradients": True,
                            "overlap_comm": accelerator == "cuda"}
    if cfg.zero_stage == 3:
        # Consolidated 16-bit weights can be gathered on save; the stage exports them this way.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    for kind, device in (("offload_optimizer", cfg.offload_optimizer), ("offload_param", cfg.offload_param)):
        if device != "none":
            zero[kind] = {"device": device, "pin_memory": accelerator == "cuda",
                          **({"nvme_path": cfg.nvme_path} if device == "nvme" else {})}
    adam: dict[str, Any] = {"lr": cfg.lr, "betas": [cfg.adam_beta1, cfg.adam_beta2], "eps": cfg.adam_eps,
                            "weight_decay": cfg.weight_decay}
    if accelerator == "cpu":
        adam["torch_adam"] = True  # FusedAdam is CUDA-only
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": schedule.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {"type": "AdamW", "params": adam},
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "wall_clock_breakdown": False,
    }


# ---------------------------------------------------------------- stage


def _cuda_state() -> tuple[int, bool]:
    import torch

    if not torch.cuda.is_available():
        return 0, False
    return torch.cuda.device_count(), torch.cuda.is_bf16_supported()


def finished_summary(output_dir: Path) -> dict[str, float] | None:
    """The summary of an attempt that trained and exported but was stopped before the runner committed it."""
    summary, model = output_dir / SUMMARY_FILE, output_dir / "model"
    if summary.is_file() and (model / "config.json").is_file():
        return json.loads(summary.read_text())
    return None


def write_job(ctx: StageContext, cfg: PretrainConfig, data: DataInfo, schedule: Schedule, plan: LaunchPlan,
              bf16: bool, resume: Resume) -> Path:
    """The job file every rank reads: config, paths, and what the stage decided (steps, precision, the
    checkpoint to resume from)."""
    ds_config = ctx.output_dir / DS_CONFIG_FILE
    write_json_atomic(ds_config, deepspeed_config(cfg, schedule, bf16, plan.accelerator), indent=2, newline=True)
    job = {
        "config": to_plain(cfg),
        "tokenizer": str(ctx.input("tokenize.tokenizer")),
        "tokens": str(ctx.input("tokenize.tokens")),
        "output_dir": str(ctx.output_dir),
        "metrics_file": str(ctx.metrics_file) if ctx.metrics_file else None,
        "attempt": ctx.attempt,
        "ds_config": str(ds_config),
        "accelerator": plan.accelerator,
        "bf16": bf16,
        "data": to_plain(data),
        "schedule": to_plain(schedule),
        "resume_from": resume.checkpoint.name if resume.checkpoint is not None else None,
        "checkpoints_set_aside": len(resume.corrupt),
        # In the job file, not the ranks' environment: ranks started over ssh (pdsh) do not inherit it.
        "save_request": str(path) if (path := request_path()) else None,
    }
    path = ctx.output_dir / JOB_FILE
    write_json_atomic(path, job, indent=2, newline=True)
    return path


def failure_message(returncode: int, output_dir: Path) -> str:
    """Why the launch failed (the first failing rank's exception) and where the next attempt starts."""
    cause = rank_failure(output_dir)
    complete = complete_checkpoints(output_dir / CHECKPOINTS)
    after = (f"the next attempt checks {complete[-1][1].name} against its manifest and resumes from it, or from an "
             f"older one if it is corrupt" if complete else "no checkpoint is complete yet: the next attempt starts "
             "from step 0")
    return (f"the DeepSpeed launcher exited with status {returncode}"
            f"{f' ({cause})' if cause else ''}; {after} (checkpoints in {output_dir / CHECKPOINTS})")


def run(cfg: PretrainConfig, ctx: StageContext) -> dict[str, float]:
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ctx.output_dir / RANK_ERRORS, ignore_errors=True)  # an earlier attempt's: not this one's cause
    (ctx.output_dir / SAVED_ON_REQUEST).unlink(missing_ok=True)  # an earlier attempt's end
    done = finished_summary(ctx.output_dir)
    if done is not None:
        ctx.log.info("the previous attempt finished training and exported the model; reusing it")
        log_lineage(ctx)
        return done
    data = inspect_inputs(cfg, ctx.input("tokenize.tokenizer"), ctx.input("tokenize.tokens"))
    cuda_devices, bf16_supported = _cuda_state()
    job_path = ctx.output_dir / JOB_FILE
    plan = plan_launch(cfg.launch, LOOP_MODULE, ["--job", str(job_path)], cuda_devices=cuda_devices,
                       environ=os.environ, hostfile=ctx.output_dir / HOSTFILE, port=free_port())
    bf16 = choose_bf16(cfg.precision, plan.accelerator, bf16_supported)
    if cfg.precision == "auto" and plan.accelerator == "cuda" and not bf16:
        ctx.log.warning("this GPU has no bf16: training in fp32")
    schedule = make_schedule(cfg, plan.world_size, data.seq_len)
    checkpoints = ctx.output_dir / CHECKPOINTS
    resume = choose_resume(checkpoints, plan.world_size, cfg.zero_stage, ctx.log)
    write_job(ctx, cfg, data, schedule, plan, bf16, resume)
    ctx.log.info("pretrain: %d steps x %d sequences x %d tokens (%d ranks x micro batch %d x %d accumulation), "
                 "vocab %d, %s, ZeRO-%d", schedule.steps, cfg.global_batch_size, data.seq_len, schedule.world_size,
                 cfg.micro_batch_size, schedule.grad_accum, data.vocab_size, "bf16" if bf16 else "fp32",
                 cfg.zero_stage)
    ctx.log.info("launch: %s", plan.describe())
    returncode = run_launch(plan, ctx.output_dir / HOSTFILE, cwd=REPO_ROOT)
    if returncode != 0:
        raise TrainingFailed(failure_message(returncode, ctx.output_dir))
    saved = ctx.output_dir / SAVED_ON_REQUEST
    if saved.is_file():  # the ranks saved and stopped before the time limit: not a model to export
        step = json.loads(saved.read_text())["step"]
        raise SavedOnRequest(step, f"checkpoint {checkpoint_tag(step)} in {checkpoints}")
    summary = finished_summary(ctx.output_dir)
    if summary is None:
        raise TrainingFailed(f"the ranks exited cleanly but {ctx.output_dir / SUMMARY_FILE} or the exported "
                             f"model is missing")
    log_lineage(ctx)
    return summary


def log_lineage(ctx: StageContext) -> None:
    """MLflow lineage: the token shards trained and validated on (the datasets tokenize logged), and the model
    (a reference to the exported files)."""
    tokens = ctx.input("tokenize.tokens")
    ctx.log_dataset("tokenize.tokens.train", tokens / "train", context="training")
    ctx.log_dataset("tokenize.tokens.val", tokens / "val", context="validation")
    ctx.log_model("pretrain", ctx.output("model"))


STAGE = Stage(
    name="pretrain",
    config=PretrainConfig,
    run=run,
    inputs=('tokenize.tokenizer', 'tokenize.tokens'),
    outputs=('model',),
    unhashed=frozenset(["micro_batch_size", "zero_stage", "offload_optimizer", "offload_param", "nvme_path",
                        "gradient_checkpointing", "attention", "eval_every", "checkpoint_every", "keep_checkpoints",
                        "log_every", "loader_workers", "peak_tflops", "launch"]),
    resumable=True,
    description="DeepSpeed ZeRO pretraining of a Llama-architecture model.",
)
