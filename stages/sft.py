"""sft: LoRA / QLoRA / full supervised fine-tuning with TRL.

Registered with its declared inputs and outputs; the implementation lands with its issue.
Until then running it fails with StageNotImplemented, and `llmpipe plan` still shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline import Stage, StageContext, StageNotImplemented


@dataclass(frozen=True)
class SftConfig:
    method: Literal["lora", "qlora", "full"] = "lora"  # fine-tuning method
    lr: float = 2e-4  # learning rate


def run(cfg: SftConfig, ctx: StageContext) -> dict[str, float]:
    raise StageNotImplemented("sft")


STAGE = Stage(
    name="sft",
    config=SftConfig,
    run=run,
    inputs=('pretrain.model', 'pii.documents'),
    outputs=('adapter', 'model'),
    unhashed=frozenset(),
    description="LoRA / QLoRA / full supervised fine-tuning with TRL.",
)
