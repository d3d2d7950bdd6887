"""The real quantize and serve stages behind stand-ins for their upstream stages, which copy a tiny
fixture model and documents into place: the kill tests (test_faults.py) run the real stage code
through the orchestrator without pretraining and fine-tuning a model first.

    align, pii, tokenize (copies) -> quantize (gptqmodel) -> serve (vLLM)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import Project, Stage, StageContext
from pipeline.schema import to_plain
from stages.quantize.stage import STAGE as QUANTIZE
from stages.serve.stage import STAGE as SERVE


@dataclass(frozen=True)
class CopyConfig:
    source: str  # the directory to copy as the stage's one output


def _copy(artifact: str) -> Callable[[CopyConfig, StageContext], dict[str, float]]:
    def run(cfg: CopyConfig, ctx: StageContext) -> dict[str, float]:
        shutil.copytree(cfg.source, ctx.output(artifact))
        return {}

    return run


MODELS = Project(
    name="models",
    stages=(
        Stage("align", CopyConfig, _copy("model"), (), ("model",)),
        Stage("pii", CopyConfig, _copy("documents"), (), ("documents",)),
        Stage("tokenize", CopyConfig, _copy("heldout"), (), ("heldout",)),
        QUANTIZE,
        SERVE,
    ),
    import_path="tests.pipeline.models_project:MODELS",
)


def write_models_conf(project_dir: Path, model: Path, documents: Path, heldout: Path) -> Path:
    """conf/models.yaml under ``project_dir``: the shipped quantize and serve configs (tiny), made
    quick (GPTQ only, a small calibration set, no perplexity check, no load benchmark); returns the conf dir."""
    from llmpipe.project import stage_config

    quantize: dict[str, Any] = to_plain(stage_config("quantize"))
    quantize["calibration"].update(samples=16, max_tokens=128)
    quantize["perplexity"]["max_tokens"] = 0
    quantize["formats"] = ["gptq"]  # the kill lands in GPTQ's calibration; the formats have their own tests
    serve: dict[str, Any] = to_plain(stage_config("serve"))
    serve["bench"]["requests"] = 0
    serve["check_max_tokens"] = 4
    conf = project_dir / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    stages = {"align": {"source": str(model)}, "pii": {"source": str(documents)},
              "tokenize": {"source": str(heldout)}, "quantize": quantize, "serve": serve}
    (conf / "models.yaml").write_text(
        "run: {root: runs, only: [], from: null, force: [], lock_wait_s: 60, keep_going: true}\n"
        "tracking: {enabled: false}\ncluster: {executor: local, env: {}}\n"
        f"stage: {json.dumps(stages)}\n")
    return conf
