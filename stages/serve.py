"""serve: Serve with vLLM's OpenAI-compatible server; check and load-test it.

Registered with its declared inputs and outputs; the implementation lands with its issue.
Until then running it fails with StageNotImplemented, and `llmpipe plan` still shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import Stage, StageContext, StageNotImplemented


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # bind address
    port: int = 8000  # port


def run(cfg: ServeConfig, ctx: StageContext) -> dict[str, float]:
    raise StageNotImplemented("serve")


STAGE = Stage(
    name="serve",
    config=ServeConfig,
    run=run,
    inputs=('quantize.model',),
    outputs=('endpoint',),
    unhashed=frozenset(['host', 'port']),
    description="Serve with vLLM's OpenAI-compatible server; check and load-test it.",
)
