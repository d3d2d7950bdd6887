"""What the quantize tests run the stage on: a tiny trained model standing for align's, its corpus (pii's
documents) and held-out documents (tokenize's), and the StageContext that hands them to the stage."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import StageContext
from tests.stages.model_fixtures import build_tiny_model, corpus_texts, write_documents


def make_world(root: Path) -> dict[str, Path]:
    texts = corpus_texts(240)
    return {
        "root": root,
        "model": build_tiny_model(root / "align_model", train_steps=30, texts=texts),
        "documents": write_documents(root / "documents", texts[:200], shards=2),
        "heldout": write_documents(root / "heldout", texts[200:], prefix="held"),
    }


def context(world: dict[str, Path], name: str) -> StageContext:
    out = world["root"] / name
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(stage="quantize", fingerprint=name, output_dir=out, metrics_file=out / "metrics.jsonl",
                        inputs={"align.model": world["model"], "pii.documents": world["documents"],
                                "tokenize.heldout": world["heldout"]}, log=logging.getLogger(f"test.quantize.{name}"))
