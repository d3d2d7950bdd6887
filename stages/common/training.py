"""The Hugging Face training toolkit of the sft and align stages, and the metric names pretrain shares.

sft and align both fine-tune a causal LM with a TRL trainer, resumably, and export a plain model
dir. Everything they do alike lives here, once, so that the two stages cannot drift apart again
(they did: ``lora.rank`` vs ``lora.r``, deleted vs ignored incomplete checkpoints, two names for
the same curve). Plain functions and small frozen dataclasses, no base class: a stage reads top to
bottom and calls what it needs.

- **Config blocks** both stages embed under the same keys: :class:`LoraSettings` (``lora:``, peft's
  names) and :class:`TrainSettings` (``train:``), plus ``precision`` and ``attn_implementation``.
  No defaults here: the shipped YAML is the only source of values.
- **Runtime** (:func:`resolve_runtime`): device, bf16 mixed precision, the dtype models load in.
- **Tokenizer** (:func:`load_tokenizer`): a chat template fit for training and a pad token. A base
  model's own template is kept; a tokenizer without one gets llmpipe's (stages/common/chat.py), and
  the chat markers it lacks are added as special tokens.
- **Added tokens**: their rows are new to the model. :func:`grow_embeddings` grows the embeddings
  (mean-initialised rows) and :func:`trainable_token_targets` makes exactly those rows trainable
  under LoRA (peft's ``trainable_token_indices``, input embedding and an untied output layer): a
  model pretrained without ``<|end|>`` must learn to read and to emit it. Under full fine-tuning
  every row trains anyway.
- **Trainer arguments** (:func:`training_args`) from the ``train:`` block, every value set (TRL's
  defaults differ from transformers' and change between releases). In launched ranks
  (stages/common/train_ranks.py): gloo on CPU, and the DeepSpeed config of ``train.zero_stage``
  (:func:`deepspeed_config`).
- **Metrics** (:func:`metrics_callback`, :func:`history_metrics`): one name per quantity in every
  training stage's curves: ``train_loss``, ``eval_loss``, ``lr``, ``grad_norm``, ``tokens_per_s``
  (pretrain's DeepSpeed loop logs the same names). Method-specific figures keep TRL's names
  (``rewards/margins``, ``kl``...). A stage's final metrics are named apart from its curves
  (``final_train_loss``, ``mean_tokens_per_s``): the runner logs them at step 0, which would put a
  stray point on a curve of the same name.
- **Checkpoints** (:func:`train_or_resume`): a checkpoint is complete once its manifest is
  written (pipeline.files: each file's size and xxh3 hash), by a callback after the Trainer's save.
  A phase resumes from its newest complete checkpoint whose files still match the manifest;
  incomplete ones (a crash while saving: no manifest) are removed and logged; corrupt ones (a file
  cut short or changed since) are set aside under ``<checkpoints>/set-aside/`` with a warning
  naming the file, and the one before is used (``train.save_total_limit`` >= 2 keeps one); with
  none left the phase starts over. A checkpoint of the last step means training is done and is not
  entered again.
- **Outputs** (:func:`merged_model`, :func:`write_model`): the model of the final checkpoint, a
  LoRA adapter merged into its base (grown first to the adapter's added tokens), written atomically
  (pipeline.files) with the tokenizer and a generation config that stops on the end-of-turn token
  (``<|end|>``, or the base template's own) as well as EOS.
- **Memory** (:func:`free_memory`) between phases, and the data-source checks both stages' data
  configs share (``data.source: corpus | files | dataset``).

Importing this module is cheap (no torch, transformers, trl or peft at import time): stage
modules import it, and ``llmpipe plan`` imports every stage module.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import LlmpipeError
from pipeline.files import MANIFEST, ManifestMismatch, atomic_path, set_aside, verify_manifest, write_manifest
from pipeline.save_request import SavedOnRequest, request_path, requested
from pipeline.schema import Invalid

Precision = Literal["auto", "bf16", "fp32"]
Attention = Literal["sdpa", "eager", "flash_attention_2"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
DataSource = Literal["corpus", "files", "dataset"]

# The curves every training stage logs, one name per quantity (MLflow metric names).
TRAIN_LOSS, EVAL_LOSS, LR, GRAD_NORM, TOKENS_PER_S = "train_loss", "eval_loss", "lr", "grad_norm", "tokens_per_s"
RESUME_STEP = "resume_step"  # a point where an attempt picked up from a checkpoint
# The Trainer's log keys for those quantities; tokens_per_s is derived from TRL's running num_tokens.
TRAINER_NAMES = {"loss": TRAIN_LOSS, "eval_loss": EVAL_LOSS, "learning_rate": LR, "grad_norm": GRAD_NORM}
# What the Trainer logs once at the end of train() (a run average, throughput) and the timing of each
# eval: not curves. Its "train_loss" is the run's mean loss, which would land on our train_loss curve.
_SUMMARY_KEYS = frozenset({"train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second",
                           "total_flos"})
_TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")

TRAINER_STATE = "trainer_state.json"  # the Trainer's step and log history, in every checkpoint
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# Where corrupt checkpoints are moved: out of the Trainer's sight, which rotates every "checkpoint-*" in its dir.
SET_ASIDE = "set-aside"
# The attribute of a tokenizer from load_tokenizer that lists the ids of the chat markers it added.
ADDED_TOKENS_ATTR = "llmpipe_added_token_ids"

log = logging.getLogger("llmpipe.training")


class TrainingError(LlmpipeError):
    """A training stage cannot run with this config on this model or machine; the message names the key or input."""


class TrainingDataError(TrainingError):
    """Training data cannot be read (a file pattern matches nothing, a file type is unknown) or is unusable."""


# ---------------------------------------------------------------- config blocks


@dataclass(frozen=True, kw_only=True)
class LoraSettings:
    r: int  # adapter rank
    alpha: float  # scaling numerator (the adapter's output is scaled by alpha / r)
    dropout: float  # dropout on the adapter input
    target_modules: tuple[str, ...]  # module names (suffixes) of the linear layers that get an adapter

    def __post_init__(self) -> None:
        problems = []
        if self.r < 1:
            problems.append(("r", f"must be at least 1, got {self.r}"))
        if self.alpha <= 0:
            problems.append(("alpha", f"must be positive, got {self.alpha}"))
        if not 0.0 <= self.dropout < 1.0:
            problems.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        if not self.target_modules:
            problems.append(("target_modules", "is empty: name the linear layers to adapt, e.g. [q_proj, v_proj]"))
        Invalid.check(problems)


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    lr: float  # peak learning rate
    max_steps: int  # optimizer steps; -1: train `epochs` passes instead
    epochs: float  # passes over the training data (when max_steps is -1)
    batch_size: int  # examples per device per micro-batch (what an example is depends on the stage and method)
    eval_batch_size: int  # examples per device per evaluation batch
    grad_accum: int  # micro-batches per optimizer step
    lr_scheduler: Scheduler  # decay after warmup (transformers scheduler name)
    warmup: float  # linear warmup: a number of steps, or a fraction of all steps when < 1
    weight_decay: float  # AdamW weight decay
    max_grad_norm: float  # gradient clipping
    max_length: int  # tokens per example (longer ones are truncated); at most the model's context
    gradient_checkpointing: bool  # recompute activations in backward (saves memory, ~20-30% slower)
    zero_stage: int  # with several ranks: 0 plain DDP; DeepSpeed ZeRO 1 optimizer, 2 + gradients, 3 + weights sharded
    offload_optimizer: Literal["none", "cpu"]  # ZeRO-Offload of the optimizer states to CPU memory (zero_stage >= 1)
    eval_steps: int  # optimizer steps between evaluations (and one after the last step)
    save_steps: int  # optimizer steps between resumable checkpoints (and one at the last step)
    save_total_limit: int  # checkpoints kept on disk per phase; at least 2, so a corrupt newest one has a fallback
    keep_checkpoints: bool  # keep <output>/checkpoints after a successful run
    logging_steps: int  # optimizer steps between logged metrics
    seed: int  # model init (adapter, new heads), data order, dropout

    def __post_init__(self) -> None:
        problems = []
        if self.lr <= 0:
            problems.append(("lr", f"must be positive, got {self.lr}"))
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(("max_steps", f"must be positive, or -1 to train for `epochs`, got {self.max_steps}"))
        if self.max_steps == -1 and self.epochs <= 0:
            problems.append(("epochs", f"must be positive when max_steps is -1, got {self.epochs}"))
        for name in ("batch_size", "eval_batch_size", "grad_accum", "max_length", "eval_steps", "save_steps",
                     "logging_steps"):
            if getattr(self, name) < 1:
                problems.append((name, f"must be at least 1, got {getattr(self, name)}"))
        if self.save_total_limit < 2:
            problems.append(("save_total_limit", f"must be at least 2 (the one before the newest is the fallback "
                                                 f"when the newest is found corrupt), got {self.save_total_limit}"))
        for name in ("warmup", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                problems.append((name, f"must be >= 0, got {getattr(self, name)}"))
        if not 0 <= self.zero_stage <= 3:
            problems.append(("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}"))
        if self.offload_optimizer != "none" and self.zero_stage < 1:
            problems.append(("offload_optimizer", f"{self.offload_optimizer} needs zero_stage >= 1 (ZeRO-Offload), "
                                                  f"got zero_stage={self.zero_stage}"))
        Invalid.check(problems)


# Fields of the train block that change how a run is observed, stored or laid out over ranks, not what it
# computes: ZeRO shards the same optimizer step (pretrain's zero_stage is execution-only for the same reason).
UNHASHED_TRAIN = ("train.logging_steps", "train.save_steps", "train.save_total_limit", "train.keep_checkpoints",
                  "train.zero_stage", "train.offload_optimizer")


# ---------------------------------------------------------------- runtime and precision


@dataclass(frozen=True)
class Runtime:
    """What this machine gives the run: device, mixed precision, and the dtypes that follow."""

    cuda: bool
    bf16: bool  # bf16 mixed precision in the Trainer
    dtype: Any  # torch dtype the trained model is loaded in
    attn_implementation: str
    # Set only in a rank started by the launcher (stages/common/train_ranks.py); a lone process keeps these.
    world_size: int = 1  # ranks training together
    deepspeed: Mapping[str, Any] | None = None  # the DeepSpeed config of train.zero_stage >= 1 (deepspeed_config)

    @property
    def use_cpu(self) -> bool:
        return not self.cuda

    @property
    def export_dtype(self) -> Any:
        """The dtype of the exported model: bf16 when training ran in bf16, else fp32."""
        import torch

        return torch.bfloat16 if self.bf16 else torch.float32


def resolve_runtime(stage: str, precision: str, attn_implementation: str, *, frozen_base: bool) -> Runtime:
    """Pick device and dtypes from the config and what is present; fail on requests that cannot hold.

    ``frozen_base``: only an adapter trains (LoRA), so the base can live in bf16 on a bf16 run,
    halving its memory; fully trained weights stay fp32 master weights under bf16 autocast (AdamW
    is unstable on bf16 weights).
    """
    import torch

    cuda = torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not bf16_ok:
        raise TrainingError(f"stage.{stage}.precision is 'bf16' but no CUDA GPU with bf16 support is present "
                            f"(use precision: auto, which picks fp32 on CPU)")
    if attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not (cuda and is_flash_attn_2_available()):
            raise TrainingError(f"stage.{stage}.attn_implementation is 'flash_attention_2', which needs a CUDA GPU "
                                f"and the flash-attn package; use sdpa")
    bf16 = precision == "bf16" or (precision == "auto" and bf16_ok)
    dtype = torch.bfloat16 if bf16 and frozen_base else torch.float32
    return Runtime(cuda=cuda, bf16=bf16, dtype=dtype, attn_implementation=attn_implementation)


def offline_hub() -> None:
    """Nothing in a training stage may reach a model hub (telemetry included): models and datasets come
    from local dirs or the HF cache that `llmpipe fetch` filled (stages/common/hub.py)."""
    import os

    from stages.common.hub import hub_offline

    hub_offline()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------- tokenizer and models


def load_tokenizer(model_dir: Path, source: str, padding_side: str | None = None) -> Any:
    """The tokenizer of ``model_dir`` with a chat template fit for training, and a pad token.

    ``source`` names where the dir comes from in messages (``input pretrain.model``). The template:

    - **none saved** (the tokenize stage's tokenizer, or a base model's): llmpipe's. The chat
      markers the tokenizer lacks as single special tokens are added; the ids new to its vocabulary
      are recorded on it (:func:`added_token_ids`), for the model to grow and train their rows
      (:func:`grow_embeddings`, :func:`trainable_token_targets`). A tokenizer with the markers gets
      nothing added.
    - **llmpipe's**: kept, the same way (missing markers added).
    - **its own, with** ``{% generation %}`` **markers**: kept as is.
    - **its own, without them**: TRL's training version of it when TRL ships one
      (``trl.chat_template_utils.get_training_chat_template``: Llama 3, Qwen, Gemma, Phi... the same
      rendering with the markers), which the output model keeps. Otherwise llmpipe's, with a warning:
      the template cannot give the assistant mask that ``assistant_only_loss`` trains on (SFTTrainer
      refuses it), and a base model's template is one it was not trained to follow anyway.

    A tokenizer with no pad token pads with EOS. ``padding_side`` (left for generation-time
    trainers) is set when given, else the saved one is kept.
    """
    from transformers import AutoTokenizer

    from stages.common.chat import ChatFormatError, uses_llmpipe_format

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{source} {model_dir}: cannot load its tokenizer: {exc}") from exc
    if tok.eos_token is None:
        raise TrainingError(f"{source} {model_dir}: the tokenizer has no eos_token")
    added: list[int] = []
    try:
        if uses_llmpipe_format(tok) or not _training_template(tok, f"{source} {model_dir}"):
            added = _llmpipe_format(tok, f"{source} {model_dir}")
    except ChatFormatError as exc:
        raise TrainingError(f"{source} {model_dir}: {exc}") from exc
    setattr(tok, ADDED_TOKENS_ATTR, added)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # the tokenize stage reserves <|pad|>; other tokenizers may lack one
    if padding_side:
        tok.padding_side = padding_side
    return tok


def _llmpipe_format(tok: Any, where: str) -> list[int]:
    """llmpipe's template on ``tok``, with the markers it lacks added; the new ids."""
    from stages.common.chat import MARKERS, add_chat_markers, apply_chat_format

    added = add_chat_markers(tok)
    apply_chat_format(tok)
    if added:
        log.info("%s: the tokenizer lacked llmpipe's chat markers; added %s as special tokens %s (the model's "
                 "embeddings grow to them and their rows train)", where,
                 [m for m in MARKERS if tok.convert_tokens_to_ids(m) in added], added)
    return added


