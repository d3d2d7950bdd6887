"""quantize's GGUF format: llama.cpp's own converter and quantizer, and perplexity with llama.cpp.

Nothing here converts weights itself; the two steps are llama.cpp's:

1. ``convert_hf_to_gguf.py`` (with its ``conversion`` package and its own ``gguf-py``) writes the model
   dir as one unquantized GGUF (``gguf.outtype``: f16 by default), tokenizer and chat template included.
   llama.cpp does not publish it as a package: ``make setup`` extracts it from the llama-cpp-python
   sdist of the pinned version (the same llama.cpp commit as the binding) into ``.venv/share/llama.cpp``
   (:func:`converter_dir`; ``LLMPIPE_LLAMA_CPP_DIR`` points elsewhere). It runs in a child process with
   this interpreter (its ``gguf-py`` goes first on that process's path, as the script itself arranges).
2. llama.cpp's quantizer, ``llama_model_quantize`` through llama-cpp-python's binding, to
   ``gguf.type`` (Q4_K_M by default), also in a child process: llama.cpp aborts the process on some
   errors, and its log goes to the same file as the converter's (``<work>/gguf/llama.cpp.log``).

One gap of the converter is bridged, not patched: it names the BPE pre-tokenizer (``tokenizer.ggml.pre``)
by hashing the tokens of a probe text against the tokenizers of known hub models, and refuses any
other tokenizer, such as the one the tokenize stage trains. When (and only when) it refuses, and the
tokenizer's ``tokenizer.json`` is a plain byte-level BPE (``ByteLevel`` pre-tokenizer with GPT-2's split
regex, no prefix space, no normalizer: what stages/tokenize builds), the pre-tokenizer is llama.cpp's
``gpt-2``, the same split; a test checks that llama.cpp then tokenizes like transformers. Any other
tokenizer keeps the converter's own error.

Perplexity (:func:`gguf_perplexity`): llama-cpp-python's ``Llama`` with ``logits_all`` over the same
held-out windows as the transformers models (stage.py ``heldout_windows``), each window from an empty
context, so the figure compares with the fp model's.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.files import atomic_path
from stages.quantize.config import QuantizeError

CONVERTER = "convert_hf_to_gguf.py"
DIR_ENV = "LLMPIPE_LLAMA_CPP_DIR"  # where convert_hf_to_gguf.py, conversion/ and gguf-py/ are, if not the venv's
# What the converter needs beside itself (the sdist's vendor/llama.cpp layout).
CONVERTER_PARTS = (CONVERTER, "conversion/__init__.py", "gguf-py/gguf/__init__.py")
LOG = "llama.cpp.log"


class LlamaCppMissingError(QuantizeError):
    """llama.cpp's converter or llama-cpp-python, which the gguf format needs, is not installed."""


def converter_dir() -> Path:
    """Where llama.cpp's converter is: ``$LLMPIPE_LLAMA_CPP_DIR``, else ``<venv>/share/llama.cpp``."""
    return Path(os.environ.get(DIR_ENV) or Path(sys.prefix) / "share" / "llama.cpp")


