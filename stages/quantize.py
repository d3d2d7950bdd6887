"""quantize: GPTQ 4-bit quantization.

Registered with its declared inputs and outputs; the implementation lands with its issue.
Until then running it fails with StageNotImplemented, and `llmpipe plan` still shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import Stage, StageContext, StageNotImplemented


@dataclass(frozen=True)
class QuantizeConfig:
    bits: int = 4  # weight bits
    group_size: int = 128  # GPTQ group size


def run(cfg: QuantizeConfig, ctx: StageContext) -> dict[str, float]:
    raise StageNotImplemented("quantize")


STAGE = Stage(
    name="quantize",
    config=QuantizeConfig,
    run=run,
    inputs=('align.model', 'pii.documents'),
    outputs=('model',),
    unhashed=frozenset(),
    description="GPTQ 4-bit quantization.",
)
