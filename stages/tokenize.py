"""tokenize: Train or load a tokenizer; pack token shards; hold out a validation split.

Registered with its declared inputs and outputs; the implementation lands with its issue.
Until then running it fails with StageNotImplemented, and `llmpipe plan` still shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import Stage, StageContext, StageNotImplemented


@dataclass(frozen=True)
class TokenizeConfig:
    seq_len: int = 256  # tokens per packed sequence
    workers: int = 2  # processes (execution-only)


def run(cfg: TokenizeConfig, ctx: StageContext) -> dict[str, float]:
    raise StageNotImplemented("tokenize")


STAGE = Stage(
    name="tokenize",
    config=TokenizeConfig,
    run=run,
    inputs=('pii.documents',),
    outputs=('tokenizer', 'tokens', 'heldout'),
    unhashed=frozenset(['workers']),
    description="Train or load a tokenizer; pack token shards; hold out a validation split.",
)
