"""Executors run one stage attempt somewhere (a local process; Slurm later) and report back."""

from pipeline.executors.base import Executor, Task, TaskResult
from pipeline.executors.local import LocalExecutor

__all__ = ["Executor", "LocalExecutor", "Task", "TaskResult", "make_executor"]


def make_executor(kind: str) -> Executor:
    if kind == "local":
        return LocalExecutor()
    raise ValueError(f"unknown executor {kind!r}")
