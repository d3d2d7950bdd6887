"""The project definition: the explicit registry of the eleven stages, in lifecycle order, and the
config groups they share. The one place that knows every stage.

``load_config`` and ``stage_config`` build configs from the shipped YAML (conf/), the only source of
default values: tests, benchmarks and notebooks start from there exactly as ``make pipeline`` does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import Project
from stages import (
    align,
    decontaminate,
    dedup,
    evaluate,
    ingest,
    pii,
    pretrain,
    quality,
    quantize,
    serve,
    sft,
    tokenize,
)
from stages.common.config import DataConfig, ModelConfig

PROJECT = Project(
    name="llmpipe",
    stages=tuple(m.STAGE for m in (ingest, dedup, quality, pii, decontaminate, tokenize, pretrain, sft, align, quantize,
                                   serve, evaluate)),
    import_path="llmpipe.project:PROJECT",
    shared={"model": ModelConfig, "data": DataConfig},
)

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "conf"


def load_config(conf: str = "tiny", overrides: Sequence[str] = (), project_dir: Path | None = None) -> Any:
    """The validated pipeline config of ``conf/<conf>.yaml`` with Hydra ``overrides``
    (``stage.sft.train.lr=1e-4``, ``stage/sft=qlora``), as ``llmpipe plan -c <conf>`` sees it."""
    return _load(conf, tuple(overrides), project_dir or REPO)


@functools.lru_cache(maxsize=64)
def _load(conf: str, overrides: tuple[str, ...], project_dir: Path) -> Any:
    from pipeline.config import load

    return load(PROJECT, CONFIG_DIR, conf, list(overrides), project_dir=project_dir)


def stage_config(stage: str, *overrides: str, conf: str = "tiny") -> Any:
    """One stage's typed config from the shipped YAML: ``stage_config("sft", "stage/sft=qlora",
    "stage.sft.train.max_steps=2")``. Change fields further with ``dataclasses.replace``."""
    stages = load_config(conf, overrides).stages
    if stage not in stages:
        from pipeline.errors import ConfigError
        from pipeline.schema import suggest

        raise ConfigError(f"stage_config: no stage {stage!r}" + suggest(stage, stages))
    return stages[stage]
