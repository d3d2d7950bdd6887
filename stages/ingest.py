"""ingest: Read WARC files, keep HTML responses, extract main text.

Registered with its declared inputs and outputs; the implementation lands with its issue.
Until then running it fails with StageNotImplemented, and `llmpipe plan` still shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import Stage, StageContext, StageNotImplemented


@dataclass(frozen=True)
class IngestConfig:
    input: tuple[str, ...]  # WARC / WARC.gz files: globs, paths or fsspec URLs
    workers: int = 2  # processes (execution-only)


def run(cfg: IngestConfig, ctx: StageContext) -> dict[str, float]:
    raise StageNotImplemented("ingest")


STAGE = Stage(
    name="ingest",
    config=IngestConfig,
    run=run,
    inputs=(),
    outputs=('documents',),
    unhashed=frozenset(['workers']),
    description="Read WARC files, keep HTML responses, extract main text.",
)
