"""Stage attempts as processes on this machine, scheduled like batch jobs.

The runner submits every attempt of a plan at once, each after the attempts it needs, exactly as
it does on Slurm; :meth:`LocalExecutor.poll` is the scheduler: it starts a queued job once every
job it depends on has completed, ``parallel`` at a time (one by default: a stage may use the
whole machine). A job whose dependency failed stays pending until the runner cancels it, as a
Slurm job chained with ``afterok`` would.

A job is ``python -u -m pipeline.worker TASK`` with its output appended to the stage's log,
which the runner follows and echoes; the worker commits the output itself. A child process keeps
heavy imports (torch, vllm) out of the orchestrator and lets the DeepSpeed launcher spawn its
ranks. It leads its own process group, so cancelling it is one signal to everything it started,
and it dies with the orchestrator (even one killed by SIGKILL; the worker's guard then stops
everything the stage started within about a second, pipeline/worker.py): no stage keeps writing
into a partial directory that a later run will resume, and the job lock it holds until then makes
that later run wait for it.

Jobs never outlive the orchestrator, so there is nothing to follow from an earlier run: a new run
resumes the partial output instead. Task files live in ``<root>/<stage>/.local/<stage>-<fp>/``.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.executors.base import JobState, Task
from pipeline.files import write_json_atomic
from pipeline.processes import child_env, die_with_parent, terminate_group
from pipeline.provenance import host
from pipeline.store import LOG_FILE
from pipeline.worker import STOP_GRACE_S as WORKER_STOP_GRACE_S

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED = "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"
# A cancelled stage's worker stops its processes within its own grace; SIGKILL to its group only after that.
STOP_GRACE_S = WORKER_STOP_GRACE_S + 5.0


@dataclass
class LocalJob:
    """One stage attempt: the handle the runner holds, and the executor's own record of it."""

    id: str
    task: Task
    task_file: Path
    after: tuple[str, ...]
    attempt: int
    submitted_at: float = field(default_factory=time.time)
    state: str = PENDING
    reason: str = ""
    proc: subprocess.Popen | None = None

    @property
    def job_ids(self) -> list[str]:
        return [self.id]

    @property
    def final_id(self) -> str:
        return self.id

    def log_files(self) -> dict[str, str]:
        return {"": LOG_FILE}


class LocalExecutor:
    """Runs queued stage attempts as child processes, ``parallel`` at a time, in submission order."""

    poll_s = 0.1  # a poll is a few syscalls: often, so that a chain of quick stages adds no seconds

    def __init__(self, root: Path, parallel: int = 1):
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {parallel}")
        self.root = Path(root)
        self.parallel = parallel
        self._jobs: dict[str, LocalJob] = {}  # by id, in submission order

    def folder(self, stage: str, fp: str) -> Path:
        return self.root / stage / ".local" / f"{stage}-{fp}"

    def submit(self, task: Task, after: Sequence[str], *, phases: tuple[str, ...] = (),
               resumable: bool = False) -> LocalJob:
        """Queue the attempt. ``phases`` do not matter here: a local run maps over every shard in
        its own process pool."""
        unknown = [i for i in after if i not in self._jobs]
        if unknown:
            raise ValueError(f"stage '{task.stage}': waits for jobs {unknown} that this executor never queued")
        folder = self.folder(task.stage, task.fingerprint)
        folder.mkdir(parents=True, exist_ok=True)
        task_file = folder / f"task-{task.attempt}.json"
        write_json_atomic(task_file, task.to_json(), indent=2, private=True)  # the config may hold secrets
        job = LocalJob(f"local-{len(self._jobs) + 1}", task, task_file, tuple(after), task.attempt)
        self._jobs[job.id] = job
        return job

    def active(self, stage: str, fingerprint: str) -> None:
        return None  # local jobs die with the orchestrator that started them

    # -- scheduling -----------------------------------------------------------------------------
    def poll(self, handles: Mapping[str, LocalJob]) -> dict[str, JobState]:
        self._schedule()
        return {name: self._state(job) for name, job in handles.items()}

    def _schedule(self) -> None:
        """Reap finished jobs, then start queued ones whose dependencies completed, up to ``parallel``."""
        for job in self._jobs.values():
            if job.state == RUNNING and job.proc is not None and job.proc.poll() is not None:
                self._finish(job, job.proc.returncode)
        running = sum(job.state == RUNNING for job in self._jobs.values())
        for job in self._jobs.values():
            if job.state != PENDING:
                continue
            deps = [self._jobs[i] for i in job.after]
            if any(d.state in (FAILED, CANCELLED) for d in deps):
                job.reason = "DependencyNeverSatisfied"
            elif any(d.state != COMPLETED for d in deps):
                job.reason = "Dependency"
            elif running >= self.parallel:
                job.reason = "Resources"  # waits for a running stage to end
            else:
                self._start(job)
                running += job.state == RUNNING

    def _start(self, job: LocalJob) -> None:
        task = job.task
        cwd = task.cwd
        try:
            with open(task.log_file, "ab") as log:
                log.write(f"\n===== {task.stage} attempt {task.attempt} at {time.strftime('%Y-%m-%d %H:%M:%S')} "
                          f"=====\n".encode())
                log.flush()
                job.proc = subprocess.Popen(
                    [sys.executable, "-u", "-m", "pipeline.worker", str(job.task_file)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                    env=child_env(task.env, pythonpath=[cwd] if cwd else ()),
                    start_new_session=True, preexec_fn=die_with_parent)
        except OSError as exc:  # no such interpreter, no room for the log...
            job.state, job.reason = FAILED, f"could not start the stage process: {exc}"
            return
        job.state, job.reason = RUNNING, f"pid {job.proc.pid}"

    def _finish(self, job: LocalJob, returncode: int) -> None:
        if returncode == 0:
            job.state, job.reason = COMPLETED, ""
            job.task_file.unlink(missing_ok=True)  # a failed attempt's stays, to rerun it by hand
            with contextlib.suppress(OSError):
                job.task_file.parent.rmdir()  # only when no failed attempt's task is left
        elif returncode < 0:
            job.state, job.reason = FAILED, f"stage process killed by signal {signal.Signals(-returncode).name}"
        else:
            job.state, job.reason = FAILED, f"stage process exited with status {returncode}"

    def _state(self, job: LocalJob) -> JobState:
        if job.state == PENDING:
            return JobState(False, state=PENDING, reason=job.reason)
        if job.state == RUNNING:
            return JobState(False, state=RUNNING, reason=job.reason, nodes=host())
        return JobState(True, ok=job.state == COMPLETED, state=job.state, reason=job.reason,
                        failed_job=None if job.state == COMPLETED else job.id)

    # -- stopping -------------------------------------------------------------------------------
    def cancel(self, handles: Sequence[LocalJob]) -> None:
        """Stop running jobs (their whole process group) and drop queued ones; waits until they are gone."""
        for job in handles:
            if job.state == RUNNING and job.proc is not None:
                terminate_group(job.proc, STOP_GRACE_S)
            if job.state in (PENDING, RUNNING):
                job.state, job.reason = CANCELLED, "cancelled"

    def job_output(self, handle: LocalJob, job_id: str | None = None) -> str:
        return ""  # everything the process wrote is in the stage log already
