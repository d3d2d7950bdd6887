"""sft: supervised fine-tuning on chat data with TRL's SFTTrainer: LoRA, QLoRA or full.

What it does, in order:

1. Data (stages/sft/data.py): conversations derived from the cleaned corpus (the tiny default),
   read from local JSONL/Parquet files, or loaded by `datasets` name; a seeded validation split is
   held out. Both splits are written to ``<output>/data/{train,validation}.jsonl`` for audit.
2. Tokenizer: the one in the ``pretrain.model`` dir, given llmpipe's chat template
   (stages/common/chat.py). With ``assistant_only_loss`` (default) only assistant tokens (their
   ``<|end|>`` included) carry loss, through the template's ``{% generation %}`` markers.
3. Model: the pretrained model, loaded as is (``lora``, ``full``) or in 4-bit NF4 with
   bitsandbytes (``qlora``), then trained by ``trl.SFTTrainer`` with a PEFT LoRA config for
   lora/qlora. Loss, learning rate, grad norm, tokens/s and eval loss (also before the first
   step) go to ``ctx.log_metrics`` as curves.
4. Outputs:
   - ``adapter``: the PEFT adapter dir (adapter_config.json, adapter_model.safetensors, the
     tokenizer) for lora/qlora, with ``adapter_info.json``. For ``full`` there is no adapter: the
     dir holds only ``adapter_info.json`` (``"has_adapter": false``) and a README saying so;
     downstream stages check ``has_adapter`` (or the absence of adapter_config.json).
   - ``model``: a standalone HF model dir (safetensors, config, generation config, tokenizer with
     the chat template) loadable with ``AutoModelForCausalLM.from_pretrained``. For lora/qlora the
     adapter is merged into the base with ``merge_and_unload``; its generation config stops on
     ``<|end|>`` as well as EOS.
   - ``sample.json`` (not an artifact of the stage, attached to the MLflow run): the output model's
     greedy reply to the first validation prompt, a smoke test that it loads and chats.

Resumable: Trainer checkpoints go to ``<output>/checkpoints`` every ``save_steps`` and at the last
step (which is always evaluated too, so its trainer_state.json holds the whole loss history). A
later attempt of the same fingerprint resumes from the newest complete checkpoint (logged, plus a
point ``resume_step`` on the curves and ``resumed_from_step`` in the final metrics); if that is the
last step, training is skipped. Both outputs are written from the last checkpoint, and the
checkpoints are deleted after a successful run unless ``keep_checkpoints``.

Devices: CUDA when present (bf16 when the GPU supports it and ``precision`` is auto/bf16), else
CPU with ``use_cpu=True`` and fp32. The stage runs as one process: fine for the tiny config and for
a 7B LoRA/QLoRA on one GPU. For several GPUs, launch the same Trainer code under ``accelerate
launch`` or ``torchrun`` (TrainingArguments picks up the ranks from the environment and can take
a DeepSpeed config via ``deepspeed=``); only rank 0 then writes metrics (see MetricsCallback).
That launcher wrapper is not written yet.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import Stage, StageContext
from pipeline.errors import LlmpipeError
from stages.sft.data import SftDataConfig

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINTS = "checkpoints"
ADAPTER_INFO = "adapter_info.json"


class SftError(LlmpipeError):
    """The sft stage cannot run with this config on this model or machine; the message names the key."""


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA scaling numerator (scale = alpha / rank)
    dropout: float = 0.05  # dropout on the LoRA input
    target_modules: tuple[str, ...] = LORA_TARGETS  # module names (suffixes) that get adapters

    def __post_init__(self) -> None:
        key = "stage.sft.lora"
        if self.rank < 1:
            raise ValueError(f"{key}.rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"{key}.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{key}.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError(f"{key}.target_modules is empty: name the linear layers to adapt, e.g. {LORA_TARGETS}")


@dataclass(frozen=True)
class QuantSettings:
    quant_type: Literal["nf4", "fp4"] = "nf4"  # 4-bit data type of the frozen base (QLoRA uses NF4)
    double_quant: bool = True  # also quantize the quantization constants (saves ~0.4 bit/param)
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on a bf16 GPU, else fp32


@dataclass(frozen=True)
class SftConfig:
    method: Literal["lora", "qlora", "full"] = "lora"  # lora | qlora (4-bit base + LoRA) | full (all weights)
    data: SftDataConfig = field(default_factory=SftDataConfig)  # where the conversations come from
    lora: LoraSettings = field(default_factory=LoraSettings)  # adapter shape (lora and qlora)
    quant: QuantSettings = field(default_factory=QuantSettings)  # 4-bit loading (qlora only)
    lr: float = 2e-4  # peak learning rate
    epochs: float = 1.0  # passes over the training split (when max_steps is -1)
    max_steps: int = -1  # optimizer steps; -1: run `epochs` epochs
    batch_size: int = 8  # conversations per device per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 256  # tokens per conversation (truncated) or per packed row; <= the model's context
    packing: bool = False  # pack conversations into max_length rows (best-fit, no cross-attention)
    assistant_only_loss: bool = True  # loss on assistant tokens only (false: on the whole conversation)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: float = 0.03  # linear warmup: steps, or a fraction of all steps when < 1
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"  # decay after warmup
    max_grad_norm: float = 1.0  # gradient clipping
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 mixed precision on a bf16 GPU, else fp32
    gradient_checkpointing: bool = False  # recompute activations in backward (saves memory, ~20-30% slower)
    eval_steps: int = 50  # optimizer steps between eval-loss measurements (also at start and end)
    seed: int = 0  # seeds adapter init, data order and dropout
    eval_batch_size: int = 8  # conversations per eval batch (execution-only)
    logging_steps: int = 10  # steps between logged metrics (execution-only)
    save_steps: int = 50  # steps between resumable checkpoints (execution-only)
    save_total_limit: int = 2  # checkpoints kept on disk (execution-only)
    keep_checkpoints: bool = False  # keep <output>/checkpoints after success (execution-only)
    sample_max_new_tokens: int = 48  # tokens of the sample reply logged after merging; 0: skip (execution-only)
    dataset_num_proc: int | None = None  # processes for tokenizing the data; null: in process (execution-only)

    def __post_init__(self) -> None:
        key = "stage.sft"
        if self.lr <= 0:
            raise ValueError(f"{key}.lr must be positive, got {self.lr}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"{key}.max_steps must be positive, or -1 to train for {key}.epochs, got {self.max_steps}")
        if self.max_steps == -1 and self.epochs <= 0:
            raise ValueError(f"{key}.epochs must be positive when {key}.max_steps is -1, got {self.epochs}")
        for name in ("batch_size", "grad_accum", "max_length", "eval_steps", "eval_batch_size", "logging_steps",
                     "save_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{key}.{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"{key}.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.sample_max_new_tokens < 0:
            raise ValueError(f"{key}.sample_max_new_tokens must be >= 0, got {self.sample_max_new_tokens}")
        if self.method == "full" and self.quant != QuantSettings():
            # torchtune-style: say which flag is wrong rather than ignore it.
            raise ValueError(f"{key}.quant is set but {key}.method is 'full': 4-bit weights cannot be trained "
                             f"directly; use method: qlora, or drop the quant settings")


# ---------------------------------------------------------------- devices and precision


@dataclass(frozen=True)
class Runtime:
    """What this machine gives the run: device, mixed precision, and the dtypes that follow."""

    cuda: bool
    bf16: bool  # bf16 mixed precision in the Trainer
    model_dtype: Any  # torch dtype the base is loaded in (lora: bf16 on GPU; full: fp32 master weights)
    compute_dtype: Any  # qlora: dtype of the 4-bit matmuls


def resolve_runtime(cfg: SftConfig) -> Runtime:
    """Pick device and dtypes from the config and what is present; fail on requests that cannot hold."""
    import torch

    cuda = torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if cfg.precision == "bf16" and not bf16_ok:
        raise SftError("stage.sft.precision is 'bf16' but no CUDA GPU with bf16 support is present "
                       "(use precision: auto, which picks fp32 on CPU)")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_ok)
    names = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    compute = cfg.quant.compute_dtype
    compute_dtype = names[compute] if compute != "auto" else torch.bfloat16 if bf16 else torch.float32
    if compute_dtype == torch.float16 and not cuda:
        raise SftError("stage.sft.quant.compute_dtype is 'float16', which needs a CUDA GPU; use auto or float32")
    # Full fine-tuning keeps fp32 master weights (autocast does the bf16 math); a frozen LoRA base
    # can live in bf16 on GPU, halving its memory.
    model_dtype = torch.bfloat16 if (bf16 and cfg.method == "lora") else torch.float32
    if cfg.method == "qlora":
        model_dtype = compute_dtype
    return Runtime(cuda=cuda, bf16=bf16, model_dtype=model_dtype, compute_dtype=compute_dtype)


# ---------------------------------------------------------------- model and tokenizer


def load_tokenizer(model_dir: Path) -> Any:
    """The base model's tokenizer with llmpipe's chat template set (and a pad token)."""
    from transformers import AutoTokenizer

    from stages.common.chat import apply_chat_format

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SftError(f"pretrain.model {model_dir}: cannot load its tokenizer: {exc}") from exc
    apply_chat_format(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # the tokenize stage reserves <|pad|>; other tokenizers may lack one
    return tok


def load_base_model(model_dir: Path, cfg: SftConfig, rt: Runtime, quantized: bool) -> Any:
    """The pretrained model, un-quantized in ``rt.model_dtype``, or 4-bit (bitsandbytes) for QLoRA."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": rt.model_dtype, "local_files_only": True}
    if quantized:
        try:
            import bitsandbytes  # noqa: F401  (fail here with the flag named, not deep inside transformers)
        except ImportError as exc:
            raise SftError(f"stage.sft.method is 'qlora' but bitsandbytes cannot be imported: {exc}") from exc
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.quant.quant_type,
            bnb_4bit_use_double_quant=cfg.quant.double_quant, bnb_4bit_compute_dtype=rt.compute_dtype)
        if rt.cuda:  # the weights are quantized as they land on this process's GPU
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError) as exc:
        raise SftError(f"pretrain.model {model_dir}: cannot load it with AutoModelForCausalLM: {exc}") from exc
    if quantized:
        keep_4bit_layers_trainable_on_cpu(model)
    return model


