"""dedup: Exact then MinHash near-duplicate removal.

Registered with its declared inputs and outputs; the implementation lands with its issue.
Until then running it fails with StageNotImplemented, and `llmpipe plan` still shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import Stage, StageContext, StageNotImplemented


@dataclass(frozen=True)
class DedupConfig:
    threshold: float = 0.8  # Jaccard similarity above which documents are near duplicates
    workers: int = 2  # processes (execution-only)


def run(cfg: DedupConfig, ctx: StageContext) -> dict[str, float]:
    raise StageNotImplemented("dedup")


STAGE = Stage(
    name="dedup",
    config=DedupConfig,
    run=run,
    inputs=('ingest.documents',),
    outputs=('documents', 'removed'),
    unhashed=frozenset(['workers']),
    description="Exact then MinHash near-duplicate removal.",
)