def _training_template(tok: Any, where: str) -> bool:
    """Keep the tokenizer's own template, made fit for assistant-only loss; False when it cannot be."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    from stages.common.chat import chat_template_of

    if has_generation_markers(chat_template_of(tok)):
        return True
    try:
        patched = get_training_chat_template(tok)
    except ValueError:
        log.warning("%s: its chat template has no {%% generation %%} markers and TRL has no training version "
                    "of it, so it cannot mark the assistant tokens to train on; using llmpipe's chat template "
                    "instead (stages/common/chat.py)", where)
        return False
    if patched is not None:
        log.info("%s: using TRL's training version of its chat template (the same rendering with "
                 "{%% generation %%} markers)", where)
        tok.chat_template = patched
    return True


def added_token_ids(tok: Any) -> list[int]:
    """The ids of the chat markers :func:`load_tokenizer` added to ``tok`` (empty for any other tokenizer)."""
    return list(getattr(tok, ADDED_TOKENS_ATTR, None) or [])


def grow_embeddings(model: Any, tok: Any) -> list[int]:
    """Fit ``model`` to the tokens :func:`load_tokenizer` added to ``tok``; their ids (empty: nothing done).

    The embeddings grow to the last added id when it lies beyond them (``resize_token_embeddings``
    also grows an output layer and sets ``config.vocab_size``); a vocabulary padded to a multiple
    may already have spare rows, which are then used. The added rows, input and output, start as
    the mean of the rows of the tokens before them: a new token's first logit is the average
    logit (neither dominant nor impossible) and its embedding an average input. transformers'
    ``mean_resizing`` samples around that mean; the mean itself keeps the start deterministic.
    """
    import torch

    ids = added_token_ids(tok)
    if not ids:
        return []
    _grow_to(model, max(ids) + 1)
    known = min(ids)  # every id below the first added one is a token the model was trained with
    layers = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not layers[0]:
        layers.append(output.weight)
    with torch.no_grad():
        for weight in layers:
            weight[ids] = weight[:known].float().mean(0).to(weight.dtype)
    return ids


def _grow_to(model: Any, rows: int) -> None:
    if rows > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)


def trainable_token_targets(model: Any, ids: Sequence[int]) -> dict[str, list[int]] | None:
    """peft's ``trainable_token_indices`` that train the rows ``ids`` (None when there are none): the
    input embedding's and, unless tied to it, the output layer's: a new token must be read and emitted.

    peft ties a tied output layer to the embedding's trainable rows itself. An output layer with a
    bias is refused: peft's trainable-token layer computes it without the bias.
    """
    if not ids:
        return None
    names = {id(module): name for name, module in model.named_modules()}
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    targets = {names[id(embedding)]: list(ids)}
    if output is not None and getattr(output, "bias", None) is not None:
        raise TrainingError(f"the model's output layer {names[id(output)]!r} has a bias: the rows of the added chat "
                            f"tokens {list(ids)} cannot be trained under LoRA (peft's trainable tokens drop the "
                            f"bias); use method: full, or a tokenizer with the chat markers")
    if output is not None and output.weight is not embedding.weight:
        targets[names[id(output)]] = list(ids)
    return targets


def expose_trained_output_rows(model: Any) -> None:
    """Let TRL's fused LM head see the trained output rows of added tokens (call it on the trainer's model).

    SFTTrainer (TRL 1.16) computes log-probs from ``lm_head.weight`` and ``lm_head.bias`` directly.
    peft's trainable-token wrapper of the output layer answers ``weight`` with the trained rows
    merged in (so their gradient flows), but has no ``bias`` attribute: the first loss would fail.
    The layer has none (:func:`trainable_token_targets` refuses a bias), so the wrapper answers None.
    """
    output = model.get_output_embeddings()
    if output is not None and hasattr(output, "token_adapter") and "bias" not in vars(output):
        try:
            output.bias  # noqa: B018  (a later peft may serve it)
        except AttributeError:
            output.bias = None


def load_model(model_dir: Path, source: str, rt: Runtime, *, dtype: Any = None,
               auto_class: str = "AutoModelForCausalLM", **kwargs: Any) -> Any:
    """A model dir loaded with a transformers Auto class, in ``dtype`` (default: the runtime's) with the
    runtime's attention kernel; a dir that does not load is a TrainingError naming ``source``."""
    import transformers

    cls = getattr(transformers, auto_class)
    try:
        return cls.from_pretrained(str(model_dir), dtype=rt.dtype if dtype is None else dtype,
                                   attn_implementation=rt.attn_implementation, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{source} {model_dir}: cannot load it with {auto_class}: {exc}") from exc


def check_model(model: Any, tok: Any, model_dir: Path, *, stage: str, source: str, max_length: int,
                lora: LoraSettings | None = None) -> None:
    """Fail fast, before training, when the tokenizer, ``train.max_length`` or the LoRA targets do not fit the model.

    A model without rows for the chat markers :func:`load_tokenizer` added was not grown to them
    (:func:`grow_embeddings`): only sft grows and trains new tokens, so the message sends align there.
    """
    vocab = max(tok.get_vocab().values()) + 1
    embeddings = model.get_input_embeddings().weight.shape[0]
    added = added_token_ids(tok)
    if added and max(added) >= embeddings:
        raise TrainingError(f"{source} {model_dir}: its tokenizer lacks llmpipe's chat markers (added here as ids "
                            f"{added}), which the model has no rows for, and the {stage} stage does not train new "
                            f"tokens; fine-tune the model with the sft stage first (it adds and trains them), and "
                            f"align its output")
    if vocab > embeddings:
        raise TrainingError(f"{source} {model_dir}: the tokenizer has ids up to {vocab - 1} but the model embeds "
                            f"only {embeddings}; they do not belong together")
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and max_length > context:
        raise TrainingError(f"stage.{stage}.train.max_length={max_length} exceeds the model's context of {context} "
                            f"tokens (max_position_embeddings of {source} {model_dir})")
    if lora is not None:
        linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                  if type(module).__name__ in ("Linear", "Linear4bit")}
        missing = [t for t in lora.target_modules if t not in linear]
        if missing:
            raise TrainingError(f"stage.{stage}.lora.target_modules: {missing} match no linear layer of the model; "
                                f"it has {sorted(linear)}")


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) weights; a bitsandbytes 4-bit parameter stores two per byte, its quant_state has the shape;
    a ZeRO-3 parameter holds only this rank's slice, its ds_numel the whole count."""
    def count(param: Any) -> int:
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            return math.prod(quant_state.shape)
        return getattr(param, "ds_numel", None) or param.numel()

    params = list(model.parameters())
    return sum(count(p) for p in params if p.requires_grad), sum(count(p) for p in params)