def missing_parts() -> str | None:
    """Why the gguf format cannot run here (the first missing piece), or None when it can. Light: no import
    of llama_cpp (the plan-time check calls it)."""
    import importlib.util

    where = converter_dir()
    missing = [part for part in CONVERTER_PARTS if not (where / part).is_file()]
    if missing:
        return (f"llama.cpp's converter is not in {where} (missing {', '.join(missing)}): `make setup` extracts "
                f"it from the llama-cpp-python sdist into .venv/share/llama.cpp; or set {DIR_ENV} to a llama.cpp "
                f"checkout of the binding's version")
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python (module llama_cpp) is not installed: `make setup` installs it (requirements/*.lock)"
    return None


def require_llama_cpp() -> Path:
    """The converter dir, or :class:`LlamaCppMissingError` saying what is missing."""
    problem = missing_parts()
    if problem:
        raise LlamaCppMissingError(f"stage.quantize.formats lists gguf: {problem}")
    return converter_dir()


def _run_child(args: Sequence[str], log_file: Path, what: str) -> None:
    """Run ``python -m stages.quantize.gguf <args>``, its output appended to ``log_file``; a failure is a
    QuantizeError with the log's tail."""
    from pipeline.processes import child_env

    repo = Path(__file__).resolve().parents[2]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log:
        log.write(f"\n$ {what}: {' '.join(args)}\n")
        log.flush()
        code = subprocess.run([sys.executable, "-m", "stages.quantize.gguf", *args], stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=child_env({"PYTHONUNBUFFERED": "1"}, pythonpath=[repo])).returncode
    if code != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        raise QuantizeError(f"llama.cpp's {what} failed (exit {code}); the end of {log_file}:\n{tail}")


def convert(src: Path, dest: Path, outtype: str, work: Path) -> None:
    """``src`` (an HF model dir) as an unquantized GGUF at ``dest``, by llama.cpp's converter (atomic)."""
    llama_dir = require_llama_cpp()
    with atomic_path(dest) as tmp:
        _run_child(["convert", str(llama_dir), str(src), "--outfile", str(tmp), "--outtype", outtype],
                   work / LOG, "convert_hf_to_gguf.py")


def quantize(src: Path, dest: Path, quant_type: str, threads: int | None, work: Path) -> None:
    """The GGUF ``src`` quantized to ``quant_type`` at ``dest`` by llama.cpp (atomic)."""
    require_llama_cpp()
    with atomic_path(dest) as tmp:
        _run_child(["quantize", str(src), str(tmp), quant_type, str(threads or 0)], work / LOG, "quantizer")


def gguf_perplexity(gguf_file: Path, windows: Sequence[list[int]], threads: int | None) -> float:
    """exp(mean next-token NLL) of the GGUF model over ``windows``, each evaluated from an empty context."""
    import numpy as np
    from llama_cpp import Llama

    longest = max(len(w) for w in windows)
    llm = Llama(model_path=str(gguf_file), n_ctx=longest, n_batch=longest, n_ubatch=longest, logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    nll, count = 0.0, 0
    try:
        for window in windows:
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[:len(window) - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            log_z = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
            targets = np.asarray(window[1:])
            nll += float((log_z - logits[np.arange(len(targets)), targets]).sum())
            count += len(targets)
    finally:
        llm.close()
    return math.exp(nll / count)


# ---------------------------------------------------------------- the child process


def byte_level_pre_tokenizer(model_dir: Path) -> str | None:
    """llama.cpp's pre-tokenizer name for a plain byte-level BPE tokenizer (GPT-2's split), else None."""
    try:
        spec = json.loads((model_dir / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return None
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if (model.get("type") == "BPE" and spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)):
        return "gpt-2"
    return None


def _convert_main(llama_dir: Path, argv: list[str]) -> None:
    """Run llama.cpp's converter as its own ``__main__``, with the pre-tokenizer bridge (module docstring)."""
    sys.path[:0] = [str(llama_dir), str(llama_dir / "gguf-py")]
    import conversion.base as base

    recognised = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return recognised(self, tokenizer)
        except NotImplementedError:
            name = byte_level_pre_tokenizer(Path(self.dir_model))
            if name is None:
                raise
            base.logger.warning("llmpipe: %s/tokenizer.json is a plain byte-level BPE: pre-tokenizer %r",
                                self.dir_model, name)
            return name

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(llama_dir / CONVERTER), *argv]
    runpy.run_path(str(llama_dir / CONVERTER), run_name="__main__")


def _quantize_main(src: str, dest: str, quant_type: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if quant_type == "F32"
                           else f"LLAMA_FTYPE_MOSTLY_{quant_type}")
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(src.encode(), dest.encode(), params)
    if code != 0:
        sys.exit(f"llama_model_quantize({src} -> {dest}, {quant_type}) returned {code}")


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "convert":
        _convert_main(Path(rest[0]), rest[1:])
    elif command == "quantize":
        _quantize_main(rest[0], rest[1], rest[2], int(rest[3]))
    else:
        sys.exit(f"unknown command {command!r}")
