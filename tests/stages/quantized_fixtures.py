"""Quantize outputs for the serve and evaluate tests, without running the quantize stage::

    from tests.stages.quantized_fixtures import build_tiny_gguf, quantize_output

    gguf = build_tiny_gguf(model_dir, tmp_path / "tiny-f32.gguf")        # llama.cpp's converter (f32)
    root = quantize_output(tmp_path / "quantize", model_dir, gguf=gguf)  # model/ + formats/manifest.json

The GGUF is made by the quantize stage's own llama.cpp steps (stages/quantize/gguf.py), so it is what
the stage would write; f32 by default, so that its scores can be held to transformers' float32 ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def build_tiny_gguf(model_dir: Path, dest: Path, quant_type: str | None = None) -> Path:
    """``model_dir`` as a GGUF at ``dest``: converted to f32, then quantized to ``quant_type`` if given."""
    from stages.quantize.gguf import convert, quantize

    work = dest.parent / f"{dest.stem}-work"
    if quant_type is None:
        convert(model_dir, dest, "f32", work)
        return dest
    f32 = work / "model-f32.gguf"
    convert(model_dir, f32, "f32", work)
    quantize(f32, dest, quant_type, 1, work)
    return dest


def quantize_output(root: Path, model: Path, gguf: Path | None = None, skipped: dict | None = None) -> Path:
    """A quantize output dir as the quantize stage lays it out (``model`` = the primary format, ``formats/
    manifest.json``; stages/common/quantized.py), holding ``model`` as its GPTQ format (linked, not copied),
    a copy of ``gguf`` as its GGUF one, and ``skipped`` formats ({format: why})."""
    root.mkdir(parents=True)
    (root / "model").symlink_to(model.resolve())
    entries: list[dict] = [{"format": "gptq", "path": "model", "bytes": 1000}]
    if gguf is not None:
        (root / "formats" / "gguf").mkdir(parents=True)
        shutil.copyfile(gguf, root / "formats" / "gguf" / gguf.name)  # a copy: `--model-dir` resolves links
        entries.append({"format": "gguf", "path": f"formats/gguf/{gguf.name}", "bytes": gguf.stat().st_size,
                        "quant_type": "Q4_K_M"})
    entries += [{"format": name, "skipped": why} for name, why in (skipped or {}).items()]
    (root / "formats").mkdir(exist_ok=True)
    (root / "formats" / "manifest.json").write_text(json.dumps({"formats": entries}))
    return root
