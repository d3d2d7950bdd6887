"""quantize's configuration, errors and what its format writers share (the GPTQ calibration set, gptqmodel's
run environment): in a module of its own so that the writers (stage.py's GPTQ, gguf.py, awq.py) import it
rather than the stage module that imports them."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline import Invalid, LlmpipeError
from stages.common.models import check_model_spec
from stages.common.quantized import FORMATS
from stages.common.training import source_problems

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
# llama.cpp's quantization types offered for stage.quantize.gguf.type (llama-quantize's names; each is a
# LLAMA_FTYPE_MOSTLY_<name> of llama-cpp-python, which a test checks). Left out: the IQ1/IQ2/IQ3 types, which
# need an importance matrix (llama-imatrix), and the ternary TQ types, made for ternary-trained models only.
GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S",
              "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS", "F16", "BF16")
AWQ_BITS = (4,)  # what gptqmodel's AWQ (GEMM) checkpoints store


class QuantizeError(LlmpipeError):
    """The quantize stage cannot run on this input or config; the message names the key or file."""


class QuantizeShapeError(QuantizeError):
    """A layer's shape does not fit the GPTQ group size or the 4-bit kernels' multiples."""


class CalibrationError(QuantizeError):
    """The corpus yields no usable calibration sample."""


class QuantizeFormatError(QuantizeError, Invalid):
    """``stage.quantize.formats`` is empty or lists an unknown or repeated format. Raised by the config's
    own check, so a composed config reports it as a ConfigError naming ``stage.quantize.formats``, before
    anything runs; a config built in code (``dataclasses.replace``) raises it as it is."""

    def __str__(self) -> str:
        return "; ".join(f"stage.quantize.{key}: {message}" if key else f"stage.quantize: {message}"
                         for key, message in self.problems)


class QuantizePerplexityError(QuantizeError):
    """A format's held-out perplexity is above ``perplexity.max_ratio`` times the full-precision model's."""


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
    max_ratio: float  # each format's perplexity / the fp model's must stay <= this, else the stage fails

    def __post_init__(self) -> None:
        problems = source_problems(self.source, self.files, None)
        if self.max_tokens < 0:
            problems.append(("max_tokens", f"must be >= 0 (0 skips perplexity), got {self.max_tokens}"))
        if not self.max_ratio >= 1.0:
            problems.append(("max_ratio", f"must be at least 1.0 (a quantized model's perplexity / the fp "
                                          f"model's), got {self.max_ratio}"))
        if self.seq_len < 2:
            problems.append(("seq_len", f"must be at least 2, got {self.seq_len}"))
        if self.batch_size < 1:
            problems.append(("batch_size", f"must be at least 1, got {self.batch_size}"))
        Invalid.check(problems)


@dataclass(frozen=True, kw_only=True)
class GgufSettings:
    type: str  # llama.cpp's quantization type (llama-quantize's names): Q4_K_M, Q5_K_M, Q8_0, ...
    outtype: Literal["f32", "f16", "bf16"]  # what convert_hf_to_gguf.py writes, which llama.cpp then quantizes
    threads: int | None  # llama.cpp's threads (quantize, perplexity); null: its default (execution-only)

    def __post_init__(self) -> None:
        problems = []
        if self.type not in GGUF_TYPES:
            close = [t for t in GGUF_TYPES if t.lower() == self.type.lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(("type", f"{self.type!r} is not a llama.cpp quantization type offered here{hint}; "
                                     f"choose from {', '.join(GGUF_TYPES)}"))
        if self.threads is not None and self.threads < 1:
            problems.append(("threads", f"must be at least 1 or null, got {self.threads}"))
        Invalid.check(problems)


@dataclass(frozen=True, kw_only=True)
class AwqSettings:
    bits: int  # weight bits (gptqmodel's AWQ GEMM format: 4)
    group_size: int  # input columns sharing one scale/zero; must divide every quantized layer's input width
    sym: bool  # symmetric (no zero point); AWQ's usual recipe is false (zero_point: true)

    def __post_init__(self) -> None:
        problems = []
        if self.bits not in AWQ_BITS:
            problems.append(("bits", f"must be one of {AWQ_BITS}, got {self.bits}"))
        if self.group_size < 1:
            problems.append(("group_size", f"must be positive, got {self.group_size}"))
        Invalid.check(problems)


def format_problems(formats: Sequence[str]) -> list[tuple[str, str]]:
    """What is wrong with ``stage.quantize.formats``: empty, or an unknown or repeated entry."""
    if not formats:
        return [("formats", f"is empty: list at least one of {', '.join(FORMATS)} (the first is the "
                            f"primary, written as the `model` output)")]
    problems = [("formats", f"{name!r} is not a quantized format; choose from {', '.join(FORMATS)}")
                for name in formats if name not in FORMATS]
    repeated = sorted({name for name in formats if formats.count(name) > 1})
    if repeated:
        problems.append(("formats", f"lists {', '.join(map(repr, repeated))} more than once: {list(formats)}"))
    return problems


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    base_model: str  # the model quantized: align, sft or pretrain (their output), a model dir, or org/name[@rev]
    formats: tuple[str, ...]  # gptq, gguf, awq: each one written; the first is the primary (the `model` output)
    bits: int  # weight bits (2, 3, 4 or 8; vLLM's CPU kernel runs 4)
    group_size: int  # input columns sharing one scale/zero; -1: one group per row
    sym: bool  # symmetric quantization (no zero point offset); vLLM's fast kernels want it
    desc_act: bool  # act-order: quantize columns by decreasing Hessian diagonal (slower kernels)
    act_group_aware: bool  # gptqmodel's group-aware reordering: better error, g_idx stays sequential
    damp_percent: float  # Hessian dampening, a fraction of its mean diagonal
    calibration: CalibrationSettings  # the calibration set
    perplexity: PerplexitySettings  # the before/after check
    gguf: GgufSettings  # formats: gguf (llama.cpp's converter and quantizer)
    awq: AwqSettings  # formats: awq (gptqmodel's AWQ, calibrated on the `calibration` set)
    cpu_workers: int | None  # GPTQMODEL_CPU_WORKERS; null: gptqmodel's default (execution-only)
    keep_checkpoint: bool  # keep gptqmodel's layer checkpoint (and the unquantized GGUF) after success (exec.-only)

    def __post_init__(self) -> None:
        wrong_formats = format_problems(self.formats)
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
        if wrong_formats:
            raise QuantizeFormatError(problems=[*wrong_formats, *problems])
        Invalid.check(problems)


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
