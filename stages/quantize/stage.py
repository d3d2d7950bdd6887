"""quantize: weight-only quantization of the aligned model in several formats, checked by perplexity.

``formats`` lists what is written, in order: ``gptq`` (gptqmodel, below), ``gguf`` (llama.cpp's own
converter and quantizer: gguf.py) and ``awq`` (gptqmodel's AWQ: awq.py). The first is the primary and is
written into the ``model`` output (a model dir for gptq/awq, ``model/model-<type>.gguf`` for gguf), so
``base_model: quantize`` downstream means it; the others go under ``formats/<format>/``. The ``formats``
output holds ``manifest.json``: one entry per format, in order, with its path (relative to the output
dir), bytes, held-out perplexity and its ratio to the fp model's, and format facts; serve and evaluate
read it with stages/common/quantized.py. An unknown or repeated entry, or an empty list, is a
:class:`QuantizeFormatError` at config time. Every format's perplexity must stay within
``perplexity.max_ratio`` of the fp model's (:class:`QuantizePerplexityError` names those that do not,
after all are written and measured). Metrics: ``<format>.bytes``, ``<format>.perplexity``,
``<format>.perplexity_ratio``, and GPTQ's figures under their names from before (``size/*``,
``perplexity/*``, ``calibration/*``, ``quantize/*``). GPTQ and AWQ share the calibration set, all
formats the held-out windows and the fp model's perplexity (each measured once).

What GPTQ does, in order:

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

Restart-safe and resumable: each format is written atomically and, with its info file (times,
calibration facts), marks it done: a later attempt of the same fingerprint only measures it. GGUF's
unquantized intermediate (``llama.cpp/model-<outtype>.gguf``) is reused too (and deleted after success
unless ``keep_checkpoint``). GPTQ goes layer by layer, and gptqmodel checkpoints each finished layer to
``<output>/gptq/checkpoint`` (``CheckpointConfig``; Llama-family models). A later attempt
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

import functools
import gc
import hashlib
import json
import math
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import Stage, StageContext
from pipeline.files import atomic_path, set_aside, write_json_atomic
from pipeline.inputs import Problem
from stages.common.models import (
    base_model_hooks,
    model_dir,
    parse_model,
)
from stages.common.quantized import FORMATS_DIR, MANIFEST
from stages.common.shards import list_parquet
from stages.common.training import TrainingDataError, expand_files, file_suffix, jsonl_records
from stages.quantize.config import (  # noqa: F401 - names tests and the writers import from here too
    AWQ_BITS,
    BASE_STAGES,
    CHECKPOINT,
    GGUF_TYPES,
    GPTQ_BITS,
    GPTQ_STORE_VERSION,
    INFO_FILE,
    KERNEL_MULTIPLE,
    MODEL,
    SOURCE_INPUTS,
    TEXT_SUFFIXES,
    TOKENIZER_FILES,
    WEIGHT_SUFFIXES,
    WORK,
    AwqSettings,
    Calibration,
    CalibrationError,
    CalibrationSettings,
    GgufSettings,
    PerplexitySettings,
    QuantizeConfig,
    QuantizeError,
    QuantizeFormatError,
    QuantizePerplexityError,
    QuantizeShapeError,
    format_problems,
    gptq_environment,
)

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


def check_shapes(linears: Sequence[tuple[str, int, int]], group_size: int, model_dir: Path,
                 key: str = "group_size") -> None:
    """Raise QuantizeShapeError naming the first layer whose input width the groups do not divide,
    else the first whose widths are off the kernels' multiple. ``key``: the group size's config key."""
    for name, fan_in, fan_out in linears:
        if group_size > 0 and fan_in % group_size:
            fitting = [g for g in (32, 64, 128, 256) if all(i % g == 0 for _, i, _ in linears)]
            hint = f"group sizes that fit every layer: {fitting}" if fitting else "no power-of-two group size fits"
            raise QuantizeShapeError(
                f"stage.quantize.{key}={group_size} does not divide the input width of layer {name!r} "
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
    every file is JSONL (.jsonl, .jsonl.gz) or Parquet and starts like one; and, when ``formats`` lists gguf,
    that llama.cpp's converter and llama-cpp-python are installed."""
    from stages.common.inputs import data_file_problems

    problems = [(key, message) for key, patterns in _files_blocks(cfg)
                for _, message in data_file_problems(patterns, TEXT_SUFFIXES)]
    if "gguf" in cfg.formats:
        from stages.quantize.gguf import missing_parts

        if (missing := missing_parts()) is not None:
            problems.append(("formats", f"lists gguf: {missing}"))
    return problems


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