def lora_config(lora: LoraSettings, task_type: str = "CAUSAL_LM", *,
                trainable_tokens: Mapping[str, Sequence[int]] | None = None) -> Any:
    """peft's LoraConfig for the ``lora:`` block (``SEQ_CLS`` for a reward model: its new head trains in full).

    ``trainable_tokens`` (from :func:`trainable_token_targets`): embedding rows trained in full
    beside the adapter, by layer name; the adapter then carries them and merging writes them.
    """
    from peft import LoraConfig

    extra = {"trainable_token_indices": {k: list(v) for k, v in trainable_tokens.items()}} if trainable_tokens else {}
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), bias="none", task_type=task_type, **extra)


# ---------------------------------------------------------------- trainer arguments


def training_args(config_cls: type, train: TrainSettings, rt: Runtime, output_dir: Path, *, has_eval: bool = True,
                  eval_on_start: bool = False, **specific: Any) -> Any:
    """A TRL config (a TrainingArguments subclass) from the ``train:`` block; ``specific`` (the method's
    own settings, or overrides) wins. Every shared value is set here, none left to TRL's defaults,
    which differ from transformers' (TRL turns on bf16 and gradient checkpointing by default).

    In a launched rank (``rt.world_size`` > 1) the Trainer reads its rank from the launcher's
    environment; on CPU the ranks talk over gloo, and ``rt.deepspeed`` (ZeRO) goes to the Trainer,
    which fills its "auto" values from these arguments. A lone process gets neither: as before."""
    common = dict(
        output_dir=str(output_dir),
        use_cpu=rt.use_cpu,
        # With CPU ranks, use_cpu is also what makes accelerate see them (else it finds no device: world size 1).
        ddp_backend="gloo" if rt.use_cpu and rt.world_size > 1 else None,
        deepspeed=dict(rt.deepspeed) if rt.deepspeed else None,
        bf16=rt.bf16,
        fp16=False,
        learning_rate=train.lr,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size,
        gradient_accumulation_steps=train.grad_accum,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup,
        lr_scheduler_type=train.lr_scheduler,
        max_grad_norm=train.max_grad_norm,
        gradient_checkpointing=train.gradient_checkpointing,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=train.eval_steps,
        eval_on_start=has_eval and eval_on_start,
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps",  # also saves at the last step: the outputs are written from that checkpoint
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        seed=train.seed,
        data_seed=train.seed,
        report_to="none",  # tracking is the runner's job (it streams ctx.metrics_file to MLflow)
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    return config_cls(**{**common, **specific})


def deepspeed_config(train: TrainSettings, cuda: bool) -> dict[str, Any] | None:
    """The DeepSpeed config of ``train.zero_stage`` for the HF Trainer (``TrainingArguments(deepspeed=...)``),
    or None for plain DDP (stage 0).

    Batch sizes, clipping and precision are "auto": the Trainer fills them from its arguments
    (:func:`training_args`), so the ``train:`` block stays their one source and DeepSpeed's check
    ``train_batch_size == micro batch x accumulation x ranks`` holds by construction. The optimizer
    and scheduler stay the Trainer's (AdamW, ``train.lr_scheduler``), as without ZeRO; only
    ZeRO-Offload needs DeepSpeed's own AdamW (its CPU Adam: DeepSpeed refuses another optimizer on
    offloaded states). ZeRO-3 checkpoints carry the weights gathered into one file
    (``stage3_gather_16bit_weights_on_model_save``, in the training dtype despite the name), so
    the stage exports from a checkpoint the same way at every stage.
    """
    if train.zero_stage == 0:
        return None
    zero: dict[str, Any] = {"stage": train.zero_stage, "contiguous_gradients": True,
                            "overlap_comm": cuda,  # overlaps NCCL with compute; nothing to overlap over gloo
                            "reduce_bucket_size": "auto"}
    if train.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_gather_16bit_weights_on_model_save=True)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }
    if train.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": train.offload_optimizer, "pin_memory": cuda}
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                           "weight_decay": "auto"}}
    return config


