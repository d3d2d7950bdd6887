"""What the runner hands an executor, and what it asks of one.

Every executor is a small scheduler client: the runner submits every stage attempt of a plan at
once, each chained to the attempts it needs (``after``), then polls until each has finished. The
job itself commits its output (``pipeline.worker`` with the task's ``commit`` section), so what
the runner sees when a job completes is a committed output or a failure, whichever executor ran it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Task:
    """One stage attempt, as handed to the worker (serialised to its task file)."""

    project: str  # import path of the Project
    stage: str
    fingerprint: str
    config: dict[str, Any]  # validated stage config as plain data
    output_dir: Path  # the partial dir
    inputs: Mapping[str, Path]
    attempt: int
    log_file: Path
    metrics_file: Path
    # The store root, the stage_info prepared by the orchestrator, and environment variables to
    # record in it (job ids, nodes): the worker completes the info and commits the output.
    commit: Mapping[str, Any]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    # The output's job lock (pipeline/store.py): the worker holds it until all its processes are gone.
    job_lock: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "project": self.project, "stage": self.stage, "fingerprint": self.fingerprint,
            "config": self.config, "output_dir": str(self.output_dir),
            "inputs": {k: str(v) for k, v in self.inputs.items()}, "attempt": self.attempt,
            "metrics_file": str(self.metrics_file), "commit": dict(self.commit),
            "job_lock": str(self.job_lock) if self.job_lock else None,
        }


@dataclass
class JobState:
    """Where one stage's jobs stand, as the scheduler sees them."""

    finished: bool  # every job of the stage has left the queue, or one failed
    ok: bool = False  # finished and every job completed
    state: str = "PENDING"  # the scheduler's word for the stage's furthest job (PENDING, RUNNING, FAILED...)
    reason: str = ""  # why it waits, or why it failed
    nodes: str = ""  # where it runs
    failed_job: str | None = None  # the job that failed


class Handle(Protocol):
    """An executor's record of one stage attempt's jobs."""

    attempt: int
    submitted_at: float

    @property
    def job_ids(self) -> list[str]: ...

    @property
    def final_id(self) -> str:
        """The job that commits: what a dependent stage's jobs wait for."""
        ...

    def log_files(self) -> dict[str, str]:
        """Console prefix -> log path relative to the stage's output dir ("" -> stage.log)."""
        ...


class Executor(Protocol):
    """Runs stage attempts somewhere: local processes, Slurm jobs (see pipeline/runner.py)."""

    poll_s: float  # seconds between two polls

    def submit(self, task: Task, after: Sequence[str], *, phases: tuple[str, ...] = (),
               resumable: bool = False) -> Handle:
        """Queue the stage's jobs to start after the jobs ``after`` completed (the final ids of other
        handles); ``phases`` are the maps over shards it may split into job arrays first."""
        ...

    def poll(self, handles: Mapping[str, Handle]) -> dict[str, JobState]:
        """The state of every handle (by stage name), from one look at the scheduler. A job whose
        dependency failed stays pending until cancelled."""
        ...

    def active(self, stage: str, fingerprint: str) -> Handle | None:
        """The handle of this output's last submission if its jobs are still queued (an earlier run's)."""
        ...

    def cancel(self, handles: Sequence[Handle]) -> None:
        """Cancel the jobs (queued or running); never raises."""
        ...

    def job_output(self, handle: Handle, job_id: str | None = None) -> str:
        """The end of the scheduler's own output of a job (errors from before the stage started), or ""."""
        ...
