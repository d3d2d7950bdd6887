"""The llmpipe orchestrator: stage specs, typed configs, fingerprints, the DAG, the artifact
store, the runner, executors and tracking. Nothing in this package knows about LLMs; the stages
live in the sibling package ``stages`` and are handed to it as a :class:`Project`.

What a stage may use (the public API; everything else is the orchestrator's own business):

- this module: :class:`Stage`, :class:`StageContext`, :class:`Project`, the named errors, and for
  config dataclasses :class:`Invalid`, :func:`one_or_many`, :func:`to_plain`;
- ``pipeline.errors`` (the same errors), ``pipeline.files`` (atomic writes, manifests of checkpoints),
  ``pipeline.processes`` (process groups, die-with-parent, the child environment),
  ``pipeline.inputs`` (plan-time checks of outside input files, for ``Stage.preflight``);
- ``pipeline.sharding``, through ``stages.common.shards.map_shards(..., phase=...)``.

Stages never import ``pipeline.plan``, ``pipeline.config``, the runner or the executors.
"""

from pipeline.errors import (
    ConfigError,
    CycleError,
    DagError,
    DuplicateProducerError,
    LlmpipeError,
    MissingInputError,
    StageFailed,
)
from pipeline.schema import Invalid, one_or_many, to_plain
from pipeline.stage import Project, Stage, StageContext

__all__ = [
    "ConfigError",
    "CycleError",
    "DagError",
    "DuplicateProducerError",
    "Invalid",
    "LlmpipeError",
    "MissingInputError",
    "Project",
    "Stage",
    "StageContext",
    "StageFailed",
    "one_or_many",
    "to_plain",
]