# ---------------------------------------------------------------- metrics


def rename_logs(logs: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """A Trainer log as curve points: the shared quantities under llmpipe's names (TRAINER_NAMES), other
    numbers under TRL's own names, all behind ``prefix``; the end-of-run summary and eval timings dropped."""
    out = {}
    for key, value in logs.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key in _SUMMARY_KEYS or key.endswith(_TIMING_SUFFIXES):
            continue
        out[prefix + TRAINER_NAMES.get(key, key)] = float(value)
    return out


def metrics_callback(ctx: Any, *, prefix: str = "", evaluate_last_step: bool = True) -> Any:
    """A TrainerCallback forwarding the Trainer's logs to ``ctx.log_metrics`` as curves (see :func:`rename_logs`).

    ``tokens_per_s`` comes from TRL's running ``num_tokens`` (non-padding tokens) between two train
    logs; ``tokens`` holds this attempt's count. Only the main process writes, so a multi-process
    launch does not duplicate points. With ``evaluate_last_step`` it asks for an evaluation at the
    last step (when ``eval_steps`` does not land there), so the final checkpoint's
    trainer_state.json holds the whole history, final evaluation included.
    """
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def __init__(self) -> None:
            self.last: tuple[float, float] | None = None  # (time, num_tokens) at the previous train log
            self.tokens = 0.0  # tokens trained in this attempt (TRL counts from 0 in each process)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if evaluate_last_step and state.global_step >= state.max_steps:
                control.should_evaluate = True
            return control

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            out = rename_logs(logs, prefix)
            if "loss" in logs and isinstance(logs.get("num_tokens"), (int, float)):
                now, tokens = time.perf_counter(), float(logs["num_tokens"])
                if self.last is not None and tokens > self.last[1] and now > self.last[0]:
                    out[prefix + TOKENS_PER_S] = (tokens - self.last[1]) / (now - self.last[0])
                self.last = (now, tokens)
                self.tokens = tokens
            if out:
                ctx.log_metrics(out, step=state.global_step)
                ctx.log.info("step %d: %s", state.global_step, ", ".join(f"{k}={v:.4g}" for k, v in out.items()))

    return MetricsCallback()


def history_metrics(checkpoint: Path, prefix: str = "") -> dict[str, float]:
    """A phase's final metrics from a checkpoint's trainer_state.json, which the Trainer restores and
    extends on resume, so they span all attempts.

    ``steps``; ``first_train_loss`` and ``final_train_loss``; ``initial_eval_loss`` when an evaluation
    ran before the first step; and every figure of the last evaluation as ``final_<name>``
    (``final_eval_loss``, ``final_eval_rewards/accuracies``...).
    """
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    history = state.get("log_history", [])
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h for h in history if any(k.startswith("eval_") for k in h)]
    out = {"steps": float(state["global_step"])}
    if losses:
        out.update(first_train_loss=float(losses[0]), final_train_loss=float(losses[-1]))
    if evals and evals[0].get("step") == 0 and "eval_loss" in evals[0]:
        out["initial_eval_loss"] = float(evals[0]["eval_loss"])
    if evals:
        out.update({f"final_{k}": v for k, v in rename_logs(evals[-1]).items() if k.startswith("eval_")})
    return {prefix + k: v for k, v in out.items()}


