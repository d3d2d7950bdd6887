"""quantize: GPTQ weight-only quantization of the aligned model with gptqmodel, checked by perplexity.

What it does, in order:

1. Checks that the model's shapes fit the configured GPTQ groups and the 4-bit kernels before any
   heavy work: every linear layer that gets quantized (all but the LM head) must have an input
   width that is a multiple of ``group_size``, and input and output widths that are multiples of
   32 (int32 packing of the weights, and vLLM's CPU kernel). A misfit raises
   :class:`QuantizeShapeError` naming the layer, its sizes and group sizes that would fit. The
   model is built on the ``meta`` device for this (no weights are read).
2. Calibration: ``calibration.samples`` sequences of ``calibration.max_tokens`` tokens from the
   cleaned corpus (``pii.documents``), in the pretraining layout: documents tokenized with the
   model's own tokenizer, each followed by EOS, packed end to end (the GPTQ recipe's full-length
   windows; web documents are often shorter than one window). Shards are visited in an order
   seeded by ``calibration.seed`` and each shard's documents shuffled with it; reading stops once
   the samples are full, so the cost does not grow with the corpus. Rows without text are counted.
   With ``calibration.source: files`` the documents come from ``calibration.files`` instead (JSONL
   or Parquet, one document per record in a ``text`` field; paths or globs), packed the same way,
   each file standing for a shard: a fine-tuned base model quantizes without the data stages.
3. GPTQ with ``gptqmodel`` (``GPTQModel.load(dir, QuantizeConfig(...)).quantize(...)``, then
   ``.save``): bits, group size, symmetric or not, act-order (``desc_act``), gptqmodel's
   group-aware reordering and the Hessian dampening from the config. gptqmodel picks the device
   (CUDA when present, else CPU); it runs with the working directory ``<output>/gptq`` (it writes
   ``./logs/`` there) and ``GPTQMODEL_CPU_WORKERS`` from ``cpu_workers``. Its progress bars are
   switched to headless mode when stdout is not a terminal, so the stage log stays readable.
4. Output ``model``: the GPTQ checkpoint as gptqmodel writes it (``config.json`` with a
   ``quantization_config`` of ``quant_method: gptq``, safetensors with ``qweight/qzeros/scales/
   g_idx``), which vLLM loads directly and transformers loads through its gptqmodel integration,
   plus the input model's tokenizer files (chat template included) and ``generation_config.json``
   copied as they are. Written to a temporary dir and renamed into place.
5. Metrics: weight bytes on disk before and after and their ratio; perplexity on the held-out
   split (``tokenize.heldout``) of the input model and of the quantized one, with transformers,
   on the same windows: held-out documents, each followed by EOS as in pretraining, concatenated,
   cut to ``perplexity.max_tokens`` and split into ``perplexity.seq_len``-token windows. Both
   models run in the same dtype (``perplexity.dtype``; auto = float32 on CPU, which gptqmodel's
   CPU kernel accepts, bfloat16 on CUDA), so the delta measures the quantization alone. With
   ``perplexity.source: files`` the documents of ``perplexity.files`` are scored instead, in the
   order the patterns list them.

Inputs (:func:`needed_inputs`): ``pii.documents`` and ``tokenize.heldout`` only for the sources that
read them. Outside files are checked at plan time (:func:`input_problems`) and hashed into the
fingerprint (:func:`external_state`).

Restart-safe and resumable: GPTQ goes layer by layer, and gptqmodel checkpoints each finished
layer to ``<output>/gptq/checkpoint`` (``CheckpointConfig``; Llama-family models). A later attempt
of the same fingerprint resumes from the last finished layer (logged; the tests check that a
resumed run writes bit-identical weights), and an attempt that finds the finished ``model`` dir
only re-measures. A checkpoint gptqmodel refuses (say, an attempt on another machine: its
identity includes the device topology) is discarded with a warning and GPTQ starts over. The
checkpoint and gptqmodel's disk offload are deleted after success unless ``keep_checkpoint``.

Corrupt layer checkpoints: gptqmodel's store is content addressed (every file is named by the
sha256 of its bytes) and it re-hashes what it wrote at each layer's commit and again on load; it
keeps the two newest generations and resumes from the newest whole one. Before it runs, the stage
reads the same store (:func:`inspect_gptq_checkpoint`) to warn naming any damaged file; when no
whole generation is left, the checkpoint is set aside (``checkpoint.corrupt-<UTC time>``, renamed,
not deleted; removed with the checkpoint after success unless ``keep_checkpoint``) and GPTQ starts
over from the first layer. ``quantize/resumed_after_layers`` (0: from the start) and
``quantize/checkpoints_set_aside`` say which happened.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import Invalid, LlmpipeError, Stage, StageContext
from pipeline.files import atomic_path, set_aside
from pipeline.inputs import Problem
from stages.common.models import (
    base_model_hooks,
    check_model_spec,
    model_dir,
    parse_model,
)
from stages.common.shards import list_parquet
from stages.common.training import TrainingDataError, expand_files, file_suffix, jsonl_records, source_problems

BASE_STAGES = ("align", "sft", "pretrain")  # the stages base_model may name

MODEL = "model"
WORK = "gptq"  # gptqmodel's working dir in the output: logs/, checkpoint/, offload/
CHECKPOINT = "checkpoint"  # gptqmodel's layer checkpoint store, in WORK
GPTQ_STORE_VERSION = 1  # the format of gptqmodel's checkpoint store (looper/checkpoint_store.py) read here
INFO_FILE = "quantize_info.json"  # calibration and timing facts of the quantization, next to the model
# 4-bit weights are packed eight to an int32 along the input width (zeros along the output width),
# and vLLM's CPU kernel (cpu_gemm_wna16) wants both widths in multiples of 32.
KERNEL_MULTIPLE = 32
GPTQ_BITS = (2, 3, 4, 8)  # what gptqmodel's GPTQ format stores; vLLM's CPU kernel runs 4-bit
# Files of a model dir that make up its tokenizer (copied verbatim next to the quantized weights).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges*", "*.model",
                   "chat_template*")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Outside documents files (calibration.files, perplexity.files): one document per record, in a text field.
TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
SOURCE_INPUTS = {"corpus": "pii.documents", "heldout": "tokenize.heldout"}  # the pipeline input of each source


class QuantizeError(LlmpipeError):
    """The quantize stage cannot run on this input or config; the message names the key or file."""


class QuantizeShapeError(QuantizeError):
    """A layer's shape does not fit the GPTQ group size or the 4-bit kernels' multiples."""


class CalibrationError(QuantizeError):
    """The corpus yields no usable calibration sample."""


@dataclass(frozen=True, kw_only=True)
class CalibrationSettings:
    source: Literal["corpus", "files"]  # corpus: the cleaned documents (pii.documents) | files: the documents of files
    files: tuple[str, ...]  # source=files: JSONL (.jsonl, .jsonl.gz) or Parquet paths or globs, a text field per record
    samples: int  # calibration sequences (the GPTQ paper: 128 x 2048 tokens)
    max_tokens: int  # tokens per sequence: documents are packed EOS-separated into sequences this long
    seed: int  # seeds the order of shards and of documents within a shard
    batch_size: int  # samples per calibration forward pass (padded when > 1)

    def __post_init__(self) -> None:
        problems = source_problems(self.source, self.files, None)
        problems += [(name, f"must be at least 1, got {getattr(self, name)}")
                     for name in ("samples", "batch_size") if getattr(self, name) < 1]
        if self.max_tokens < 2:
            problems.append(("max_tokens", f"must be at least 2, got {self.max_tokens}"))
        Invalid.check(problems)


@dataclass(frozen=True, kw_only=True)
class PerplexitySettings:
    source: Literal["heldout", "files"]  # heldout: the held-out split (tokenize.heldout) | files: those of files
    files: tuple[str, ...]  # source=files: JSONL (.jsonl, .jsonl.gz) or Parquet paths or globs, a text field per record
    max_tokens: int  # held-out tokens to score (each model); 0: skip the perplexity comparison
    seq_len: int  # tokens per scored window; at most the model's context
    batch_size: int  # windows per forward pass (execution-only)
    dtype: Literal["auto", "float32", "bfloat16", "float16"]  # both models; auto: fp32 on CPU, bf16 on CUDA

    def __post_init__(self) -> None:
        problems = source_problems(self.source, self.files, None)
        if self.max_tokens < 0:
            problems.append(("max_tokens", f"must be >= 0 (0 skips perplexity), got {self.max_tokens}"))
        if self.seq_len < 2:
            problems.append(("seq_len", f"must be at least 2, got {self.seq_len}"))
        if self.batch_size < 1:
            problems.append(("batch_size", f"must be at least 1, got {self.batch_size}"))
        Invalid.check(problems)


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    base_model: str  # the model quantized: align, sft or pretrain (their output), a model dir, or org/name[@rev]
    bits: int  # weight bits (2, 3, 4 or 8; vLLM's CPU kernel runs 4)
    group_size: int  # input columns sharing one scale/zero; -1: one group per row
    sym: bool  # symmetric quantization (no zero point offset); vLLM's fast kernels want it
    desc_act: bool  # act-order: quantize columns by decreasing Hessian diagonal (slower kernels)
    act_group_aware: bool  # gptqmodel's group-aware reordering: better error, g_idx stays sequential
    damp_percent: float  # Hessian dampening, a fraction of its mean diagonal
    calibration: CalibrationSettings  # the calibration set
    perplexity: PerplexitySettings  # the before/after check
    cpu_workers: int | None  # GPTQMODEL_CPU_WORKERS; null: gptqmodel's default (execution-only)
    keep_checkpoint: bool  # keep gptqmodel's layer checkpoint after success (execution-only)

    def __post_init__(self) -> None:
        problems = check_model_spec(self.base_model, BASE_STAGES)
        if self.bits not in GPTQ_BITS:
            problems.append(("bits", f"must be one of {GPTQ_BITS}, got {self.bits}"))
        if self.group_size != -1 and self.group_size < 1:
            problems.append(("group_size", f"must be positive or -1 (one group per row), got {self.group_size}"))
        if not 0.0 < self.damp_percent < 1.0:
            problems.append(("damp_percent", f"must be in (0, 1), got {self.damp_percent}"))
        if self.desc_act and self.act_group_aware:
            problems.append(("", "desc_act and act_group_aware are both true: they are two column orders; "
                                 "set act_group_aware: false to use act-order"))
        if self.cpu_workers is not None and self.cpu_workers < 1:
            problems.append(("cpu_workers", f"must be at least 1 or null, got {self.cpu_workers}"))
        Invalid.check(problems)


# ---------------------------------------------------------------- shape check


def quantized_linears(model_dir: Path) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every linear layer GPTQ will quantize (all but the LM
    head), read from a ``meta``-device instance of the model's config: no weight is loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    return [(name, m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head]


def check_shapes(linears: Sequence[tuple[str, int, int]], group_size: int, model_dir: Path) -> None:
    """Raise QuantizeShapeError naming the first layer whose input width the groups do not divide,
    else the first whose widths are off the kernels' multiple."""
    for name, fan_in, fan_out in linears:
        if group_size > 0 and fan_in % group_size:
            fitting = [g for g in (32, 64, 128, 256) if all(i % g == 0 for _, i, _ in linears)]
            hint = f"group sizes that fit every layer: {fitting}" if fitting else "no power-of-two group size fits"
            raise QuantizeShapeError(
                f"stage.quantize.group_size={group_size} does not divide the input width of layer {name!r} "
                f"(in_features={fan_in}, out_features={fan_out}) of model {model_dir}: GPTQ groups are whole "
                f"runs of input columns; {hint}, or -1 for one group per row")
    for name, fan_in, fan_out in linears:
        for what, size in (("in_features", fan_in), ("out_features", fan_out)):
            if size % KERNEL_MULTIPLE:
                raise QuantizeShapeError(
                    f"layer {name!r} of model {model_dir} has {what}={size} (in_features={fan_in}, "
                    f"out_features={fan_out}), not a multiple of {KERNEL_MULTIPLE}: 4-bit GPTQ packing and "
                    f"vLLM's kernels need multiples of {KERNEL_MULTIPLE}; change the model shape")


