from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Task:
    """One stage attempt, as handed to the worker (serialised to task.json)."""

    project: str  # import path of the Project
    stage: str
    fingerprint: str
    config: dict[str, Any]  # validated stage config as plain data
    output_dir: Path  # the partial dir
    inputs: Mapping[str, Path]
    attempt: int
    log_file: Path
    metrics_file: Path
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    # Set when the worker commits the output itself (batch executors): the store root, the stage_info
    # prepared by the orchestrator, and environment variables to record in it (job ids, nodes).
    commit: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        data = {
            "project": self.project, "stage": self.stage, "fingerprint": self.fingerprint,
            "config": self.config, "output_dir": str(self.output_dir),
            "inputs": {k: str(v) for k, v in self.inputs.items()}, "attempt": self.attempt,
            "metrics_file": str(self.metrics_file),
        }
        if self.commit is not None:
            data["commit"] = dict(self.commit)
        return data


@dataclass
class TaskResult:
    ok: bool
    metrics: dict[str, float]
    error: str = ""
    not_implemented: bool = False
    details: dict[str, Any] = field(default_factory=dict)  # executor facts for stage_info (pid, job id...)


class Executor(Protocol):
    def run(self, task: Task, on_tick: Callable[[], None]) -> TaskResult:
        """Run the task to completion, calling ``on_tick`` every second or so (metrics streaming)."""
        ...


@dataclass
class JobState:
    """Where one stage's jobs stand, as the scheduler sees them."""

    finished: bool  # every job of the stage has left the queue, or one failed
    ok: bool = False  # finished and every job completed
    state: str = "PENDING"  # the scheduler's word for the stage's furthest job (PENDING, RUNNING, FAILED...)
    reason: str = ""  # why it waits, or why it failed
    nodes: str = ""  # where it runs
    failed_job: str | None = None  # the job that failed


class BatchExecutor(Protocol):
    """An executor that hands jobs to a scheduler: the runner submits the whole DAG, chained by
    dependencies, then follows the jobs (see pipeline/runner.py, run_batch)."""

    poll_s: float

    def submit(self, task: Task, shard_phases: int, after: Sequence[str], resumable: bool = True) -> Any:
        """Queue the stage's jobs to start after the jobs ``after``; return a handle with ``.job_ids``,
        ``.final_id`` (the job that commits), ``.attempt``, ``.submitted_at`` and ``.log_files()``."""
        ...

    def poll(self, handles: Mapping[str, Any]) -> dict[str, JobState]:
        """The state of every handle (by stage name), from one look at the scheduler."""
        ...

    def active(self, stage: str, fingerprint: str) -> Any | None:
        """The handle of this output's last submission if its jobs are still queued (an earlier run's)."""
        ...

    def cancel(self, handles: Sequence[Any]) -> None:
        ...

    def job_output(self, handle: Any, job_id: str | None = None) -> str:
        """The end of the scheduler's own output file of a job (errors from before the stage started)."""
        ...