# ---------------------------------------------------------------- checkpoints and the training loop


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1])


@dataclass(frozen=True)
class Resume:
    """Where an attempt of a training phase starts."""

    checkpoint: Path | None  # the newest complete checkpoint, or None: from scratch
    finished: bool  # that checkpoint is of the last step: nothing left to train
    corrupt: tuple[tuple[Path, str], ...] = ()  # checkpoints set aside on the way: (new path, what failed)

    @property
    def step(self) -> int:
        return checkpoint_step(self.checkpoint) if self.checkpoint is not None else 0


def latest_checkpoint(checkpoints: Path, log: Any = None, *, hashes: bool = True) -> Resume:
    """The newest *complete* checkpoint under ``checkpoints`` whose files match its manifest (or None),
    whether it is of the last step, and the corrupt ones set aside on the way.

    The Trainer writes a checkpoint file by file; the manifest callback (:func:`manifest_callback`)
    adds the manifest once the save is done. A checkpoint dir without one is what a crash during
    saving leaves behind: it is removed (logged), as the Trainer would overwrite it anyway. A dir
    whose files no longer match (``hashes``: by content too, else by size) is moved to
    ``<checkpoints>/set-aside/`` with a warning naming the file. Either way the previous checkpoint
    is tried, so resuming never fails on every later attempt for one bad save.
    """
    if not checkpoints.is_dir():
        return Resume(None, False)
    found = sorted((int(m.group(1)), p) for p in checkpoints.iterdir()
                   if p.is_dir() and (m := _CHECKPOINT.fullmatch(p.name)))
    corrupt: list[tuple[Path, str]] = []
    for _, path in reversed(found):
        if not (path / MANIFEST).is_file():
            if log is not None:
                log.warning("removing incomplete checkpoint %s (no %s: a save was interrupted)", path, MANIFEST)
            shutil.rmtree(path, ignore_errors=True)
            continue
        try:
            verify_manifest(path, hashes=hashes)
        except ManifestMismatch as exc:
            moved = set_aside(path, folder=checkpoints / SET_ASIDE)
            corrupt.append((moved, str(exc)))
            if log is not None:
                log.warning("checkpoint %s is corrupt: %s; set aside as %s, trying the one before it", path.name,
                            exc, moved)
            continue
        state = json.loads((path / TRAINER_STATE).read_text())
        return Resume(path, state["global_step"] >= state["max_steps"], tuple(corrupt))
    return Resume(None, False, tuple(corrupt))


