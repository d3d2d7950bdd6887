"""evaluate: lm-evaluation-harness on every model the run produced.

Registered with its declared inputs and outputs; the implementation lands with its issue.
Until then running it fails with StageNotImplemented, and `llmpipe plan` still shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import Stage, StageContext, StageNotImplemented


@dataclass(frozen=True)
class EvaluateConfig:
    tasks: tuple[str, ...] = ()  # lm-eval task names


def run(cfg: EvaluateConfig, ctx: StageContext) -> dict[str, float]:
    raise StageNotImplemented("evaluate")


STAGE = Stage(
    name="evaluate",
    config=EvaluateConfig,
    run=run,
    inputs=('pretrain.model', 'sft.model', 'align.model', 'quantize.model', 'serve.endpoint', 'tokenize.heldout'),
    outputs=('results',),
    unhashed=frozenset(),
    description="lm-evaluation-harness on every model the run produced.",
)
