"""sft: supervised fine-tuning on chat data with TRL's SFTTrainer: LoRA, QLoRA or full.

What it does, in order:

1. Data (stages/sft/data.py, ``data.source``): conversations derived from the cleaned corpus
   (``corpus``, the tiny default), read from local JSONL/Parquet files (``files``), or loaded by
   `datasets` name (``dataset``); a seeded validation split is held out. Both splits are written
   to ``<output>/data/{train,validation}.jsonl`` for audit.
2. Tokenizer: the one in the ``pretrain.model`` dir, given llmpipe's chat template
   (stages/common/chat.py). With ``assistant_only_loss`` (default) only assistant tokens (their
   ``<|end|>`` included) carry loss, through the template's ``{% generation %}`` markers.
3. Model: the pretrained model, loaded as is (``lora``, ``full``) or in 4-bit NF4 with
   bitsandbytes (``qlora``, with the ``quant:`` block), then trained by ``trl.SFTTrainer`` with a
   PEFT LoRA config (``lora:``) for lora/qlora, optimised as the ``train:`` block says. The curves
   (``train_loss``, ``eval_loss`` also before the first step, ``lr``, ``grad_norm``,
   ``tokens_per_s``) carry the names every training stage uses (stages/common/training.py).
4. Outputs:
   - ``adapter``: the PEFT adapter dir (adapter_config.json, adapter_model.safetensors, the
     tokenizer) for lora/qlora, with ``adapter_info.json``. For ``full`` there is no adapter: the
     dir holds only ``adapter_info.json`` (``"has_adapter": false``) and a README saying so;
     downstream stages check ``has_adapter`` (or the absence of adapter_config.json).
   - ``model``: a standalone HF model dir (safetensors, config, generation config, tokenizer with
     the chat template) loadable with ``AutoModelForCausalLM.from_pretrained``. For lora/qlora the
     adapter is merged into the base with ``merge_and_unload``; its generation config stops on
     ``<|end|>`` as well as EOS. Both outputs are written atomically.
   - ``sample.json`` (not an artifact of the stage, attached to the MLflow run): the output model's
     greedy reply to the first validation prompt, a smoke test that it loads and chats.

Resumable (stages/common/training.py, shared with align): Trainer checkpoints go to
``<output>/checkpoints`` every ``train.save_steps`` and at the last step (which is always evaluated
too, so its trainer_state.json holds the whole loss history). A later attempt of the same
fingerprint resumes from the newest complete checkpoint whose files match its manifest (logged,
plus a point ``resume_step`` on the curves and ``resumed_from_step`` in the final metrics; a
corrupt newer one is set aside with a warning and counted in ``checkpoints_set_aside``); if that
is the last step, training is skipped. Both outputs are written from the last checkpoint, and the
checkpoints are deleted after a successful run unless ``train.keep_checkpoints``.

Devices: CUDA when present (bf16 when the GPU supports it and ``precision`` is auto/bf16), else
CPU with ``use_cpu=True`` and fp32. Ranks (``launch:``, the same block and launcher as pretrain's,
stages/common/train_ranks.py): one rank trains in this process (the tiny default, a one-GPU node);
several GPUs, nodes or ``launch.cpu_ranks`` start ``python -m stages.sft.ranks`` in each rank,
which trains the same SFTTrainer as DDP, or under DeepSpeed ZeRO with ``train.zero_stage`` >= 1;
this process then writes the outputs from the final checkpoint as above. ``train.batch_size`` is
per rank: an optimizer step takes ``batch_size x grad_accum x ranks`` conversations
(``global_batch_size`` in the metrics, with ``world_size``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import Stage, StageContext
from pipeline.files import atomic_path, write_json_atomic
from pipeline.schema import Invalid
from stages.common.launch import LaunchConfig
from stages.common.models import check_model_spec, model_dir, parse_model, training_stage_hooks
from stages.common.training import (
    UNHASHED_TRAIN,
    Attention,
    LoraSettings,
    Precision,
    Resume,
    Runtime,
    TrainingError,
    TrainSettings,
)
from stages.sft.data import SftDataConfig

CHECKPOINTS = "checkpoints"
DATA_DIR = "data"  # <output>/data/{train,validation}.jsonl: the conversations, for audit and for the ranks
RANKS_MODULE = "stages.sft.ranks"  # what each launched rank runs
ADAPTER_INFO = "adapter_info.json"
BASE = "base model"  # how messages name the base model
BASE_STAGES = ("pretrain",)  # the stages base_model may name


@dataclass(frozen=True, kw_only=True)
class QuantSettings:
    quant_type: Literal["nf4", "fp4"]  # 4-bit data type of the frozen base (QLoRA uses NF4)
    double_quant: bool  # also quantize the quantization constants (saves ~0.4 bit/param)
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"]  # of the 4-bit matmuls; auto: the run's


@dataclass(frozen=True, kw_only=True)
class SftConfig:
    base_model: str  # the model fine-tuned: pretrain (the stage's output), a local HF model dir, or org/name[@rev]
    method: Literal["lora", "qlora", "full"]  # lora | qlora (4-bit base + LoRA) | full (all weights)
    precision: Precision  # auto: bf16 mixed precision on a bf16 GPU, else fp32
    attn_implementation: Attention  # attention kernel: sdpa | eager | flash_attention_2 (CUDA + flash-attn)
    data: SftDataConfig  # where the conversations come from
    lora: LoraSettings  # adapter shape (lora and qlora)
    quant: QuantSettings | None  # 4-bit loading of the base: qlora only, null for lora and full
    train: TrainSettings  # optimisation, evaluation and checkpoints
    packing: bool  # pack conversations into train.max_length rows (best-fit, no cross-attention)
    assistant_only_loss: bool  # loss on assistant tokens only (false: on the whole conversation)
    sample_max_new_tokens: int  # tokens of the sample reply logged after merging; 0: skip (execution-only)
    dataset_num_proc: int | None  # processes for tokenizing the data; null: in process (execution-only)
    launch: LaunchConfig  # how ranks start (pretrain's launcher); one rank trains in the stage process (execution-only)

    def __post_init__(self) -> None:
        problems = check_model_spec(self.base_model, BASE_STAGES)
        if self.method == "qlora" and self.quant is None:
            problems.append(("quant", "is null but method is 'qlora': set the 4-bit settings (stage/sft=qlora "
                                      "has them)"))
        if self.method != "qlora" and self.quant is not None:
            # torchtune-style: say which flag is wrong rather than ignore it.
            problems.append(("quant", f"is set but method is {self.method!r}: 4-bit loading is for method qlora "
                                      f"(4-bit weights cannot be trained directly); use method: qlora, or set "
                                      f"quant: null"))
        if self.sample_max_new_tokens < 0:
            problems.append(("sample_max_new_tokens", f"must be >= 0, got {self.sample_max_new_tokens}"))
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            problems.append(("dataset_num_proc", f"must be at least 1 or null, got {self.dataset_num_proc}"))
        Invalid.check(problems)


# ---------------------------------------------------------------- devices and model


def resolve_runtime(cfg: SftConfig) -> Runtime:
    """The shared runtime (stages/common/training.py); for qlora the base loads in the 4-bit compute dtype."""
    import torch

    from stages.common.training import resolve_runtime as shared_runtime

    rt = shared_runtime("sft", cfg.precision, cfg.attn_implementation, frozen_base=cfg.method != "full")
    if cfg.quant is None or cfg.quant.compute_dtype == "auto":
        return rt
    compute = getattr(torch, cfg.quant.compute_dtype)
    if compute == torch.float16 and not rt.cuda:
        raise TrainingError("stage.sft.quant.compute_dtype is 'float16', which needs a CUDA GPU; use auto or float32")
    return dataclasses.replace(rt, dtype=compute)


def load_base_model(model_dir: Path, cfg: SftConfig, rt: Runtime) -> Any:
    """The pretrained model, un-quantized in ``rt.dtype``, or 4-bit (bitsandbytes) for QLoRA."""
    import os

    from stages.common.training import load_model

    kwargs: dict[str, Any] = {}
    if cfg.quant is not None:
        try:
            import bitsandbytes  # noqa: F401  (fail here with the flag named, not deep inside transformers)
        except ImportError as exc:
            raise TrainingError(f"stage.sft.method is 'qlora' but bitsandbytes cannot be imported: {exc}") from exc
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.quant.quant_type,
            bnb_4bit_use_double_quant=cfg.quant.double_quant, bnb_4bit_compute_dtype=rt.dtype)
        if rt.cuda:  # the weights are quantized as they land on this process's GPU
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = load_model(model_dir, BASE, rt, **kwargs)
    if cfg.quant is not None:
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


def count_too_long(tok: Any, examples: list[Any], max_length: int) -> int:
    """Conversations longer than ``max_length`` tokens once rendered with the chat template.

    TRL truncates them (packed or not), which cuts the end of the last reply and its ``<|end|>``:
    the model then learns less, and never to stop, on those. Counted so that a too small
    ``train.max_length`` (or too long derived prompts) shows in the log and the metrics.
    """
    too_long = 0
    for example in examples:
        ids = tok.apply_chat_template(example.messages, tokenize=True, return_dict=True)["input_ids"]
        too_long += len(ids) > max_length
    return too_long


# ---------------------------------------------------------------- training


def to_dataset(examples: list[Any]) -> Any:
    from datasets import Dataset

    return Dataset.from_list([{"messages": e.messages} for e in examples])


def build_trainer(cfg: SftConfig, rt: Runtime, tok: Any, data: Any, base_dir: Path, checkpoints: Path,
                  resume: Resume) -> Any:
    """The SFTTrainer of this run. The eval before the first step is skipped on resume: the first
    attempt measured it.

    A base model whose tokenizer lacked the chat markers (``load_tokenizer`` added them) grows its
    embeddings to them here; under LoRA their embedding and output rows train beside the adapter.
    """
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from stages.common.training import (
        check_model,
        expose_trained_output_rows,
        grow_embeddings,
        lora_config,
        trainable_token_targets,
        training_args,
    )

    set_seed(cfg.train.seed)  # before the LoRA weights are initialised
    model = load_base_model(base_dir, cfg, rt)
    added = grow_embeddings(model, tok)
    check_model(model, tok, base_dir, stage="sft", source=BASE, max_length=cfg.train.max_length,
                lora=cfg.lora if cfg.method != "full" else None)
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # The standard QLoRA preparation: freeze the base, norms/embeddings in fp32, checkpointing hooks.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    has_eval = bool(data.validation)
    args = training_args(SFTConfig, cfg.train, rt, checkpoints, has_eval=has_eval,
                         eval_on_start=resume.checkpoint is None,
                         max_length=cfg.train.max_length, packing=cfg.packing,
                         assistant_only_loss=cfg.assistant_only_loss, dataset_num_proc=cfg.dataset_num_proc)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(data.train),
        eval_dataset=to_dataset(data.validation) if has_eval else None,
        processing_class=tok,
        peft_config=(lora_config(cfg.lora, trainable_tokens=trainable_token_targets(model, added))
                     if cfg.method != "full" else None),
    )
    expose_trained_output_rows(trainer.model)
    return trainer


# ---------------------------------------------------------------- outputs


def write_outputs(cfg: SftConfig, rt: Runtime, tok: Any, trained: Path, base_dir: Path, ctx: StageContext) -> None:
    """Both outputs from the final checkpoint ``trained`` (see the module doc for their layout).

    The merged model is in bf16 when training ran in bf16 (a full fine-tune's fp32 master weights
    included), else fp32. For QLoRA the base is loaded un-quantized, in that precision, and the
    adapter merged into it: the standard way (as in the QLoRA paper's release and PEFT's docs).
    The merged weights differ from what QLoRA trained against only by the base's NF4 quantization
    error; evaluating the merged model measures it.
    """
    from stages.common.training import load_model, merged_model, write_model

    def load(path: Path) -> Any:
        return load_model(path, "model", rt, dtype=rt.export_dtype)

    with atomic_path(ctx.output("adapter")) as adapter_dir:
        adapter_dir.mkdir()
        if cfg.method == "full":
            model = merged_model(trained, base_dir, load)
            (adapter_dir / "README.md").write_text(
                "# No adapter\n\nThis sft run used `method: full`: every weight was trained, so there is no\n"
                "adapter to apply. The fine-tuned model is the sibling `model/` directory.\n")
        else:
            model = merged_model(trained, base_dir, load, save_adapter_to=adapter_dir)
            tok.save_pretrained(str(adapter_dir))
        info = {"method": cfg.method, "has_adapter": cfg.method != "full", "base_model": str(base_dir),
                "merged_model": "../model"}
        write_json_atomic(adapter_dir / ADAPTER_INFO, info, indent=2, newline=True, fsync=False)
    write_model(model, tok, ctx.output("model"))


def log_sample(cfg: SftConfig, rt: Runtime, tok: Any, conversation: list[dict[str, str]], ctx: StageContext) -> None:
    """The output model's greedy reply to the first user turn of a validation conversation, logged and
    attached to the MLflow run as sample.json: a smoke test that the saved model loads and chats."""
    from stages.common.training import load_model, sample_reply

    model = load_model(ctx.output("model"), "output model", rt, dtype=rt.export_dtype)
    if rt.cuda:
        model.to("cuda")
    reply, _ = sample_reply(model, tok, conversation, cfg.sample_max_new_tokens)
    ctx.log.info("sample reply of the output model to a validation prompt: %r", reply)
    sample = ctx.output_dir / "sample.json"  # attached to the MLflow run, next to the curves
    write_json_atomic(sample, {"conversation": conversation, "reply": reply}, indent=2, ensure_ascii=False)
    ctx.log_artifact(sample)


def train(cfg: SftConfig, ctx: StageContext, rt: Runtime, tok: Any, data: Any, base_dir: Path) -> tuple[Path, dict]:
    """Train (or resume) in this process or in one launched rank (stages/sft/ranks.py): the final
    checkpoint and the training metrics."""
    from stages.common.train_ranks import synced
    from stages.common.training import train_or_resume

    checkpoints = ctx.output_dir / CHECKPOINTS
    build = synced(lambda resume: build_trainer(cfg, rt, tok, data, base_dir, checkpoints, resume), rt)
    return train_or_resume(build, checkpoints, ctx, has_eval=bool(data.validation))


def run(cfg: SftConfig, ctx: StageContext) -> dict[str, float]:
    from stages.common.hub import require_cached_data
    from stages.common.inputs import log_training_data
    from stages.common.shards import list_parquet
    from stages.common.train_ranks import cuda_device_count, layout_metrics, plan_ranks, train_in_ranks
    from stages.common.training import load_tokenizer, offline_hub, remove_checkpoints
    from stages.sft.data import load_instruction_data, write_jsonl

    started = time.perf_counter()
    offline_hub()
    require_cached_data(cfg.data, "stage.sft.data")  # a hub dataset not fetched: HubError saying `llmpipe fetch`
    base = parse_model(cfg.base_model, BASE_STAGES)
    base_dir = model_dir(base, ctx)
    ctx.log.info("base model: %s (%s)", base.describe(), base_dir)
    shards = list_parquet(ctx.input("pii.documents")) if cfg.data.source == "corpus" else []
    data = load_instruction_data(cfg.data, shards)
    write_jsonl(data.train, ctx.output_dir / DATA_DIR / "train.jsonl")
    write_jsonl(data.validation, ctx.output_dir / DATA_DIR / "validation.jsonl")
    ctx.log.info("instruction data (%s): %s", cfg.data.source, data.metrics())

    rt = resolve_runtime(cfg)
    tok = load_tokenizer(base_dir, BASE)
    too_long = count_too_long(tok, data.train, cfg.train.max_length)
    if too_long:
        ctx.log.warning("%d of %d training conversations exceed stage.sft.train.max_length=%d tokens and will be "
                        "truncated (their last reply cut)", too_long, len(data.train), cfg.train.max_length)
    checkpoints = ctx.output_dir / CHECKPOINTS
    plan = plan_ranks(cfg.launch, cfg.train, ctx.output_dir, RANKS_MODULE, stage="sft",
                      cuda_devices=cuda_device_count())
    layout = layout_metrics(cfg.train, plan.world_size if plan else 1)
    ctx.log.info("method=%s: %d train / %d validation conversations; device=%s bf16=%s; %d rank(s)%s, "
                 "%d conversations per step", cfg.method, len(data.train), len(data.validation),
                 "cuda" if rt.cuda else "cpu", rt.bf16, layout["world_size"],
                 f" (ZeRO-{cfg.train.zero_stage})" if plan and cfg.train.zero_stage else "",
                 layout["global_batch_size"])
    if plan is None:
        trained, metrics = train(cfg, ctx, rt, tok, data, base_dir)
    else:
        trained, metrics = train_in_ranks(ctx, cfg, plan, {"": checkpoints}, base_dir=str(base_dir))
    metrics.update(layout)
    metrics["truncated_examples"] = float(too_long)

    export_start = time.perf_counter()
    write_outputs(cfg, rt, tok, trained, base_dir, ctx)
    metrics["export_s"] = time.perf_counter() - export_start

    if cfg.sample_max_new_tokens and data.validation:
        log_sample(cfg, rt, tok, data.validation[0].messages, ctx)
    remove_checkpoints(checkpoints, cfg.train)

    metrics.update(data.metrics())
    metrics["total_s"] = time.perf_counter() - started
    # MLflow lineage: the data (files, dataset or corpus) and the conversations made of it; the model.
    log_training_data(ctx, cfg.data, {"training": (ctx.output_dir / DATA_DIR / "train.jsonl", len(data.train)),
                                      "validation": (ctx.output_dir / DATA_DIR / "validation.jsonl",
                                                     len(data.validation))})
    ctx.log_model("sft", ctx.output("model"), params={"base_model": cfg.base_model, "method": cfg.method})
    return metrics


DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")  # the data files stages/sft/data.py reads (read_records)


STAGE = Stage(
    name="sft",
    config=SftConfig,
    run=run,
    inputs=("pretrain.model", "pii.documents"),
    **training_stage_hooks(BASE_STAGES, DATA_SUFFIXES),
    outputs=("adapter", "model"),
    # The eval batch only groups the held-out loss computation (the align stage hashes its own: there it
    # also sets how many completions an RL evaluation samples together).
    # launch: where the ranks run. Their number sets the global batch (train.batch_size is per rank), but it
    # is the machine's to decide (every visible GPU by default), like the cluster settings, which never count.
    unhashed=frozenset([*UNHASHED_TRAIN, "train.eval_batch_size", "sample_max_new_tokens", "dataset_num_proc",
                        "launch"]),
    resumable=True,
    description="LoRA / QLoRA / full supervised fine-tuning with TRL.",
)
