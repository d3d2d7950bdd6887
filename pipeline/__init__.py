"""The llmpipe orchestrator: stage specs, typed configs, fingerprints, the DAG, the artifact
store, the runner, executors and tracking. Nothing in this package knows about LLMs; the stages
live in the sibling package ``stages`` and are handed to it as a :class:`Project`."""

from pipeline.errors import (
    ConfigError,
    CycleError,
    DagError,
    DuplicateProducerError,
    LlmpipeError,
    MissingInputError,
    StageFailed,
    StageNotImplemented,
)
from pipeline.stage import Project, Stage, StageContext

__all__ = [
    "ConfigError",
    "CycleError",
    "DagError",
    "DuplicateProducerError",
    "LlmpipeError",
    "MissingInputError",
    "Project",
    "Stage",
    "StageContext",
    "StageFailed",
    "StageNotImplemented",
]
