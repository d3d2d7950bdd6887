"""pretrain: DeepSpeed ZeRO pretraining of a Llama-architecture model.

Registered with its declared inputs and outputs; the implementation lands with its issue.
Until then running it fails with StageNotImplemented, and `llmpipe plan` still shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import Stage, StageContext, StageNotImplemented
from stages.shared import ModelConfig


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig  # architecture (usually ${model})
    lr: float = 3e-4  # peak learning rate
    log_every: int = 10  # steps between metric logs (execution-only)


def run(cfg: PretrainConfig, ctx: StageContext) -> dict[str, float]:
    raise StageNotImplemented("pretrain")


STAGE = Stage(
    name="pretrain",
    config=PretrainConfig,
    run=run,
    inputs=('tokenize.tokenizer', 'tokenize.tokens'),
    outputs=('model',),
    unhashed=frozenset(['log_every']),
    description="DeepSpeed ZeRO pretraining of a Llama-architecture model.",
)