class PerplexityCheck:
    """The held-out perplexity of the source model and of each format, on the same windows (built once,
    on first use, as is the fp model's figure), held to ``perplexity.max_ratio``.
    ``heldout``: the documents files scored, in order (the held-out shards, or ``perplexity.files``)."""

    def __init__(self, src: Path, heldout: Sequence[Path], tokenizer: Any, settings: PerplexitySettings,
                 log: Any) -> None:
        self.src, self.heldout, self.tokenizer, self.settings, self.log = src, heldout, tokenizer, settings, log
        self._windows: list[list[int]] | None = None
        self._fp: float | None = None
        self.too_high: list[str] = []  # the formats over the bound, as messages

    @property
    def windows(self) -> list[list[int]]:
        if self._windows is None:
            s = self.settings
            self._windows = heldout_windows(self.heldout, self.tokenizer, s.max_tokens, s.seq_len) \
                if s.max_tokens else []
            if s.max_tokens == 0:
                self.log.info("perplexity.max_tokens is 0: skipping the perplexity comparison")
            elif not self._windows:
                where = f"perplexity.files {list(s.files)}" if s.source == "files" else "the held-out split"
                self.log.warning("%s: no tokens in %d file(s): no perplexity comparison", where, len(self.heldout))
        return self._windows

    @property
    def tokens(self) -> int:
        return sum(len(w) - 1 for w in self.windows)

    def fp(self) -> float:
        if self._fp is None:
            self._fp = model_perplexity(self.src, self.windows, self.settings)
        return self._fp

    def measure(self, fmt: str, score: Any) -> dict[str, float]:
        """``score(windows)``: the format's perplexity. Returns its metrics (none without windows) and
        records a figure over the bound."""
        if not self.windows:
            return {}
        started = time.time()
        fp, quantized = self.fp(), score(self.windows)
        ratio = quantized / fp
        self.log.info("%s: held-out perplexity over %d tokens: %.3f before, %.3f after quantization (%+.2f%%)",
                      fmt, self.tokens, fp, quantized, 100 * (ratio - 1))
        if not ratio <= self.settings.max_ratio:  # a NaN fails too
            self.too_high.append(f"{fmt}: {quantized:.4g} vs {fp:.4g} for the fp model (ratio {ratio:.3f})")
        return {f"{fmt}.perplexity": quantized, f"{fmt}.perplexity_ratio": ratio, "perplexity/fp": fp,
                f"{fmt}.perplexity_seconds": time.time() - started}

    def check(self) -> None:
        """QuantizePerplexityError naming every format over ``perplexity.max_ratio``."""
        if self.too_high:
            raise QuantizePerplexityError(
                f"held-out perplexity above stage.quantize.perplexity.max_ratio={self.settings.max_ratio} x the fp "
                f"model's: {'; '.join(self.too_high)}")


def gptq_perplexity_metrics(found: dict[str, float], tokens: int) -> dict[str, float]:
    """The GPTQ figures under their names from before there were formats (perplexity/quantized, ...)."""
    if "gptq.perplexity" not in found:
        return {}
    fp, quantized = found["perplexity/fp"], found["gptq.perplexity"]
    return {"perplexity/quantized": quantized, "perplexity/delta": quantized - fp,
            "perplexity/delta_pct": 100.0 * (quantized / fp - 1.0), "perplexity/tokens": float(tokens),
            "perplexity/seconds": found["gptq.perplexity_seconds"]}


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


def calibration_set(cfg: QuantizeConfig, ctx: StageContext, tokenizer: Any) -> Calibration:
    """The calibration samples (GPTQ and AWQ share them), after checking there are some."""
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
    return cal


def calibration_info(cal: Calibration) -> dict[str, Any]:
    return {"calibration/samples": len(cal.samples), "calibration/tokens": cal.tokens,
            "calibration/documents": cal.documents, "calibration/skipped_empty": cal.skipped_empty,
            "calibration/shards_read": cal.shards_read}


def quantize_model(cfg: QuantizeConfig, ctx: StageContext, src: Path, dest: Path, work: Path,
                   cal: Calibration) -> dict[str, Any]:
    """Run GPTQ and write the finished ``dest`` atomically; return the facts for metrics."""
    with atomic_path(dest) as tmp:  # replaces the dest of an attempt that died before its info file
        gptq = run_gptq(src, tmp, cal, cfg, work, ctx.log)
        copy_tokenizer(src, tmp)
        check_output(src, tmp, cfg)
    info = {**calibration_info(cal), **gptq}
    (ctx.output_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    ctx.log.info("GPTQ %d-bit, group %d: %.1f s; model written to %s", cfg.bits, cfg.group_size,
                 gptq["quantize/seconds"], dest)
    return info


@dataclass
class Job:
    """What every format's writer gets: the source, the shared calibration and perplexity check, the
    output dir, and where the format goes (``home``: ``model/`` for the primary, else ``formats/<format>``)."""

    cfg: QuantizeConfig
    ctx: StageContext
    src: Path
    out_dir: Path
    home: Path
    check: PerplexityCheck
    calibrate: Callable[[], Calibration]  # the shared calibration set, built on first use

    @property
    def calibration(self) -> Calibration:
        return self.calibrate()

    def info_file(self, fmt: str) -> Path:
        """The facts of a finished format (times, calibration), kept for a resumed attempt."""
        return self.out_dir / INFO_FILE if fmt == "gptq" else self.out_dir / FORMATS_DIR / f"{fmt}_{INFO_FILE}"

    def finished(self, fmt: str, marker: Path) -> dict[str, Any] | None:
        """The info of a format an earlier attempt finished (``marker`` and its info file are there)."""
        info = self.info_file(fmt)
        if marker.exists() and info.is_file():
            self.ctx.log.info("%s: the model of an earlier attempt is complete in %s: only measuring", fmt, marker)
            return json.loads(info.read_text())
        return None

    def save_info(self, fmt: str, info: dict[str, Any]) -> None:
        path = self.info_file(fmt)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2) + "\n")


