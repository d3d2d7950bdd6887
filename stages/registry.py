"""The explicit registry: the one place that knows every stage, in lifecycle order."""

from pipeline import Project
from stages import align, dedup, evaluate, ingest, pii, pretrain, quality, quantize, serve, sft, tokenize
from stages.shared import DataConfig, ModelConfig

PROJECT = Project(
    name="llmpipe",
    stages=tuple(m.STAGE for m in (ingest, dedup, quality, pii, tokenize, pretrain, sft, align, quantize,
                                   serve, evaluate)),
    import_path="stages.registry:PROJECT",
    shared={"model": ModelConfig, "data": DataConfig},
)
