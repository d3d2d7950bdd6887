"""quality: Heuristic and fastText quality filtering.

Registered with its declared inputs and outputs; the implementation lands with its issue.
Until then running it fails with StageNotImplemented, and `llmpipe plan` still shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import Stage, StageContext, StageNotImplemented


@dataclass(frozen=True)
class QualityConfig:
    min_words: int = 50  # documents with fewer words are dropped
    workers: int = 2  # processes (execution-only)


def run(cfg: QualityConfig, ctx: StageContext) -> dict[str, float]:
    raise StageNotImplemented("quality")


STAGE = Stage(
    name="quality",
    config=QualityConfig,
    run=run,
    inputs=('dedup.documents',),
    outputs=('documents', 'dropped'),
    unhashed=frozenset(['workers']),
    description="Heuristic and fastText quality filtering.",
)