def manifest_callback() -> Any:
    """A TrainerCallback that writes a checkpoint's manifest once the Trainer has saved it (``on_save``
    runs after the weights, optimizer, RNG and trainer state are written, and after the rotation).

    Rank 0 writes it. Under a multi-rank launch every rank's shards are on disk first:
    stages/common/train_ranks.py's ``rank_sync_callback`` puts a barrier after each save.
    """
    from transformers import TrainerCallback

    class ManifestCallback(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                write_manifest(Path(args.output_dir) / f"checkpoint-{state.global_step}",
                               meta={"step": state.global_step})

    return ManifestCallback()


def any_rank(flag: bool, device: Any = None) -> bool:
    """Whether ``flag`` is set on any process of the torch.distributed job (one all-reduce; every process
    must call it at the same point), or ``flag`` itself outside one. ``device``: where the process's
    collectives run (its GPU under NCCL; None: the CPU)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    import torch

    total = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(total)
    return total.item() > 0


def save_request_callback() -> Any:
    """A TrainerCallback that saves and stops at the step boundary after a save request (pipeline/save_request.py:
    Slurm's time limit is near), so that the job is requeued and resumes from that step.

    Every process looks for the request at ``on_step_end`` and the processes of a distributed run agree
    with one all-reduce (:func:`any_rank`), so that all of them save the same step. It then asks the
    Trainer to save that step's checkpoint (the manifest callback completes it) and stop;
    ``saved_at`` holds the step, and :func:`train_or_resume` raises SavedOnRequest instead of handing the
    unfinished model on. The last step is left alone: training ends there anyway.
    """
    from transformers import TrainerCallback

    path = request_path()

    class SaveRequestCallback(TrainerCallback):
        def __init__(self) -> None:
            self.saved_at: int | None = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step >= state.max_steps:
                return control
            # Every process takes part in the all-reduce, whether or not it was told where to look.
            if any_rank(path is not None and requested(path), args.device):
                control.should_save = True
                control.should_training_stop = True
                self.saved_at = state.global_step
            return control

    return SaveRequestCallback()


def train_or_resume(build: Callable[[Resume], Any], checkpoints: Path, ctx: Any, *, prefix: str = "",
                    has_eval: bool = True) -> tuple[Path, dict[str, float]]:
    """Train one phase, resuming from its newest complete checkpoint; the final checkpoint and the phase's metrics.

    ``build(resume)`` makes the trainer (loading the model is its job, so a finished phase loads
    nothing); its ``args.output_dir`` must be ``checkpoints``. The metrics callback is added here.
    A checkpoint of the last step means an earlier attempt finished training (and failed later):
    training is not entered again (transformers 5.19 would run one extra step when resumed at
    max_steps mid-epoch) and the caller writes its outputs from that checkpoint. A resume is a
    point ``resume_step`` on the curves and ``resumed_from_step`` in the metrics (0: from scratch, a
    clean start when every checkpoint was corrupt), which also hold ``checkpoints_set_aside``,
    :func:`history_metrics`, ``train_s`` and ``mean_tokens_per_s`` (this attempt's), behind ``prefix``.
    A save request (:func:`save_request_callback`) ends training with a checkpoint of the step it
    came at and raises SavedOnRequest: the next attempt resumes there.
    """
    resume = latest_checkpoint(checkpoints, ctx.log)
    if resume.checkpoint is not None:
        # A point on the curves too, so the MLflow run shows where this attempt picked up.
        ctx.log_metrics({prefix + RESUME_STEP: resume.step}, step=resume.step)
    elif resume.corrupt:
        ctx.log.warning("%sno complete checkpoint is left (%d set aside): training starts over from step 0", prefix,
                        len(resume.corrupt))
    if resume.finished:
        ctx.log.info("%straining finished in an earlier attempt; writing the outputs from %s", prefix,
                     resume.checkpoint)
        metrics = {"resumed_from_step": float(resume.step), "checkpoints_set_aside": float(len(resume.corrupt)),
                   "train_s": 0.0}
        return resume.checkpoint, {**history_metrics(resume.checkpoint, prefix),
                                   **{prefix + k: v for k, v in metrics.items()}}

    checkpoints.mkdir(parents=True, exist_ok=True)
    trainer = build(resume)
    if Path(trainer.args.output_dir).resolve() != checkpoints.resolve():
        raise ValueError(f"the trainer writes checkpoints to {trainer.args.output_dir}, not {checkpoints}")
    callback = metrics_callback(ctx, prefix=prefix, evaluate_last_step=has_eval)
    trainer.add_callback(callback)
    trainer.add_callback(manifest_callback())
    saver = save_request_callback()
    trainer.add_callback(saver)
    trainable, total = parameter_counts(trainer.model)
    ctx.log.info("%s%d trainable of %d parameters (%.2f%%)", prefix, trainable, total, 100 * trainable / max(total, 1))
    if resume.checkpoint is not None:
        ctx.log.info("%sresuming from %s (attempt %d)", prefix, resume.checkpoint, ctx.attempt)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume.checkpoint) if resume.checkpoint is not None else None)
    train_s = time.perf_counter() - start
    del trainer
    free_memory()  # the trainer, its optimizer state and model copies, before the outputs load models again
    if saver.saved_at is not None:  # never export a model that stopped half way; the requeued job resumes
        raise SavedOnRequest(saver.saved_at, f"{prefix}checkpoint-{saver.saved_at} in {checkpoints}")
    final = latest_checkpoint(checkpoints, ctx.log, hashes=False)  # hashed a moment ago: sizes suffice
    if final.checkpoint is None or not final.finished:
        raise TrainingError(f"training ended without a complete checkpoint of its last step in {checkpoints}")
    metrics = {
        "train_s": train_s,
        "mean_tokens_per_s": callback.tokens / train_s if train_s > 0 else 0.0,  # this attempt's, evals included
        "trainable_params": float(trainable),
        "total_params": float(total),
        "resumed_from_step": float(resume.step),
        "checkpoints_set_aside": float(len(resume.corrupt)),
    }
    return final.checkpoint, {**history_metrics(final.checkpoint, prefix),
                              **{prefix + k: v for k, v in metrics.items()}}


def remove_checkpoints(checkpoints: Path, train: TrainSettings) -> None:
    """Drop the checkpoints after a successful run unless ``train.keep_checkpoints``; set-aside ones go
    with them (the warning in the stage log stays as the record of what was corrupt)."""
    if not train.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)


def free_memory() -> None:
    """Free a finished trainer (its optimizer state, its model copies) before loading models again: trainers
    and their callbacks reference each other, so only the cycle collector frees them."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- outputs


def merged_model(checkpoint: Path, base_dir: Path, load: Callable[[Path], Any],
                 save_adapter_to: Path | None = None) -> Any:
    """The model of a final checkpoint as a plain transformers model.

    A LoRA checkpoint (adapter_config.json) is merged into its base, loaded with ``load(base_dir)``,
    with ``merge_and_unload``; the adapter itself is saved on the way (cleanly, without optimizer
    state) to ``save_adapter_to`` when given. A full checkpoint is ``load(checkpoint)``. For QLoRA
    ``load`` gives the base un-quantized: merging into 4-bit weights would lose the adapter's update to
    rounding, and the result would not be a plain model.

    An adapter that trained added tokens (``trainable_token_indices``) needs the base grown to them:
    it is grown here, to the last such id, as :func:`grow_embeddings` grew it for training. peft
    stores those rows' trained values (not a difference from their start), and since the vocabulary
    grew it also stores the whole grown embedding and output matrices in the adapter (its
    ``save_embedding_layers="auto"``), so the merge does not depend on how the new rows started.
    """
    if not (checkpoint / "adapter_config.json").is_file():
        return load(checkpoint)
    from peft import PeftModel

    base = load(base_dir)
    indices = json.loads((checkpoint / "adapter_config.json").read_text()).get("trainable_token_indices")
    if indices:
        ids = indices if isinstance(indices, list) else [i for rows in indices.values() for i in rows]
        _grow_to(base, max(ids) + 1)  # as grow_embeddings did for training
    peft_model = PeftModel.from_pretrained(base, str(checkpoint))
    if save_adapter_to is not None:
        # peft keeps target_modules as a set and writes it in set order, which changes with each process's
        # string hash seed; sorted, the same training saves the same adapter bytes (bench/faults.py checks).
        for config in peft_model.peft_config.values():
            if isinstance(config.target_modules, set | frozenset):
                config.target_modules = sorted(config.target_modules)
        peft_model.save_pretrained(str(save_adapter_to))
    return peft_model.merge_and_unload()


def write_model(model: Any, tok: Any, out: Path) -> None:
    """A standalone model dir, written atomically: weights, config, tokenizer, and for a generative
    model a generation config that stops on the end-of-turn token (``<|end|>``, or the one of the
    tokenizer's own template) as well as EOS, and on the stop ids the base's config already had."""
    from stages.common.chat import stop_token_ids

    model.config.use_cache = True  # training turns the KV cache off; generation wants it
    model.config.pad_token_id = tok.pad_token_id
    if model.can_generate():
        stops = stop_token_ids(tok)
        before = model.generation_config.eos_token_id
        stops += [i for i in ([before] if isinstance(before, int) else before or []) if i not in stops]
        model.generation_config.eos_token_id = stops
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.bos_token_id = tok.bos_token_id
    with atomic_path(out) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))


def sample_reply(model: Any, tok: Any, messages: Sequence[Mapping[str, str]], max_new_tokens: int) -> tuple[str, int]:
    """Greedy reply of ``model`` to the turns of ``messages`` before its first assistant turn (all of them
    if it has none): the text and the number of new tokens. A smoke test that the model loads and chats."""
    import torch

    end = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    enc = tok.apply_chat_template(list(messages[:end]), add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:]
    return tok.decode(new, skip_special_tokens=True), int(new.numel())


# ---------------------------------------------------------------- data sources


def source_problems(source: str, files: Sequence[str], dataset: str | None) -> list[tuple[str, str]]:
    """Config problems of a ``data:`` block's source selection (keys relative to the block), for Invalid."""
    problems = []
    if source == "files" and not files:
        problems.append(("files", "is empty but source is 'files': list JSONL/Parquet paths or globs"))
    if source == "dataset" and not dataset:
        problems.append(("dataset", "is null but source is 'dataset': name a `datasets` dataset"))
    if source != "files" and files:
        problems.append(("files", f"is set but source is {source!r}: set source: files, or clear files"))
    if source != "dataset" and dataset:
        problems.append(("dataset", f"is set but source is {source!r}: set source: dataset, or set dataset: null"))
    return problems


def expand_files(patterns: Sequence[str], key: str) -> list[Path]:
    """The files named by paths or globs, in a stable order; a pattern matching no file is an error naming ``key``."""
    found: list[Path] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern] * Path(pattern).is_file()
        if not matched:
            raise TrainingDataError(f"{key}: {pattern!r} matches no file")
        found.extend(Path(m) for m in matched)
    return found


def file_suffix(path: Path) -> str:
    """``.jsonl.gz`` for a gzipped file, else the last suffix."""
    return "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix


INVALID_JSON = object()  # a JSONL line that does not parse: the reader counts it


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number from 0, parsed record) for the non-empty lines of a JSONL file (gzipped when it ends in
    .gz); the record is INVALID_JSON for a line that does not parse."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        for row, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield row, json.loads(line)
            except json.JSONDecodeError:
                yield row, INVALID_JSON