# ---------------------------------------------------------------- text sources


def checks_perplexity(cfg: QuantizeConfig) -> bool:
    """Whether the perplexity check reads any text (``perplexity.max_tokens: 0`` skips it)."""
    return cfg.perplexity.max_tokens > 0


def needed_inputs(cfg: QuantizeConfig) -> tuple[str, ...]:
    """The pipeline's text inputs this config reads: ``pii.documents`` for calibration from the corpus,
    ``tokenize.heldout`` for a perplexity check on the held-out split. With ``source: files`` (or no
    perplexity check) neither is needed: a fine-tuned base model quantizes without the data stages.
    The model input is chosen from ``base_model`` elsewhere."""
    needed = []
    if cfg.calibration.source == "corpus":
        needed.append(SOURCE_INPUTS["corpus"])
    if cfg.perplexity.source == "heldout" and checks_perplexity(cfg):
        needed.append(SOURCE_INPUTS["heldout"])
    return tuple(needed)


def _files_blocks(cfg: QuantizeConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(key, patterns) of each block that reads outside files."""
    blocks = []
    if cfg.calibration.source == "files":
        blocks.append(("calibration.files", cfg.calibration.files))
    if cfg.perplexity.source == "files" and checks_perplexity(cfg):
        blocks.append(("perplexity.files", cfg.perplexity.files))
    return blocks


def external_state(cfg: QuantizeConfig) -> dict[str, str] | None:
    """The fingerprint's view of the outside text: ``{"<key>[<path>]": digest}`` for every file of
    ``calibration.files`` and ``perplexity.files`` (stages/common/inputs.py files_state), so editing a file
    re-runs quantize and ``llmpipe why`` names it. None when no block reads files."""
    from stages.common.inputs import files_state

    state: dict[str, str] = {}
    for key, patterns in _files_blocks(cfg):
        state.update(files_state(patterns, key))
    return state or None


def input_problems(cfg: QuantizeConfig) -> list[Problem]:
    """Plan-time check of ``calibration.files`` and ``perplexity.files`` (when read): every pattern matches,
    every file is JSONL (.jsonl, .jsonl.gz) or Parquet and starts like one."""
    from stages.common.inputs import data_file_problems

    return [(key, message) for key, patterns in _files_blocks(cfg)
            for _, message in data_file_problems(patterns, TEXT_SUFFIXES)]


def document_files(settings: CalibrationSettings | PerplexitySettings, key: str, ctx: StageContext) -> list[Path]:
    """The files a block reads documents from (absolute: gptqmodel runs in the work dir): its ``files``
    expanded, with source files (a pattern that matches nothing is a QuantizeError naming
    ``stage.quantize.<key>.files``), else the Parquet shards of its pipeline input."""
    if settings.source == "files":
        try:
            return [path.resolve() for path in expand_files(settings.files, f"stage.quantize.{key}.files")]
        except TrainingDataError as exc:
            raise QuantizeError(str(exc)) from exc
    return list_parquet(ctx.input(SOURCE_INPUTS[settings.source]).resolve())


def source_name(settings: CalibrationSettings | PerplexitySettings, key: str, ctx: StageContext) -> str:
    """Where a block's documents come from, for messages."""
    if settings.source == "files":
        return f"stage.quantize.{key}.files {list(settings.files)}"
    return str(ctx.input(SOURCE_INPUTS[settings.source]))


# ---------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """The calibration set handed to gptqmodel, and what was read to make it."""

    samples: list[dict[str, list[int]]] = field(default_factory=list)
    tokens: int = 0
    documents: int = 0
    skipped_empty: int = 0
    shards_read: int = 0

    def add(self, ids: list[int]) -> None:
        self.samples.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        self.tokens += len(ids)


def read_texts(shard: Path) -> list[Any]:
    """The ``text`` column of a documents shard or Parquet file, or the ``text`` field of each record of a
    JSONL file (.jsonl, .jsonl.gz; None for a record without one): values as stored, the caller skips
    non-strings. A line that is not a JSON object is a QuantizeError naming the file and line."""
    import pyarrow.parquet as pq

    suffix = file_suffix(shard)
    if suffix in (".jsonl", ".jsonl.gz"):
        texts = []
        for row, record in jsonl_records(shard):
            if not isinstance(record, dict):
                raise QuantizeError(f"{shard}, line {row + 1}: not a JSON object; documents files hold one "
                                    '{"text": ...} object a line')
            texts.append(record.get("text"))
        return texts
    if suffix != ".parquet":
        raise QuantizeError(f"{shard}: unsupported file type {suffix!r} (expected {', '.join(TEXT_SUFFIXES)})")
    pf = pq.ParquetFile(shard)
    if "text" not in pf.schema_arrow.names:
        raise QuantizeError(f"{shard}: no column 'text' (columns: {pf.schema_arrow.names})")
    return pf.read(columns=["text"]).column("text").to_pylist()


def build_calibration(shards: Sequence[Path], tokenizer: Any, cfg: CalibrationSettings) -> Calibration:
    """``cfg.samples`` sequences of ``cfg.max_tokens`` tokens packed from ``shards``, the same for
    the same seed and corpus.

    Shards are read in a seeded order, each one's documents in a seeded shuffle; each document is
    tokenized (the tokenizer's own special tokens, e.g. a Llama BOS, included) and followed by EOS.
    If the corpus runs out first, its last partial sequence is used too.
    """
    rng = random.Random(cfg.seed)
    order = list(shards)
    rng.shuffle(order)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    cal, buffer = Calibration(), []
    for shard in order:
        texts = []
        for text in read_texts(shard):
            if isinstance(text, str) and text.strip():
                texts.append(text)
            else:
                cal.skipped_empty += 1
        cal.shards_read += 1
        rng.shuffle(texts)
        for start in range(0, len(texts), 64):
            for ids in tokenizer(texts[start:start + 64])["input_ids"]:
                cal.documents += 1
                buffer.extend(ids)
                buffer.extend(eos)
                while len(buffer) >= cfg.max_tokens:
                    cal.add(buffer[:cfg.max_tokens])
                    buffer = buffer[cfg.max_tokens:]
                    if len(cal.samples) == cfg.samples:
                        return cal
    if len(buffer) >= 2:
        cal.add(buffer)
    return cal


# ---------------------------------------------------------------- GPTQ


@contextlib.contextmanager
def gptq_environment(work: Path, cpu_workers: int | None) -> Iterator[None]:
    """Run gptqmodel inside ``work`` (it writes ``./logs/``) with its CPU worker count, and its
    progress bars in headless mode when stdout is a file (logbar checks TERM, not isatty)."""
    env = {"GPTQMODEL_CPU_WORKERS": str(cpu_workers) if cpu_workers else None}
    if not sys.stdout.isatty():
        env["TERM"] = "dumb"
    saved = {k: os.environ.get(k) for k in env}
    previous_dir = os.getcwd()
    work.mkdir(parents=True, exist_ok=True)
    try:
        for k, v in env.items():
            if v is not None:
                os.environ[k] = v
        os.chdir(work)
        yield
    finally:
        os.chdir(previous_dir)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class GptqResume:
    """What an earlier attempt's layer checkpoint offers: the layer counts of its whole generations
    (newest first; gptqmodel resumes from the first), and what is wrong with the others."""

    whole: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    readable: bool = True  # False: a store format this check does not know; gptqmodel checks it alone


def inspect_gptq_checkpoint(checkpoint: Path) -> GptqResume:
    """Check gptqmodel's layer checkpoint in ``checkpoint`` as gptqmodel will, naming damaged files.

    ``CURRENT`` lists the published generations, newest first; each is a JSON object naming a
    continuation object and one object per quantized module; every object is
    ``objects/<sha256 of its bytes>``. A generation is whole when its own object and all it names
    are present with the bytes their names promise. Objects shared by generations are read once.
    """
    current = checkpoint / "CURRENT"
    if not current.exists():
        return GptqResume()
    objects, verdicts = checkpoint / "objects", {}

    def problem(digest: Any) -> str | None:
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            return f"{current}: names {digest!r}, not an object"
        if digest not in verdicts:
            path = objects / digest
            try:
                with open(path, "rb") as f:
                    ok = hashlib.file_digest(f, "sha256").hexdigest() == digest
                verdicts[digest] = None if ok else f"{path}: its sha256 differs from its name (the bytes changed)"
            except FileNotFoundError:
                verdicts[digest] = f"{path}: missing"
        return verdicts[digest]

    try:
        published = json.loads(current.read_bytes())
        if published["version"] != GPTQ_STORE_VERSION:
            return GptqResume(readable=False)
        refs = list(published["generations"])
    except (ValueError, KeyError, TypeError) as exc:
        return GptqResume(problems=[f"{current}: unreadable ({exc})"])
    result = GptqResume()
    for ref in refs:
        found = problem(ref)
        if found is None:
            try:
                generation = json.loads((objects / ref).read_bytes())
                names = [generation["continuation"], *generation["artifacts"].values()]
                cursor = int(generation["cursor"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                found = f"{objects / ref}: not a generation ({exc})"
            else:
                found = next((p for p in map(problem, names) if p is not None), None)
        if found is None:
            result.whole.append(cursor)
        else:
            result.problems.append(found)
    return result


def checkpoint_for_resume(checkpoint: Path, log: Any) -> tuple[int, int]:
    """Warn about damaged files in gptqmodel's layer checkpoint; set it aside when nothing whole is
    left in it. Returns (layers GPTQ resumes after, checkpoints set aside)."""
    found = inspect_gptq_checkpoint(checkpoint)
    for problem in found.problems:
        log.warning("GPTQ layer checkpoint: %s", problem)
    if found.problems and not found.whole:
        moved = set_aside(checkpoint)
        log.warning("no whole generation is left in the GPTQ layer checkpoint: set aside as %s; quantizing from "
                    "the first layer", moved)
        return 0, 1
    if found.whole:
        log.info("resuming GPTQ from the layer checkpoint of an earlier attempt in %s (%d layers done%s)", checkpoint,
                 found.whole[0], ", an older generation: the newest is damaged" if found.problems else "")
        return found.whole[0], 0
    if not found.readable:
        log.info("resuming GPTQ from the layer checkpoint of an earlier attempt in %s (gptqmodel checks it)",
                 checkpoint)
    return 0, 0


def gptq_config(cfg: QuantizeConfig, offload: Path) -> Any:
    from gptqmodel import QuantizeConfig as GptqConfig

    return GptqConfig(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, desc_act=cfg.desc_act,
                      act_group_aware=cfg.act_group_aware, damp_percent=cfg.damp_percent,
                      offload_to_disk=True, offload_to_disk_path=str(offload))


def run_gptq(src: Path, dest: Path, cal: Calibration, cfg: QuantizeConfig, work: Path, log: Any) -> dict[str, float]:
    """Quantize ``src`` into ``dest`` with gptqmodel, resuming from a layer checkpoint in ``work``
    when an earlier attempt left a whole one; return the seconds spent and how it resumed."""
    started = time.time()
    with gptq_environment(work, cfg.cpu_workers):
        from gptqmodel import CheckpointConfig, GPTQModel
        from gptqmodel.looper.checkpoint_store import CheckpointCorrupt, CheckpointError

        checkpoint = work / CHECKPOINT
        resumed_after, set_aside_count = checkpoint_for_resume(checkpoint, log)
        model = GPTQModel.load(str(src), gptq_config(cfg, work / "offload"))
        # gptqmodel would drop samples of <= calibration_data_min_length tokens: ours are all wanted
        args = {"batch_size": cfg.calibration.batch_size, "calibration_data_min_length": 1}
        try:
            model.quantize(cal.samples, checkpoint=CheckpointConfig(path=str(checkpoint)), **args)
        except NotImplementedError as exc:  # raised before any work: no checkpoint support for this model
            log.warning("gptqmodel cannot checkpoint this model (%s): a restarted attempt starts GPTQ over", exc)
            model.quantize(cal.samples, **args)
        except CheckpointError as exc:  # raised before any work: the checkpoint is damaged, or not this run's
            if isinstance(exc, CheckpointCorrupt):  # damaged since inspect_gptq_checkpoint read it
                moved = set_aside(checkpoint)
                set_aside_count += 1
                log.warning("gptqmodel found the GPTQ checkpoint damaged (%s): set aside as %s; quantizing from the "
                            "first layer", exc, moved)
            else:
                log.warning("discarding the GPTQ checkpoint in %s (%s); quantizing from the first layer", checkpoint,
                            exc)
                shutil.rmtree(checkpoint, ignore_errors=True)
            resumed_after = 0
            model = GPTQModel.load(str(src), gptq_config(cfg, work / "offload"))
            model.quantize(cal.samples, checkpoint=CheckpointConfig(path=str(checkpoint)), **args)
        shutil.rmtree(dest, ignore_errors=True)
        scratch = model.quantize_config.offload_to_disk_path
        model.save(str(dest))
        if scratch:
            name_scratch_as_configured(dest, str(scratch), str(work / "offload"))
        del model
        gc.collect()
    return {"quantize/seconds": time.time() - started, "quantize/resumed_after_layers": float(resumed_after),
            "quantize/checkpoints_set_aside": float(set_aside_count)}


def name_scratch_as_configured(dest: Path, scratch: str, configured: str) -> None:
    """A checkpointed quantize offloads to a random per-attempt scratch folder, and save() records that
    folder in config.json and quantize_config.json (save still reads from it, so it cannot be reset
    before). Write the configured folder there instead, so every attempt of a fingerprint writes the
    same bytes."""
    if scratch == configured:
        return
    old, new = json.dumps(scratch)[1:-1], json.dumps(configured)[1:-1]
    for name in ("config.json", "quantize_config.json"):
        path = dest / name
        if path.is_file() and old in (text := path.read_text()):
            path.write_text(text.replace(old, new))


def copy_tokenizer(src: Path, dest: Path) -> list[str]:
    """Copy the tokenizer files and generation config of ``src`` into ``dest`` (over what gptqmodel
    wrote), so the quantized model tokenizes, chats and stops exactly like its source."""
    copied = []
    for pattern in (*TOKENIZER_FILES, "generation_config.json"):
        for path in sorted(src.glob(pattern)):
            if path.is_file():
                shutil.copy2(path, dest / path.name)
                copied.append(path.name)
    return sorted(set(copied))


def check_output(src: Path, dest: Path, cfg: QuantizeConfig) -> None:
    """Fail unless ``dest`` declares the GPTQ quantization asked for and keeps the source's chat template."""
    from transformers import AutoTokenizer

    qc = json.loads((dest / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "gptq" or qc.get("bits") != cfg.bits or qc.get("group_size") != cfg.group_size:
        raise QuantizeError(f"{dest / 'config.json'}: quantization_config {qc} does not record GPTQ with "
                            f"bits={cfg.bits}, group_size={cfg.group_size}")
    if AutoTokenizer.from_pretrained(src).chat_template != AutoTokenizer.from_pretrained(dest).chat_template:
        raise QuantizeError(f"the tokenizer in {dest} lost the chat template of {src}")


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the weight files of a model dir (safetensors/bin shards; not tokenizer or configs)."""
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


# ---------------------------------------------------------------- perplexity


def heldout_windows(shards: Sequence[Path], tokenizer: Any, max_tokens: int, seq_len: int) -> list[list[int]]:
    """The scored token windows: held-out documents in shard order, each followed by EOS (the
    pretraining layout), concatenated, cut to ``max_tokens`` and split into ``seq_len`` windows
    (a last window shorter than 2 tokens predicts nothing and is dropped)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for shard in shards:
        texts = [t for t in read_texts(shard) if isinstance(t, str) and t]
        for start in range(0, len(texts), 256):
            for doc in tokenizer(texts[start:start + 256], add_special_tokens=False)["input_ids"]:
                ids.extend(doc)
                ids.extend(eos)
            if len(ids) >= max_tokens:
                break
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    return [w for w in windows if len(w) >= 2]


def perplexity(model: Any, windows: Sequence[list[int]], batch_size: int) -> float:
    """exp(mean next-token negative log-likelihood) of ``model`` over ``windows`` (no window sees another)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    by_length: dict[int, list[list[int]]] = {}
    for w in windows:
        by_length.setdefault(len(w), []).append(w)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                x = torch.tensor(group[start:start + batch_size], device=device)
                logits = model(input_ids=x).logits[:, :-1].float()
                nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                       reduction="sum").item()
                count += x[:, 1:].numel()
    return math.exp(nll / count)


def eval_dtype(name: str, cuda: bool) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if cuda else torch.float32
    return getattr(torch, name)


def model_perplexity(model_dir: Path, windows: Sequence[list[int]], settings: PerplexitySettings) -> float:
    """Load ``model_dir`` with transformers (a GPTQ dir goes through its gptqmodel integration) and score it."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=eval_dtype(settings.dtype, cuda),
                                                 device_map="cuda" if cuda else "cpu")
    model.eval()
    try:
        return perplexity(model, windows, settings.batch_size)
    finally:
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def compare_perplexity(src: Path, dest: Path, heldout: Sequence[Path], tokenizer: Any, settings: PerplexitySettings,
                       work: Path, log: Any) -> dict[str, float]:
    """Perplexity of the source and the quantized model on the same held-out windows, and the delta.
    ``heldout``: the documents files scored, in order (the held-out shards, or ``perplexity.files``)."""
    if settings.max_tokens == 0:
        log.info("perplexity.max_tokens is 0: skipping the perplexity comparison")
        return {}
    windows = heldout_windows(heldout, tokenizer, settings.max_tokens, settings.seq_len)
    if not windows:
        where = f"perplexity.files {list(settings.files)}" if settings.source == "files" else "the held-out split"
        log.warning("%s: no tokens in %d file(s): no perplexity comparison", where, len(heldout))
        return {}
    started = time.time()
    fp = model_perplexity(src, windows, settings)
    # gptqmodel's kernels write ./logs/ and offload dirs on load too: keep them in the work dir.
    with gptq_environment(work, None):
        quantized = model_perplexity(dest, windows, settings)
    tokens = sum(len(w) - 1 for w in windows)
    log.info("held-out perplexity over %d tokens: %.3f before, %.3f after quantization (%+.2f%%)",
             tokens, fp, quantized, 100 * (quantized / fp - 1))
    return {"perplexity/fp": fp, "perplexity/quantized": quantized, "perplexity/delta": quantized - fp,
            "perplexity/delta_pct": 100.0 * (quantized / fp - 1.0), "perplexity/tokens": float(tokens),
            "perplexity/seconds": time.time() - started}


# ---------------------------------------------------------------- the stage


def check_input(src: Path, cfg: QuantizeConfig) -> dict[str, Any]:
    """The source model's config.json, after checking it is an unquantized model dir that fits ``cfg``."""
    config_file = src / "config.json"
    if not config_file.is_file():
        raise QuantizeError(f"base model {src} has no config.json: not a Hugging Face model dir")
    config = json.loads(config_file.read_text())
    if not weight_bytes(src):
        raise QuantizeError(f"base model {src} has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    if config.get("quantization_config"):
        raise QuantizeError(f"input model {src} is already quantized ({config['quantization_config']}); "
                            f"GPTQ needs the full-precision model")
    context = config.get("max_position_embeddings")
    if context:
        for key, value in (("calibration.max_tokens", cfg.calibration.max_tokens),
                           ("perplexity.seq_len", cfg.perplexity.seq_len)):
            if value > context:
                raise QuantizeError(f"stage.quantize.{key}={value} is longer than the context of model {src} "
                                    f"(max_position_embeddings={context})")
    return config


def quantize_model(cfg: QuantizeConfig, ctx: StageContext, src: Path, dest: Path, work: Path,
                   tokenizer: Any) -> dict[str, Any]:
    """Calibrate, run GPTQ and write the finished ``dest`` atomically; return the facts for metrics."""
    cal = build_calibration(document_files(cfg.calibration, "calibration", ctx), tokenizer, cfg.calibration)
    unit = "files" if cfg.calibration.source == "files" else "shards"
    if not cal.samples:
        raise CalibrationError(f"no calibration text in {source_name(cfg.calibration, 'calibration', ctx)} "
                               f"({cal.shards_read} {unit}, {cal.skipped_empty} rows without text)")
    if len(cal.samples) < cfg.calibration.samples:
        ctx.log.warning("the corpus fills only %d of %d calibration samples of %d tokens", len(cal.samples),
                        cfg.calibration.samples, cfg.calibration.max_tokens)
    ctx.log.info("calibrating on %d samples, %d tokens from %d documents in %d %s (%d rows without text)",
                 len(cal.samples), cal.tokens, cal.documents, cal.shards_read, unit, cal.skipped_empty)
    with atomic_path(dest) as tmp:  # replaces the dest of an attempt that died before its info file
        gptq = run_gptq(src, tmp, cal, cfg, work, ctx.log)
        copy_tokenizer(src, tmp)
        check_output(src, tmp, cfg)
    info = {"calibration/samples": len(cal.samples), "calibration/tokens": cal.tokens,
            "calibration/documents": cal.documents, "calibration/skipped_empty": cal.skipped_empty,
            "calibration/shards_read": cal.shards_read, **gptq}
    (ctx.output_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    ctx.log.info("GPTQ %d-bit, group %d: %.1f s; model written to %s", cfg.bits, cfg.group_size,
                 gptq["quantize/seconds"], dest)
    return info


def run(cfg: QuantizeConfig, ctx: StageContext) -> dict[str, float]:
    from transformers import AutoTokenizer

    src = model_dir(parse_model(cfg.base_model, BASE_STAGES), ctx).resolve()
    heldout = document_files(cfg.perplexity, "perplexity", ctx) if checks_perplexity(cfg) else []
    out_dir = ctx.output_dir.resolve()
    dest, work = out_dir / MODEL, out_dir / WORK
    check_input(src, cfg)
    check_shapes(quantized_linears(src), cfg.group_size, src)
    tokenizer = AutoTokenizer.from_pretrained(src)

    if (dest / "config.json").is_file() and (out_dir / INFO_FILE).is_file():
        ctx.log.info("the quantized model of an earlier attempt is complete in %s: only measuring", dest)
        info = json.loads((out_dir / INFO_FILE).read_text())
    else:
        info = quantize_model(cfg, ctx, src, dest, work, tokenizer)
    ctx.log_artifact(out_dir / INFO_FILE)

    fp_bytes, q_bytes = weight_bytes(src), weight_bytes(dest)
    metrics = {**{k: float(v) for k, v in info.items()}, "size/fp_bytes": float(fp_bytes),
               "size/quantized_bytes": float(q_bytes), "size/ratio": q_bytes / fp_bytes}
    ctx.log.info("weights on disk: %d bytes -> %d bytes (ratio %.3f)", fp_bytes, q_bytes, metrics["size/ratio"])
    metrics.update(compare_perplexity(src, dest, heldout, tokenizer, cfg.perplexity, work, ctx.log))
    ctx.log_metrics(metrics)
    if not cfg.keep_checkpoint:  # set-aside checkpoints go too: the warning in the stage log is their record
        for path in (work / CHECKPOINT, work / "offload", *work.glob(f"{CHECKPOINT}.corrupt-*")):
            shutil.rmtree(path, ignore_errors=True)
    return metrics


STAGE = Stage(
    name="quantize",
    config=QuantizeConfig,
    run=run,
    inputs=("align.model", "sft.model", "pretrain.model", "pii.documents", "tokenize.heldout"),
    **base_model_hooks(BASE_STAGES, inputs=needed_inputs, external=external_state, preflight=input_problems),
    outputs=(MODEL,),
    unhashed=frozenset(["cpu_workers", "keep_checkpoint", "perplexity.batch_size"]),
    resumable=True,
    description="GPTQ weight-only quantization (gptqmodel) with a held-out perplexity check.",
)