def write_gptq(job: Job) -> tuple[dict[str, Any], dict[str, float]]:
    """GPTQ with gptqmodel into ``job.home``: (manifest entry, metrics)."""
    cfg, dest = job.cfg, job.home
    work = job.out_dir / WORK
    info = job.finished("gptq", dest / "config.json")
    if info is None:
        info = quantize_model(cfg, job.ctx, job.src, dest, work, job.calibration)
    job.ctx.log_artifact(job.info_file("gptq"))
    fp_bytes, q_bytes = weight_bytes(job.src), weight_bytes(dest)
    metrics = {**{k: float(v) for k, v in info.items()}, "size/quantized_bytes": float(q_bytes),
               "size/ratio": q_bytes / fp_bytes, "gptq.bytes": float(q_bytes)}
    job.ctx.log.info("weights on disk: %d bytes -> %d bytes (ratio %.3f)", fp_bytes, q_bytes, metrics["size/ratio"])

    def score(windows: Sequence[list[int]]) -> float:
        # gptqmodel's kernels write ./logs/ and offload dirs on load too: keep them in the work dir.
        with gptq_environment(work, None):
            return model_perplexity(dest, windows, cfg.perplexity)

    metrics.update(job.check.measure("gptq", score))
    metrics.update(gptq_perplexity_metrics(metrics, job.check.tokens if job.check.windows else 0))
    entry = {"bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym, "tokenizer": str(dest)}
    return entry, metrics


def write_gguf(job: Job) -> tuple[dict[str, Any], dict[str, float]]:
    """GGUF by llama.cpp into ``job.home``: the quantized file and the tokenizer files beside it."""
    from stages.quantize import gguf

    settings, log = job.cfg.gguf, job.ctx.log
    work = job.out_dir / "llama.cpp"  # the unquantized GGUF and llama.cpp's log
    final = job.home / f"model-{settings.type}.gguf"
    info = job.finished("gguf", final)
    if info is None:
        unquantized = work / f"model-{settings.outtype}.gguf"
        started = time.time()
        if unquantized.is_file():  # written atomically: whole
            log.info("gguf: reusing the unquantized GGUF of an earlier attempt: %s", unquantized)
        else:
            gguf.convert(job.src, unquantized, settings.outtype, work)
        converted = time.time()
        gguf.quantize(unquantized, final, settings.type, settings.threads, work)
        copy_tokenizer(job.src, job.home)
        info = {"gguf/convert_seconds": converted - started, "gguf/quantize_seconds": time.time() - converted,
                "gguf/unquantized_bytes": unquantized.stat().st_size}
        job.save_info("gguf", info)
        log.info("GGUF %s: converted in %.1f s, quantized in %.1f s; written to %s", settings.type,
                 info["gguf/convert_seconds"], info["gguf/quantize_seconds"], final)
    size = final.stat().st_size
    metrics = {**{k: float(v) for k, v in info.items()}, "gguf.bytes": float(size)}
    metrics.update(job.check.measure("gguf", lambda windows: gguf.gguf_perplexity(final, windows, settings.threads)))
    entry = {"path": str(final), "quant_type": settings.type, "outtype": settings.outtype,
             "tokenizer": str(job.home)}
    return entry, metrics


def write_awq(job: Job) -> tuple[dict[str, Any], dict[str, float]]:
    """AWQ with gptqmodel into ``job.home`` (a model dir, as GPTQ's)."""
    from stages.quantize import awq

    cfg, dest = job.cfg, job.home
    work = job.out_dir / WORK
    info = job.finished("awq", dest / "config.json")
    if info is None:
        with atomic_path(dest) as tmp:
            seconds = awq.run_awq(job.src, tmp, job.calibration, cfg, work)
            copy_tokenizer(job.src, tmp)
            awq.check_output(tmp, cfg.awq)
        info = {**calibration_info(job.calibration), "awq/seconds": seconds}
        job.save_info("awq", info)
        job.ctx.log.info("AWQ %d-bit, group %d: %.1f s; model written to %s", cfg.awq.bits, cfg.awq.group_size,
                         seconds, dest)
    size = weight_bytes(dest)
    metrics = {"awq.bytes": float(size), "awq/seconds": float(info["awq/seconds"])}

    def score(windows: Sequence[list[int]]) -> float:
        with gptq_environment(work, None):
            return model_perplexity(dest, windows, cfg.perplexity)

    metrics.update(job.check.measure("awq", score))
    entry = {"bits": cfg.awq.bits, "group_size": cfg.awq.group_size, "sym": cfg.awq.sym, "tokenizer": str(dest)}
    return entry, metrics


WRITERS = {"gptq": write_gptq, "gguf": write_gguf, "awq": write_awq}


def relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def run(cfg: QuantizeConfig, ctx: StageContext) -> dict[str, float]:
    """Write every format of ``formats`` in order (the first into ``model/``), the manifest, the metrics."""
    from transformers import AutoTokenizer

    src = model_dir(parse_model(cfg.base_model, BASE_STAGES), ctx).resolve()
    heldout = document_files(cfg.perplexity, "perplexity", ctx) if checks_perplexity(cfg) else []
    out_dir = ctx.output_dir.resolve()
    check_input(src, cfg)
    linears = quantized_linears(src)
    if "gptq" in cfg.formats:
        check_shapes(linears, cfg.group_size, src)
    if "awq" in cfg.formats:
        check_shapes(linears, cfg.awq.group_size, src, key="awq.group_size")
    if "gguf" in cfg.formats:  # before GPTQ's minutes, not after them
        from stages.quantize.gguf import require_llama_cpp

        require_llama_cpp()
    tokenizer = AutoTokenizer.from_pretrained(src)
    check = PerplexityCheck(src, heldout, tokenizer, cfg.perplexity, ctx.log)
    calibrate = functools.cache(lambda: calibration_set(cfg, ctx, tokenizer))

    metrics: dict[str, float] = {"size/fp_bytes": float(weight_bytes(src))}
    entries = []
    for i, fmt in enumerate(cfg.formats):
        home = out_dir / (MODEL if i == 0 else f"{FORMATS_DIR}/{fmt}")
        job = Job(cfg=cfg, ctx=ctx, src=src, out_dir=out_dir, home=home, check=check, calibrate=calibrate)
        entry, found = WRITERS[fmt](job)
        metrics.update(found)
        if "skipped" not in entry:
            path = Path(entry.pop("path", home))
            entry = {"path": relative(path, out_dir), "bytes": int(found[f"{fmt}.bytes"]), **entry,
                     "tokenizer": relative(Path(entry["tokenizer"]), out_dir)}
            if f"{fmt}.perplexity" in found:
                entry.update(perplexity=found[f"{fmt}.perplexity"], perplexity_fp=found["perplexity/fp"],
                             perplexity_ratio=found[f"{fmt}.perplexity_ratio"])
        entries.append({"format": fmt, **entry})
    manifest = out_dir / FORMATS_DIR / MANIFEST
    manifest.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, {"formats": entries}, indent=2)
    ctx.log_artifact(manifest)
    ctx.log_metrics(metrics)
    check.check()
    for i, entry in enumerate(entries):  # MLflow logged models: the primary "quantize", the others "quantize-<format>"
        if "skipped" not in entry:
            ctx.log_model("quantize" if i == 0 else f"quantize-{entry['format']}", out_dir / entry["path"],
                          params={"format": entry["format"], "bytes": entry["bytes"], "base_model": cfg.base_model})
    if not cfg.keep_checkpoint:  # set-aside checkpoints go too: the warning in the stage log is their record
        work = out_dir / WORK
        for path in (work / CHECKPOINT, work / "offload", *work.glob(f"{CHECKPOINT}.corrupt-*")):
            shutil.rmtree(path, ignore_errors=True)
        for path in (out_dir / "llama.cpp").glob("model-*.gguf"):
            path.unlink()
    return metrics


STAGE = Stage(
    name="quantize",
    config=QuantizeConfig,
    run=run,
    inputs=("align.model", "sft.model", "pretrain.model", "pii.documents", "tokenize.heldout"),
    **base_model_hooks(BASE_STAGES, inputs=needed_inputs, external=external_state, preflight=input_problems),
    outputs=(MODEL, FORMATS_DIR),
    version=2,  # 2: formats (gptq, gguf, awq) and their manifest
    unhashed=frozenset(["cpu_workers", "keep_checkpoint", "perplexity.batch_size", "gguf.threads"]),
    resumable=True,
    description="Weight-only quantization in several formats (GPTQ, GGUF, AWQ) with a held-out perplexity check.",
)
