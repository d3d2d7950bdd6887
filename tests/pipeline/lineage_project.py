"""Test-only stages that log what MLflow shows as lineage: datasets, logged models, model scores.

    corpus (an outside file) -> clean -> pretrain -> sft -> align -> quantize
                                              \\_______\\______\\________\\-> evaluate (+ an outside model)

Cheap file work with the real stages' shape: the data stages log their input and output as datasets,
the four model stages a logged model each, evaluate the scores of every model it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline import Project, Stage, StageContext
from pipeline.content import content_digest

MODEL_STAGES = ("pretrain", "sft", "align", "quantize")


@dataclass(frozen=True)
class CorpusConfig:
    source: str = "corpus.txt"  # an outside text file, one document a line


def run_corpus(cfg: CorpusConfig, ctx: StageContext) -> dict[str, float]:
    lines = Path(cfg.source).read_text().splitlines()
    ctx.output("documents").write_text("\n".join(lines))
    ctx.log_dataset("corpus", cfg.source, digest=content_digest(cfg.source), rows=len(lines))
    ctx.log_dataset("corpus.documents", ctx.output("documents"), rows=len(lines), context="output")
    return {"docs": len(lines)}


@dataclass(frozen=True)
class CleanConfig:
    drop: str = "spam"  # lines containing this are dropped


def run_clean(cfg: CleanConfig, ctx: StageContext) -> dict[str, float]:
    lines = ctx.input("corpus.documents").read_text().splitlines()
    kept = [line for line in lines if cfg.drop not in line]
    ctx.output("documents").write_text("\n".join(kept))
    ctx.log_dataset("corpus.documents", ctx.input("corpus.documents"), rows=len(lines))  # digest: corpus's fingerprint
    ctx.log_dataset("clean.documents", ctx.output("documents"), rows=len(kept), context="output")
    return {"kept": len(kept)}


@dataclass(frozen=True)
class ModelConfig:
    scale: int = 1  # written into the "weights"


def _model_stage(name: str, upstream: str | None):
    def run(cfg: ModelConfig, ctx: StageContext) -> dict[str, float]:
        model = ctx.output("model")
        model.mkdir()
        previous = (ctx.input(upstream) / "weights.txt").read_text() if upstream and upstream.endswith(".model") else ""
        (model / "weights.txt").write_text(f"{previous}{name}x{cfg.scale}\n")
        (model / "config.json").write_text("{}")
        ctx.log_model(name, model, params={"scale": cfg.scale}, tags={"kind": "toy"})
        return {"size": len((model / "weights.txt").read_text())}

    return run


@dataclass(frozen=True)
class EvaluateConfig:
    outside_model: str | None = None  # a model dir from outside the pipeline, scored too


def run_evaluate(cfg: EvaluateConfig, ctx: StageContext) -> dict[str, float]:
    metrics = {}
    for stage in MODEL_STAGES:
        path = ctx.input(f"{stage}.model")
        score = len((path / "weights.txt").read_text()) / 100
        ctx.log_model_metrics(path, {"score": score, "loss": 1 - score}, label=stage)
        metrics[f"{stage}.score"] = score
    if cfg.outside_model:
        ctx.log_model_metrics(Path(cfg.outside_model), {"score": 0.01}, label="outside")
    (ctx.output_dir / "table.md").write_text("\n".join(f"{k} {v}" for k, v in metrics.items()))
    ctx.output("results").write_text("ok")
    return metrics


LINEAGE = Project(
    name="lineage",
    stages=(
        Stage("corpus", CorpusConfig, run_corpus, (), ("documents",),
              external=lambda cfg: {"source": content_digest(cfg.source)}),
        Stage("clean", CleanConfig, run_clean, ("corpus.documents",), ("documents",)),
        Stage("pretrain", ModelConfig, _model_stage("pretrain", "clean.documents"), ("clean.documents",), ("model",)),
        Stage("sft", ModelConfig, _model_stage("sft", "pretrain.model"), ("pretrain.model",), ("model",)),
        Stage("align", ModelConfig, _model_stage("align", "sft.model"), ("sft.model",), ("model",)),
        Stage("quantize", ModelConfig, _model_stage("quantize", "align.model"), ("align.model",), ("model",)),
        Stage("evaluate", EvaluateConfig, run_evaluate, tuple(f"{s}.model" for s in MODEL_STAGES), ("results",)),
    ),
    import_path="tests.pipeline.lineage_project:LINEAGE",
)


def write_lineage_conf(project_dir: Path, *, corpus_lines: int = 5) -> Path:
    """conf/lineage.yaml and the outside corpus file under ``project_dir``; returns the conf dir."""
    corpus = project_dir / "corpus.txt"
    corpus.write_text("\n".join("spam offer" if i % 3 == 0 else f"document {i}" for i in range(corpus_lines)))
    conf = project_dir / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "lineage.yaml").write_text(
        "run: {root: runs, only: [], from: null, force: [], lock_wait_s: 60, keep_going: true}\n"
        "tracking: {enabled: true, experiment: lineage}\ncluster: {executor: local, env: {}}\n"
        f"stage:\n  corpus: {{source: {corpus}}}\n  clean: {{drop: spam}}\n"
        + "".join(f"  {s}: {{scale: 1}}\n" for s in MODEL_STAGES) + "  evaluate: {outside_model: null}\n")
    return conf