def keep_4bit_layers_trainable_on_cpu(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    bitsandbytes 0.50.2 on a CPU with AVX512-BF16 converts a Linear4bit's weights to a packed
    layout the first time it runs in eval mode without grad (our eval passes), and from then on
    uses a kernel with no autograd support: later training steps would silently drop the gradient
    through every frozen 4-bit layer (PyTorch warns "gemv_4bit: an autograd kernel was not
    registered"). The layer's own switch turns that conversion off.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def check_model(model: Any, tok: Any, cfg: SftConfig, model_dir: Path) -> None:
    """Fail fast when the tokenizer, the context length or the LoRA targets do not fit the model."""
    vocab = max(tok.get_vocab().values()) + 1
    embeddings = model.get_input_embeddings().weight.shape[0]
    if vocab > embeddings:
        raise SftError(f"pretrain.model {model_dir}: the tokenizer has ids up to {vocab - 1} but the model embeds "
                       f"only {embeddings}; they do not belong together")
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and cfg.max_length > context:
        raise SftError(f"stage.sft.max_length={cfg.max_length} exceeds the model's context of {context} tokens "
                       f"(max_position_embeddings of {model_dir})")
    if cfg.method != "full":
        linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                  if type(module).__name__ in ("Linear", "Linear4bit")}
        missing = [t for t in cfg.lora.target_modules if t not in linear]
        if missing:
            raise SftError(f"stage.sft.lora.target_modules: {missing} match no linear layer of the model; "
                           f"it has {sorted(linear)}")


def count_too_long(tok: Any, examples: list[Any], max_length: int) -> int:
    """Conversations longer than ``max_length`` tokens once rendered with the chat template.

    TRL truncates them (packed or not), which cuts the end of the last reply and its ``<|end|>``:
    the model then learns less, and never to stop, on those. Counted so that a too small
    ``max_length`` (or too long derived prompts) shows in the log and the metrics.
    """
    too_long = 0
    for example in examples:
        ids = tok.apply_chat_template(example.messages, tokenize=True, return_dict=True)["input_ids"]
        too_long += len(ids) > max_length
    return too_long


def lora_config(cfg: SftConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM")


# ---------------------------------------------------------------- metrics


def metrics_callback(ctx: StageContext, has_eval: bool) -> Any:
    """A TrainerCallback that forwards the Trainer's logs to the stage's metrics as curves.

    Keys are renamed to the project's (loss -> train_loss, learning_rate -> lr); tokens_per_s is
    derived from TRL's running ``num_tokens`` (non-padding tokens) between two logs. Only the
    main process writes, so a multi-process launch does not duplicate points. It also asks for an
    evaluation at the last step (when ``eval_steps`` does not land there), so the final
    checkpoint's trainer_state.json holds the whole loss history, final eval included.
    """
    from transformers import TrainerCallback

    rename = {"loss": "train_loss", "learning_rate": "lr", "grad_norm": "grad_norm", "eval_loss": "eval_loss",
              "mean_token_accuracy": "token_accuracy", "eval_mean_token_accuracy": "eval_token_accuracy",
              "entropy": "entropy", "num_tokens": "train_tokens"}

    class MetricsCallback(TrainerCallback):
        def __init__(self) -> None:
            self.last: tuple[float, float] | None = None  # (time, num_tokens) at the previous train log
            self.tokens = 0.0  # tokens trained in this attempt

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if has_eval and state.global_step >= state.max_steps:
                control.should_evaluate = True
            return control

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            out = {new: float(logs[old]) for old, new in rename.items() if isinstance(logs.get(old), (int, float))}
            if "loss" in logs and "num_tokens" in logs:
                now, tokens = time.perf_counter(), float(logs["num_tokens"])
                if self.last is not None and tokens > self.last[1] and now > self.last[0]:
                    out["tokens_per_s"] = (tokens - self.last[1]) / (now - self.last[0])
                self.last = (now, tokens)
                self.tokens = tokens
            if out:
                ctx.log_metrics(out, step=state.global_step)
                ctx.log.info("step %d: %s", state.global_step, ", ".join(f"{k}={v:.4g}" for k, v in out.items()))

    return MetricsCallback()


def history_metrics(checkpoint: Path) -> dict[str, float]:
    """First/final train loss and initial/final eval loss from a checkpoint's trainer_state.json
    (the Trainer restores and extends this history on resume, so it spans all attempts).

    Named apart from the curves (train_loss, eval_loss): the runner logs a stage's final metrics
    at step 0, which would add a stray point to a curve of the same name. The held-out eval loss
    is the steadier signal: it is measured on the same conversations each time, while each train
    loss point averages a few differently sized batches.
    """
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    history = state.get("log_history", [])
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    out = {"steps": float(state["global_step"])}
    if losses:
        out.update(first_train_loss=float(losses[0]), final_train_loss=float(losses[-1]))
    if evals:
        out.update(initial_eval_loss=float(evals[0]), final_eval_loss=float(evals[-1]))
    return out


def latest_checkpoint(checkpoints: Path, log: Any = None) -> tuple[Path | None, bool]:
    """The newest *complete* checkpoint (or None) and whether it is the last step of its run.

    The Trainer writes a checkpoint in place, ``trainer_state.json`` after the weights, optimizer
    and RNG state; a checkpoint dir without it is what a crash during saving leaves behind. Such
    dirs are removed (logged) so that resuming falls back to the previous complete checkpoint
    instead of failing on every later attempt.
    """
    import re

    if not checkpoints.is_dir():
        return None, False
    found = sorted((int(m.group(1)), p) for p in checkpoints.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    for _, path in reversed(found):
        state_file = path / "trainer_state.json"
        if state_file.is_file():
            state = json.loads(state_file.read_text())
            return path, state["global_step"] >= state["max_steps"]
        if log is not None:
            log.warning("removing incomplete checkpoint %s (no trainer_state.json: a save was interrupted)", path)
        shutil.rmtree(path, ignore_errors=True)
    return None, False


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1])


# ---------------------------------------------------------------- training


def sft_args(cfg: SftConfig, rt: Runtime, checkpoints: Path, has_eval: bool, resuming: bool) -> Any:
    """The SFTConfig (TrainingArguments) for this run: every value set here, none left to TRL defaults
    that differ from transformers' (TRL turns on bf16 and gradient checkpointing by default).
    The eval before the first step is skipped on resume: the first attempt measured it."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(checkpoints),
        use_cpu=not rt.cuda,
        bf16=rt.bf16,
        fp16=False,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=cfg.gradient_checkpointing,
        max_length=cfg.max_length,
        packing=cfg.packing,
        assistant_only_loss=cfg.assistant_only_loss,
        dataset_num_proc=cfg.dataset_num_proc,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps,
        eval_on_start=has_eval and not resuming,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",  # also saves at the last step: the outputs are written from that checkpoint
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",  # tracking is the runner's job (it streams ctx.metrics_file to MLflow)
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def to_dataset(examples: list[Any]) -> Any:
    from datasets import Dataset

    return Dataset.from_list([{"messages": e.messages} for e in examples])


def param_count(param: Any) -> int:
    """Weights in a parameter; a bitsandbytes 4-bit one stores two per byte, its quant_state knows the shape."""
    import math

    quant_state = getattr(param, "quant_state", None)
    return math.prod(quant_state.shape) if quant_state is not None else param.numel()


def train(cfg: SftConfig, ctx: StageContext, rt: Runtime, tok: Any, data: Any) -> tuple[Path, dict[str, float]]:
    """Train with SFTTrainer, resuming from the newest checkpoint; return the final checkpoint and
    this attempt's metrics.

    A checkpoint of the last step means an earlier attempt finished training (and failed later):
    training is not entered again (transformers 5.19 would run one extra step when resumed at
    max_steps mid-epoch), the outputs are written from that checkpoint.
    """
    from transformers import set_seed
    from trl import SFTTrainer

    checkpoints = ctx.output_dir / CHECKPOINTS
    resume, finished = latest_checkpoint(checkpoints, ctx.log)
    if resume is not None:
        # A point on the curves too, so the MLflow run shows where this attempt picked up.
        ctx.log_metrics({"resume_step": checkpoint_step(resume)}, step=checkpoint_step(resume))
    if finished:
        ctx.log.info("training finished in an earlier attempt; writing the outputs from %s", resume)
        return resume, {"resumed_from_step": float(checkpoint_step(resume)), "train_s": 0.0}

    base_dir = ctx.input("pretrain.model")
    set_seed(cfg.seed)  # before the LoRA weights are initialised
    model = load_base_model(base_dir, cfg, rt, quantized=cfg.method == "qlora")
    check_model(model, tok, cfg, base_dir)
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # The standard QLoRA preparation: freeze the base, norms/embeddings in fp32, checkpointing hooks.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)

    checkpoints.mkdir(parents=True, exist_ok=True)
    has_eval = bool(data.validation)
    callback = metrics_callback(ctx, has_eval)
    trainer = SFTTrainer(
        model=model,
        args=sft_args(cfg, rt, checkpoints, has_eval, resuming=resume is not None),
        train_dataset=to_dataset(data.train),
        eval_dataset=to_dataset(data.validation) if has_eval else None,
        processing_class=tok,
        peft_config=lora_config(cfg) if cfg.method != "full" else None,
        callbacks=[callback],
    )
    trainable = sum(param_count(p) for p in trainer.model.parameters() if p.requires_grad)
    total = sum(param_count(p) for p in trainer.model.parameters())
    ctx.log.info("method=%s: %d trainable of %d parameters (%.2f%%); %d train / %d validation conversations; "
                 "device=%s bf16=%s", cfg.method, trainable, total, 100 * trainable / max(total, 1),
                 len(data.train), len(data.validation), "cuda" if rt.cuda else "cpu", rt.bf16)
    if resume:
        ctx.log.info("resuming from %s (attempt %d)", resume, ctx.attempt)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_s = time.perf_counter() - start
    final, finished = latest_checkpoint(checkpoints)
    if final is None or not finished:
        raise SftError(f"training ended without a checkpoint of its last step in {checkpoints}")
    metrics = {
        "train_s": train_s,
        "mean_tokens_per_s": callback.tokens / train_s if train_s > 0 else 0.0,  # this attempt's, evals included
        "trainable_params": float(trainable),
        "total_params": float(total),
        "resumed_from_step": float(checkpoint_step(resume)) if resume else 0.0,
    }
    del trainer, model
    gc.collect()  # free the training copy (4-bit or not) before the base is loaded again for merging
    return final, metrics


# ---------------------------------------------------------------- outputs


def write_outputs(cfg: SftConfig, rt: Runtime, tok: Any, trained: Path, base_dir: Path, ctx: StageContext) -> None:
    """Both outputs from the final checkpoint ``trained`` (see the module doc for their layout)."""
    adapter_dir, model_dir = ctx.output("adapter"), ctx.output("model")
    shutil.rmtree(adapter_dir, ignore_errors=True)  # a previous attempt may have left partial outputs
    adapter_dir.mkdir(parents=True)
    if cfg.method == "full":
        import torch
        from transformers import AutoModelForCausalLM

        # fp32 master weights were trained; ship bf16 when training ran in bf16 (as the merged LoRA models)
        dtype = torch.bfloat16 if rt.bf16 else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(trained), dtype=dtype, local_files_only=True)
        (adapter_dir / "README.md").write_text(
            "# No adapter\n\nThis sft run used `method: full`: every weight was trained, so there is no\n"
            "adapter to apply. The fine-tuned model is the sibling `model/` directory.\n")
    else:
        model = merge_adapter(trained, base_dir, rt, save_adapter_to=adapter_dir)
        tok.save_pretrained(str(adapter_dir))
    info = {"method": cfg.method, "has_adapter": cfg.method != "full", "base_model": str(base_dir),
            "merged_model": "../model"}
    (adapter_dir / ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n")
    write_model(model, tok, model_dir)


def merge_adapter(adapter_dir: Path, base_dir: Path, rt: Runtime, save_adapter_to: Path) -> Any:
    """The base model with the adapter of ``adapter_dir`` merged in, as a plain transformers model;
    the adapter itself is saved (cleanly, without optimizer state) to ``save_adapter_to`` on the way.

    For QLoRA the base is loaded un-quantized, in full precision, and the adapter merged into it:
    the standard way (as in the QLoRA paper's release and PEFT's docs). Merging into the 4-bit
    weights would need dequantize -> add -> requantize, losing the adapter's update to rounding,
    and the result would not be a plain model. The merged weights differ from what QLoRA trained
    against only by the base's NF4 quantization error; evaluating the merged model measures it.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if rt.bf16 else torch.float32
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    peft_model.save_pretrained(str(save_adapter_to))
    return peft_model.merge_and_unload()


def write_model(model: Any, tok: Any, out: Path) -> None:
    """A standalone model dir: weights, config, a generation config that stops on <|end|>, tokenizer."""
    from stages.common.chat import stop_token_ids

    shutil.rmtree(out, ignore_errors=True)
    model.generation_config.eos_token_id = stop_token_ids(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def sample_reply(model_dir: Path, conversation: list[dict[str, str]], max_new_tokens: int) -> str:
    """Greedy reply of the saved model to the first user turn of ``conversation`` (a smoke test)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    prompt_turns = conversation[:next(i for i, m in enumerate(conversation) if m["role"] == "assistant")]
    inputs = tok.apply_chat_template(prompt_turns, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def run(cfg: SftConfig, ctx: StageContext) -> dict[str, float]:
    from stages.common.shards import list_parquet
    from stages.sft.data import load_instruction_data, write_jsonl

    started = time.perf_counter()
    base_dir = ctx.input("pretrain.model")
    shards = list_parquet(ctx.input("pii.documents")) if cfg.data.source == "derive_from_corpus" else []
    data = load_instruction_data(cfg.data, shards)
    write_jsonl(data.train, ctx.output_dir / "data" / "train.jsonl")
    write_jsonl(data.validation, ctx.output_dir / "data" / "validation.jsonl")
    ctx.log.info("instruction data (%s): %s", cfg.data.source, data.metrics())

    rt = resolve_runtime(cfg)
    tok = load_tokenizer(base_dir)
    too_long = count_too_long(tok, data.train, cfg.max_length)
    if too_long:
        ctx.log.warning("%d of %d training conversations exceed stage.sft.max_length=%d tokens and will be "
                        "truncated (their last reply cut)", too_long, len(data.train), cfg.max_length)
    trained, metrics = train(cfg, ctx, rt, tok, data)
    metrics["truncated_examples"] = float(too_long)
    metrics.update(history_metrics(trained))

    export_start = time.perf_counter()
    write_outputs(cfg, rt, tok, trained, base_dir, ctx)
    metrics["export_s"] = time.perf_counter() - export_start

    if cfg.sample_max_new_tokens and data.validation:
        messages = data.validation[0].messages
        reply = sample_reply(ctx.output("model"), messages, cfg.sample_max_new_tokens)
        ctx.log.info("sample reply of the output model to a validation prompt: %r", reply)
        sample = ctx.output_dir / "sample.json"  # attached to the MLflow run, next to the curves
        sample.write_text(json.dumps({"conversation": messages, "reply": reply}, indent=2, ensure_ascii=False))
        ctx.log_artifact(sample)
    if not cfg.keep_checkpoints:
        shutil.rmtree(ctx.output_dir / CHECKPOINTS, ignore_errors=True)

    metrics.update(data.metrics())
    metrics["total_s"] = time.perf_counter() - started
    return metrics


STAGE = Stage(
    name="sft",
    config=SftConfig,
    run=run,
    inputs=("pretrain.model", "pii.documents"),
    outputs=("adapter", "model"),
    unhashed=frozenset(["eval_batch_size", "logging_steps", "save_steps", "save_total_limit", "keep_checkpoints",
                        "sample_max_new_tokens", "dataset_num_proc"]),
    resumable=True,
    description="LoRA / QLoRA / full supervised fine-tuning with TRL.",
)
