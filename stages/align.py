"""align: Preference alignment (DPO by default) with TRL.

Registered with its declared inputs and outputs; the implementation lands with its issue.
Until then running it fails with StageNotImplemented, and `llmpipe plan` still shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline import Stage, StageContext, StageNotImplemented


@dataclass(frozen=True)
class AlignConfig:
    method: Literal["dpo", "orpo", "kto", "ppo", "rloo"] = "dpo"  # alignment algorithm
    beta: float = 0.1  # strength of the KL penalty


def run(cfg: AlignConfig, ctx: StageContext) -> dict[str, float]:
    raise StageNotImplemented("align")


STAGE = Stage(
    name="align",
    config=AlignConfig,
    run=run,
    inputs=('sft.model', 'pii.documents'),
    outputs=('model',),
    unhashed=frozenset(),
    description="Preference alignment (DPO by default) with TRL.",
)
