#!/usr/bin/env bash
# Create .venv-bench: the separate virtualenv in which bench/data.py runs its DataTrove baselines.
#
# DataTrove is kept out of .venv on purpose: datatrove[processing]==0.10.1 pins trafilatura<1.12 and
# brings fasttext-numpy2-wheel, which would downgrade .venv's trafilatura and add a second `fasttext`
# module. Everything is pinned in bench/baselines/requirements-datatrove.txt and installed with
# --no-deps, so nothing unpinned (torch, CUDA) can come in.
#
# Idempotent: the stamp file holds the sha256 of the requirements file; when it matches, the script
# returns at once. A changed requirements file (or a missing/broken venv) reinstalls.
#
# Usage: bash bench/setup_baselines.sh        (from anywhere; env: PYTHON_BENCH=python3.11, VENV_BENCH=.venv-bench)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV_BENCH:-$ROOT/.venv-bench}"
PYTHON_BENCH="${PYTHON_BENCH:-python3.11}"
REQ="$ROOT/bench/baselines/requirements-datatrove.txt"
STAMP="$VENV/.setup-done"

want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/python" ]]; then
    exit 0
fi

if ! command -v "$PYTHON_BENCH" >/dev/null; then
    echo "setup_baselines: $PYTHON_BENCH not found (set PYTHON_BENCH to a Python 3.11 interpreter)" >&2
    exit 2
fi
echo "setup_baselines: creating $VENV with $PYTHON_BENCH (datatrove 0.10.1, pinned, no torch)" >&2
rm -f "$STAMP"
[[ -x "$VENV/bin/python" ]] || "$PYTHON_BENCH" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --no-deps --requirement "$REQ"

# The environment must be complete (pip check) and import what the runner uses; torch must be absent.
"$VENV/bin/python" -m pip check >&2
"$VENV/bin/python" - <<'EOF'
import importlib.util
import sys

import datatrove.pipeline.dedup  # noqa: F401  MinhashDedup*
import datatrove.pipeline.extractors  # noqa: F401  Trafilatura
import datatrove.pipeline.readers  # noqa: F401  WarcReader, ParquetReader
import spacy  # noqa: F401  DataTrove's English word tokenizer
import trafilatura  # noqa: F401

if importlib.util.find_spec("torch") is not None:
    sys.exit("setup_baselines: torch is installed in the baseline venv; it must not be")
EOF
echo "$want" > "$STAMP"
echo "setup_baselines: ready ($VENV)" >&2
