"""pii: Replace personal data and secrets with typed placeholders.

Registered with its declared inputs and outputs; the implementation lands with its issue.
Until then running it fails with StageNotImplemented, and `llmpipe plan` still shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import Stage, StageContext, StageNotImplemented


@dataclass(frozen=True)
class PiiConfig:
    workers: int = 2  # processes (execution-only)


def run(cfg: PiiConfig, ctx: StageContext) -> dict[str, float]:
    raise StageNotImplemented("pii")


STAGE = Stage(
    name="pii",
    config=PiiConfig,
    run=run,
    inputs=('quality.documents',),
    outputs=('documents',),
    unhashed=frozenset(['workers']),
    description="Replace personal data and secrets with typed placeholders.",
)
