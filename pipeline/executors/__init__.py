"""Executors run stage attempts somewhere and report back: a local process (``local``), or Slurm
jobs submitted through submitit (``slurm``, pipeline/executors/slurm.py)."""

from __future__ import annotations

from pathlib import Path

from pipeline.executors.base import BatchExecutor, Executor, JobState, Task, TaskResult
from pipeline.executors.local import LocalExecutor

__all__ = ["BatchExecutor", "Executor", "JobState", "LocalExecutor", "Task", "TaskResult", "make_executor"]


def make_executor(cluster, root: Path | None = None) -> Executor | BatchExecutor:
    """The executor named by ``cluster.executor`` (a ClusterConfig; a bare name is taken as one)."""
    from pipeline.config import ClusterConfig

    if isinstance(cluster, str):
        cluster = ClusterConfig(executor=cluster)
    if cluster.executor == "local":
        return LocalExecutor()
    if cluster.executor == "slurm":
        from pipeline.executors.slurm import SlurmExecutor  # imports submitit: only when asked for

        return SlurmExecutor(cluster, Path(root or "runs"))
    raise ValueError(f"unknown executor {cluster.executor!r}")
