"""Executors run stage attempts somewhere and report back, through one interface (base.Executor):
local processes (``local``, pipeline/executors/local.py), or Slurm jobs submitted through submitit
(``slurm``, pipeline/executors/slurm.py)."""

from __future__ import annotations

from pathlib import Path

from pipeline.executors.base import Executor, Handle, JobState, Task
from pipeline.executors.local import LocalExecutor

__all__ = ["Executor", "Handle", "JobState", "LocalExecutor", "Task", "make_executor"]


def make_executor(cluster, root: Path | str = "runs") -> Executor:
    """The executor named by ``cluster.executor`` (a ClusterConfig; a bare name is taken as one);
    ``root`` is the run root, under which executors keep their task files."""
    from pipeline.config import ClusterConfig

    if isinstance(cluster, str):
        cluster = ClusterConfig(executor=cluster)
    if cluster.executor == "local":
        return LocalExecutor(Path(root))
    if cluster.executor == "slurm":
        from pipeline.executors.slurm import SlurmExecutor  # imports submitit: only when asked for

        return SlurmExecutor(cluster, Path(root))
    raise ValueError(f"unknown executor {cluster.executor!r}")
