"""The formats a quantize output holds, read from its ``formats/manifest.json``: for serve and evaluate.

The quantize stage (stages/quantize) writes one model per entry of ``stage.quantize.formats`` (``gptq``,
``gguf``, ``awq``) and lists them, in that order, in ``<quantize output>/formats/manifest.json``::

    {"formats": [
      {"format": "gptq", "path": "model", "bytes": 1234, "perplexity": 9.1, "perplexity_fp": 8.9, ...},
      {"format": "gguf", "path": "formats/gguf/model-Q4_K_M.gguf", "bytes": 567, "quant_type": "Q4_K_M",
       "tokenizer": "formats/gguf", ...},
      {"format": "awq", "skipped": "llmcompressor is not installed ..."}]}

Paths are relative to the stage output dir, so the output can move. The first entry is the primary
format, written in the stage's ``model`` artifact (what ``base_model: quantize`` means): a ``gptq``/``awq``
model dir is ``model/`` itself, a primary GGUF is ``model/model-<type>.gguf``; the others are under
``formats/<format>/``. A ``gptq``/``awq`` path is a Hugging Face model dir (tokenizer included); a
``gguf`` path is one GGUF file (llama.cpp's, which holds the tokenizer and chat template; the Hugging
Face tokenizer files are copied beside it, the entry's ``tokenizer``). An entry with ``skipped`` was
asked for but not produced (the reason); it has no path. The stage writes none today (every format
runs on CPU and GPU), but readers must expect one.

Stages may not import one another, so this reader lives here, not in stages/quantize. Light module:
no torch import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import LlmpipeError

FORMATS = ("gptq", "gguf", "awq")  # what stage.quantize.formats may list
FORMATS_DIR = "formats"  # the stage's ``formats`` artifact
MANIFEST = "manifest.json"  # in FORMATS_DIR


class QuantizedFormatsError(LlmpipeError):
    """A quantize output has no readable formats manifest, or lacks the format asked for."""


@dataclass(frozen=True)
class QuantizedFormat:
    """One entry of the manifest, its path made absolute."""

    format: str  # gptq | gguf | awq
    path: Path | None  # the model dir (gptq, awq) or .gguf file; None when skipped
    bytes: int | None  # weight bytes on disk; None when skipped
    skipped: str | None = None  # why it was not produced; None when it was
    tokenizer: Path | None = None  # a Hugging Face tokenizer dir of the model (a GGUF also holds its own)
    details: Mapping[str, Any] = field(default_factory=dict)  # the rest of the entry (quant_type, perplexity...)

    @property
    def produced(self) -> bool:
        return self.skipped is None


def manifest_path(quantize_output_dir: Path | str) -> Path:
    """The manifest of a quantize output dir (also accepts the ``formats`` artifact dir itself)."""
    root = Path(quantize_output_dir)
    if (root / MANIFEST).is_file() and root.name == FORMATS_DIR:
        return root / MANIFEST
    return root / FORMATS_DIR / MANIFEST


def read_formats(quantize_output_dir: Path | str) -> list[QuantizedFormat]:
    """The formats of a quantize output, in ``stage.quantize.formats`` order (the primary first), with
    absolute paths. ``quantize_output_dir`` is the stage output dir or its ``formats`` artifact (what
    ``ctx.input("quantize.formats")`` hands a stage). A missing or malformed manifest, or a produced
    entry whose file is gone, is a :class:`QuantizedFormatsError` naming the file."""
    manifest = manifest_path(quantize_output_dir)
    base = manifest.parent.parent
    try:
        entries = json.loads(manifest.read_text())["formats"]
    except FileNotFoundError:
        raise QuantizedFormatsError(f"{manifest}: no formats manifest; {base} is not the output of a quantize "
                                    f"stage that lists its formats (stage.quantize.formats)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise QuantizedFormatsError(f"{manifest}: not a formats manifest ({exc!r})") from exc
    formats = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("format") not in FORMATS:
            raise QuantizedFormatsError(f"{manifest}: entry {i} is not a format of {FORMATS}: {entry!r}")
        rest = {k: v for k, v in entry.items() if k not in ("format", "path", "bytes", "skipped", "tokenizer")}
        if entry.get("skipped"):
            formats.append(QuantizedFormat(entry["format"], None, None, str(entry["skipped"]), details=rest))
            continue
        if not isinstance(entry.get("path"), str):
            raise QuantizedFormatsError(f"{manifest}: entry {i} ({entry['format']}) has neither a path nor a "
                                        f"skipped reason")
        path = base / entry["path"]
        if not path.exists():
            raise QuantizedFormatsError(f"{manifest}: the {entry['format']} model {path} is missing")
        tokenizer = base / entry["tokenizer"] if isinstance(entry.get("tokenizer"), str) else None
        formats.append(QuantizedFormat(entry["format"], path, int(entry.get("bytes") or 0), None, tokenizer, rest))
    return formats


def find_format(quantize_output_dir: Path | str, name: str) -> QuantizedFormat:
    """The produced format ``name`` of a quantize output; a :class:`QuantizedFormatsError` saying why
    when it was skipped or not asked for (naming ``stage.quantize.formats``)."""
    if name not in FORMATS:
        raise QuantizedFormatsError(f"{name!r} is not a quantized format; the formats are {FORMATS}")
    formats = read_formats(quantize_output_dir)
    for found in formats:
        if found.format == name:
            if found.skipped:
                raise QuantizedFormatsError(f"the quantize output {manifest_path(quantize_output_dir).parent.parent} "
                                            f"skipped {name}: {found.skipped}")
            return found
    raise QuantizedFormatsError(f"the quantize output {manifest_path(quantize_output_dir).parent.parent} has no "
                                f"{name} model: stage.quantize.formats was {[f.format for f in formats]}")
