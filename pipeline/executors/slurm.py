"""Stages as Slurm jobs, submitted through submitit; the runner submits the whole DAG, then follows.

One stage attempt becomes:

- for a stage with ``shard_phases = ("signatures", "buckets")`` (and ``array_tasks = n > 1``): one job
  array of ``n`` tasks per phase, each task running its share of that named map over shards
  (pipeline/sharding.py; a single phase, ``sharding.single("tokenizer")``, is an array of one task),
  each phase's jobs with the stage's resources or its own (``cluster.slurm.stages.<stage>.phases``), then
- one final job, which runs the stage as a local run does and **commits its output itself**
  (``pipeline.worker`` with a ``commit`` section), so that a downstream job chained with
  ``--dependency=afterok`` finds its inputs committed when it starts, whether or not the
  orchestrator still runs.

Every job runs ``python -m pipeline.worker task.json`` — the same entry point and the same commit
as the local executor — from a small callable that submitit pickles (:class:`StageJob`). The batch script runs
that callable directly on the first node of the allocation (``use_srun=False``): a multi-node
training stage then starts its ranks with ``srun`` from there (stages/common/launch.py), and the
batch shell ``exec``-s Python so that the time-limit signal (``--signal=B:USR2@<signal_lead_s>``)
reaches submitit, which calls :meth:`StageJob.checkpoint`. For a resumable stage, that asks the stage
to save (pipeline/save_request.py: a training stage saves at its next step boundary and exits),
waits for it up to the lead less a margin, stops what is left and requeues the job: the stage
resumes from its partial output, and the job id, so every ``afterok`` chained on it, stays. A stage
that is not resumable is stopped at once and its job fails; one that finishes while it is waited
for ends its job as a success.

The worker in every job holds the output's job lock on the shared file system while any of its
processes runs (shared by the tasks of an array, exclusive for the final job; pipeline/store.py),
where flock works there (NFSv4, Lustre mounted with flock; elsewhere it warns and goes on): a rerun
that no longer finds the jobs in the queue still waits for a straggler before a new attempt begins.

Where things are, for stage S at fingerprint F under the run root R:

    R/S/.slurm/S-F/                 submitit folder: sbatch scripts, pickles, Slurm's own stdout,
                                    task-<attempt>-<job>.json, jobs.json (the ids of the last submission),
                                    save-request-<job>.<restart> once a job attempt is asked to save
    R/S/.partial/S-F/stage.log      the final job's stage output (it moves with the commit)
    R/S/.partial/S-F/_logs/         one log per array task: <phase>-task<i>.log

The orchestrator only reads the queue: one ``squeue`` per poll for every job it follows; a job
that left the queue is looked up with ``scontrol show job`` (kept ``MinJobAge`` seconds), then
``sacct`` (the accounting database), then ``sacct --completion`` (the job completion log); those
queries are in pipeline/executors/slurm_queue.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from submitit.core.utils import DelayedSubmission
from submitit.helpers import Checkpointable
from submitit.slurm.slurm import SlurmExecutor as _SubmititSlurmExecutor
from submitit.slurm.slurm import _make_sbatch_string

from pipeline import save_request, sharding
from pipeline.config import ClusterConfig, SlurmResources
from pipeline.executors.base import JobState, Task
from pipeline.executors.slurm_queue import ACTIVE_STATES, JobRecord, SlurmError, base_id, sacct, scontrol_show, squeue
from pipeline.files import write_json_atomic
from pipeline.processes import child_env, die_with_parent, terminate_group
from pipeline.stage import FINAL_PHASE
from pipeline.store import LOG_FILE
from pipeline.worker import clear_error, read_error

log = logging.getLogger("llmpipe.slurm")

FINAL = FINAL_PHASE  # the label of the job that commits; an array's label is its phase's name
JOBS_FILE = "jobs.json"
ARRAY_LOG_DIR = "_logs"
SAVE_MARGIN_S = 30.0  # of the signal's lead, kept back to stop what is left and requeue (at most a third of it)
SIGNAL_EARLY_S = 90.0  # Slurm may signal up to 60 s early; the job started a little before the stage process
# Recorded into stage_info.json's "executor" section by the job that commits.
RECORD_ENV = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_JOB_PARTITION",
              "SLURM_JOB_ACCOUNT", "SLURM_JOB_QOS", "SLURM_CLUSTER_NAME", "SLURM_RESTART_COUNT")
class StageJobFailed(RuntimeError):
    """Raised inside a job when the stage process failed: submitit records it and the job fails."""


# ---------------------------------------------------------------- inside the job


@dataclass(frozen=True)
class TimeLimit:
    """What a job knows of its time limit: the limit, how long before it the signal comes, the requeues allowed."""

    limit_s: float  # the job's wall-clock limit (time_min)
    lead_s: float  # the signal comes this long before it (signal_lead_s)
    requeues: int  # how often a resumable stage is requeued after its time limit (requeue_timeouts)

    @property
    def margin_s(self) -> float:
        """The end of the lead, kept to stop what is left of the stage and to requeue before Slurm's kill."""
        return min(SAVE_MARGIN_S, self.lead_s / 3)

    @property
    def wait_s(self) -> float:
        """How long the stage has to save and exit after the signal."""
        return self.lead_s - self.margin_s


class _FinishedMeanwhile(Exception):  # noqa: N818 - a verdict, not an error
    """Raised from the signal handler into :meth:`StageJob.__call__`: the stage ended well while it was waited for."""


class StageJob(Checkpointable):
    """What a Slurm job runs: ``python -m pipeline.worker TASK`` with its output in the stage log.

    ``shard_slice`` makes the process one array task (pipeline/sharding.py). On the time-limit
    signal, submitit calls :meth:`checkpoint`: a resumable stage is asked to save and stop (the file
    named by ``LLMPIPE_SAVE_REQUEST``), then stopped and requeued to continue from its partial output.
    ``limit`` (None: unknown) bounds that wait and counts the time limits: submitit's own count takes a
    signal that comes more than 10 minutes before the limit for a preemption, so it never runs out.
    """

    def __init__(self, task_file: str, log_file: str, shard_slice: str | None, resumable: bool,
                 env: Mapping[str, str], cwd: str | None, *, limit: TimeLimit | None = None, timeouts: int = 0):
        self.task_file = task_file
        self.log_file = log_file
        self.shard_slice = shard_slice
        self.resumable = resumable
        self.env = dict(env)
        self.cwd = cwd
        self.limit = limit
        self.timeouts = timeouts  # time limits this job reached before, each followed by a requeue
        self._proc: subprocess.Popen | None = None
        self._started = time.monotonic()
        self._request: Path | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_proc", "_started", "_request")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"limit": None, "timeouts": 0, **state})  # a job submitted by an older llmpipe
        self._proc, self._started, self._request = None, time.monotonic(), None

    def __call__(self) -> str:
        env = child_env(self.env, pythonpath=[self.cwd] if self.cwd else ())
        env.pop(sharding.ENV, None)
        if self.shard_slice:
            env[sharding.ENV] = self.shard_slice
        restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        self._started = time.monotonic()
        self._request = save_request_file(self.task_file)
        save_request.withdraw(self._request)  # each attempt of the job starts without one
        env[save_request.ENV] = str(self._request)
        if restart and not self.shard_slice:
            clear_error(_output_dir(self.task_file))  # "saved at step N" is the last attempt's end, not this one's
        log_file = Path(self.log_file)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as log:
            where = f"Slurm job {_job_id()} on {os.uname().nodename}"
            part = f", array task {self.shard_slice}" if self.shard_slice else ""
            again = f", requeued {restart} time(s)" if restart else ""
            log.write(f"\n===== {where}{part}{again} at {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
            log.flush()
            self._proc = subprocess.Popen([sys.executable, "-u", "-m", "pipeline.worker", self.task_file],
                                          stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd,
                                          start_new_session=True, preexec_fn=die_with_parent)
            try:
                returncode = self._proc.wait()
            except _FinishedMeanwhile:
                returncode = 0
            except BaseException:  # the time-limit signal (requeue) or a cancellation
                self.stop()
                raise
        if returncode != 0:
            raise StageJobFailed(stage_error(self.task_file, returncode))
        return "ok"

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM the stage's process group (the worker forwards it to launchers and ranks), then SIGKILL."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        terminate_group(proc, grace_s)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission | None:
        """Called by submitit on the time-limit (or preemption) signal, before it requeues the job.

        It runs in the signal handler, which interrupted :meth:`__call__` waiting for the stage. A
        resumable stage is asked to save and given the lead, less a margin, to exit; one that ends
        well meanwhile ends the job as a success (:class:`_FinishedMeanwhile`, raised into
        ``__call__``: a requeue would run the committed stage again). What is left is then stopped.
        """
        timed_out = self._timed_out()
        grace = min(60.0, self.limit.lead_s / 2) if self.limit else 60.0  # SIGTERM to SIGKILL, within the lead
        saved = ""
        if self.resumable and self.limit and self._request and self._proc:
            status = self._save_and_wait()
            if status == 0:
                self._say("the stage finished while it was waited for: the job ends here, not requeued")
                raise _FinishedMeanwhile
            saved = "the stage exited; " if status is not None else "the stage did not exit in time; "
            grace = self.limit.margin_s / 2
        self.stop(grace)
        if not self.resumable:
            self._say(f"time limit (or preemption) signal at {time.strftime('%Y-%m-%d %H:%M:%S')}: stage stopped; "
                      "not resumable, not requeued")
            return None  # submitit then fails the job: a restart would begin from scratch anyway
        if timed_out and self.limit and self.timeouts >= self.limit.requeues:
            self._say(f"{saved}stage stopped; not requeued: this is its time limit number {self.timeouts + 1} "
                      f"(cluster.slurm.requeue_timeouts={self.limit.requeues})")
            return None
        self._say(f"{saved}stage stopped; requeued to resume")
        return DelayedSubmission(StageJob(self.task_file, self.log_file, self.shard_slice, self.resumable,
                                          self.env, self.cwd, limit=self.limit,
                                          timeouts=self.timeouts + int(timed_out)))

    def _timed_out(self) -> bool:
        """Whether the signal is the time limit's (not a preemption's): it came within the lead of the limit."""
        if self.limit is None:
            return True
        return time.monotonic() - self._started >= self.limit.limit_s - self.limit.lead_s - SIGNAL_EARLY_S

    def _save_and_wait(self) -> int | None:
        """Ask the stage to save (the request file) and wait for it to exit, up to the lead less the margin:
        its exit status, or None while it still runs."""
        assert self.limit is not None and self._request is not None
        save_request.request(self._request, f"time-limit signal to Slurm job {_job_id()}")
        self._say(f"time-limit signal at {time.strftime('%Y-%m-%d %H:%M:%S')}: save requested ({self._request}); "
                  f"waiting up to {self.limit.wait_s:.0f} s for the stage to save and exit")
        deadline = time.monotonic() + self.limit.wait_s
        while (status := self._exit_status()) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        return status

    def _exit_status(self) -> int | None:
        """The stage process's exit status once it ended, reaped here: Popen's own wait, which this signal
        handler interrupted, holds the lock that poll() needs."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return None if proc is None else proc.returncode
        try:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: it ended, its status is lost
            return -1
        if pid == 0:
            return None
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode

    def _say(self, what: str) -> None:
        """A line in the stage log, between the stage's own; in Slurm's output file of the job once the log
        moved with the committed output (opened without creating its folder: a partial dir is never revived)."""
        line = f"===== {what} =====\n"
        try:
            with open(self.log_file, "a", encoding="utf-8") as log_file:
                log_file.write(line)
        except OSError:
            sys.stderr.write(line)


def save_request_file(task_file: str | Path) -> Path:
    """The save-request file of this job attempt (pipeline/save_request.py), beside its task file on the
    shared file system: one per job (array task) and restart."""
    restart = os.environ.get("SLURM_RESTART_COUNT") or "0"
    return Path(task_file).parent / f"save-request-{_job_id()}.{restart}"


def _job_id() -> str:
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '?')}"
    return os.environ.get("SLURM_JOB_ID") or f"pid{os.getpid()}"


def _output_dir(task_file: str | Path) -> Path:
    return Path(json.loads(Path(task_file).read_text())["output_dir"])


def stage_error(task_file: str | Path, returncode: int) -> str:
    """The stage's own account of its failure (``_error.json``), else its exit status."""
    error = read_error(_output_dir(task_file))
    if error:
        return error
    if returncode < 0:
        return f"stage process killed by signal {signal.Signals(-returncode).name}"
    return f"stage process exited with status {returncode}"


# ---------------------------------------------------------------- submission


class _Submitit(_SubmititSlurmExecutor):
    """submitit's Slurm executor, with two changes.

    The batch shell ``exec``-s Python, so the batch-step signal (``B:USR2``) reaches submitit's
    handler. And it can be built where Slurm is not installed, to render scripts for ``llmpipe plan``
    (submitting still needs ``sbatch``).
    """

    @classmethod
    def affinity(cls) -> int:
        return 2

    @property
    def _submitit_command_str(self) -> str:
        return "exec " + super()._submitit_command_str

    def render(self, map_count: int | None) -> str:
        """The sbatch script this executor submits (for an array of ``map_count`` tasks)."""
        params = dict(self.parameters)
        if map_count:
            params["map_count"] = map_count  # what submitit sets on its copy of the executor for an array
        return _make_sbatch_string(command=self._submitit_command_str, folder=self.folder, **params)


@dataclass(frozen=True)
class JobSpec:
    """One sbatch submission of a stage attempt."""

    label: str  # the phase's name for its array, "final" for the job that commits
    tasks: int | None = None  # array size; None: a single job
    phase: str | None = None  # the map over shards an array splits


@dataclass
class Submitted:
    """The jobs of one stage attempt, in submission order (arrays first, the final job last)."""

    stage: str
    fingerprint: str
    attempt: int
    folder: Path
    jobs: list[dict[str, Any]]  # {"label", "id", "tasks", "phase"}
    submitted_at: float = field(default_factory=time.time)

    @property
    def job_ids(self) -> list[str]:
        return [j["id"] for j in self.jobs]

    @property
    def final_id(self) -> str:
        return self.jobs[-1]["id"]

    def log_files(self) -> dict[str, str]:
        """Console prefix -> log path relative to the stage's output dir."""
        logs = {"": LOG_FILE}
        for job in self.jobs:
            for i in range(job.get("tasks") or 0):
                logs[f"#{job['phase']}.{i}"] = array_log(job["phase"], i)  # [dedup#signatures.1] on the console
        return logs

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "fingerprint": self.fingerprint, "attempt": self.attempt,
                "jobs": self.jobs, "submitted_at": self.submitted_at}

    @classmethod
    def from_json(cls, folder: Path, data: Mapping[str, Any]) -> Submitted:
        return cls(data["stage"], data["fingerprint"], data["attempt"], folder, list(data["jobs"]),
                   data["submitted_at"])


def array_log(phase: str, index: int) -> str:
    return f"{ARRAY_LOG_DIR}/{phase}-task{index}.log"


class SlurmExecutor:
    """Submits stage attempts as Slurm jobs and reads their state from the queue."""

    def __init__(self, cluster: ClusterConfig, root: Path):
        self.cluster = cluster
        self.cfg = cluster.slurm
        self.root = Path(root)
        self.poll_s = self.cfg.poll_s
        self._terminal: dict[str, JobRecord] = {}  # job (or array task) id -> its final record, never asked again
        self._ended: set[str] = set()  # jobs and whole arrays whose every record is final

    # -- what would be submitted ------------------------------------------------------------------
    def folder(self, stage: str, fp: str) -> Path:
        return self.root / stage / ".slurm" / f"{stage}-{fp}"

    def specs(self, stage: str, phases: tuple[str, ...]) -> list[JobSpec]:
        """One array per phase the stage may split (in its order; a single phase's has one task), then the
        job that commits. With ``array_tasks`` 1 the stage runs whole in that job; a phase may set its own."""
        if (self.cfg.for_stage(stage).array_tasks or 1) <= 1:
            return [JobSpec(FINAL)]
        arrays = [JobSpec(phase, sharding.tasks_of(phase, self.cfg.for_stage(stage, phase).array_tasks or 1), phase)
                  for phase in phases]
        return [*arrays, JobSpec(FINAL)]

    def parameters(self, stage: str, spec: JobSpec, dependency: Sequence[str] = ()) -> dict[str, Any]:
        """submitit's parameters for one job of ``stage`` (the #SBATCH lines it writes)."""
        res: SlurmResources = self.cfg.for_stage(stage, spec.label)
        params: dict[str, Any] = {
            "job_name": f"llmpipe.{stage}" + ("" if spec.label == FINAL else f".{spec.label}"),
            "time": res.time_min, "nodes": res.nodes, "ntasks_per_node": 1, "cpus_per_task": res.cpus_per_task,
            "use_srun": False, "stderr_to_stdout": True, "wckey": None,
            "signal_delay_s": res.signal_lead_s, "array_parallelism": self.cfg.array_parallelism,
        }
        for key in ("partition", "account", "qos"):
            if getattr(res, key):
                params[key] = getattr(res, key)
        if res.gpus_per_node:
            params["gpus_per_node"] = res.gpus_per_node
        if res.mem_gb:
            params["mem"] = f"{res.mem_gb:g}G" if float(res.mem_gb).is_integer() else f"{round(res.mem_gb * 1024)}M"
        if dependency:
            params["dependency"] = "afterok:" + ":".join(dependency)
        # B: the time-limit signal goes to the batch shell, which is submitit's Python after `exec`.
        extra: dict[str, Any] = {"signal": f"B:USR2@{res.signal_lead_s}", "kill-on-invalid-dep": "yes"}
        if res.container_image:
            extra["container-image"] = res.container_image
            if self.cfg.container_mounts:
                extra["container-mounts"] = ",".join(self.cfg.container_mounts)
            if self.cfg.container_workdir:
                extra["container-workdir"] = self.cfg.container_workdir
        extra.update({k.replace("_", "-"): v for k, v in res.sbatch.items()})
        params["additional_parameters"] = extra
        setup = list(self.cfg.setup)
        if res.nodes > 1:  # srun (launch.py) must give each node's launcher the job's CPUs (Slurm >= 22.05)
            setup.append("export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK")
        if setup:
            params["setup"] = setup
        return params

    def time_limit(self, stage: str, spec: JobSpec) -> TimeLimit:
        """What the jobs of ``spec`` know of their time limit (StageJob.checkpoint)."""
        res = self.cfg.for_stage(stage, spec.label)
        return TimeLimit(res.time_min * 60, res.signal_lead_s, self.cfg.requeue_timeouts)

    def _submitit(self, stage: str, fp: str, spec: JobSpec, dependency: Sequence[str]) -> _Submitit:
        ex = _Submitit(self.folder(stage, fp), max_num_timeout=self.cfg.requeue_timeouts, python=self.cfg.python)
        ex.update_parameters(**self.parameters(stage, spec, dependency))
        return ex

    def render(self, stage: str, fp: str, phases: tuple[str, ...], after: Sequence[str]) -> list[tuple[JobSpec, str]]:
        """The sbatch scripts of one stage attempt, as ``llmpipe plan`` prints them.

        Job ids exist only once submitted: a dependency names the job it waits for as
        ``<stage>_<job>_jobid`` (``tokenize_final_jobid``) where the real script has the number.
        """
        out = []
        deps = list(after)
        for spec in self.specs(stage, phases):
            ex = self._submitit(stage, fp, spec, deps)
            out.append((spec, ex.render(spec.tasks)))
            deps = [f"{stage}_{spec.label}_jobid"]
        return out

    def placeholder(self, stage: str) -> str:
        return f"{stage}_{FINAL}_jobid"

    # -- submitting ---------------------------------------------------------------------------------
    def submit(self, task: Task, after: Sequence[str], *, phases: tuple[str, ...] = (),
               resumable: bool = False) -> Submitted:
        """Queue the stage's jobs (one array per phase, then the final job), each after the previous one."""
        folder = self.folder(task.stage, task.fingerprint)
        folder.mkdir(parents=True, exist_ok=True)
        jobs: list[dict[str, Any]] = []
        deps = list(after)
        cwd = str(task.cwd) if task.cwd else None
        for spec in self.specs(task.stage, phases):
            data = task.to_json()
            if spec.label != FINAL:
                data.pop("commit")  # array tasks never commit
            else:  # the committing job records the arrays it waited for
                commit = dict(data["commit"], record_env=list(RECORD_ENV))
                info = dict(commit["info"])
                info["executor"] = {**info.get("executor", {}), "array_job_ids": [j["id"] for j in jobs],
                                    "submitted_at": time.time()}
                commit["info"] = info
                data["commit"] = commit
            task_file = folder / f"task-{task.attempt}-{spec.label}.json"
            write_json_atomic(task_file, data, indent=2, private=True)  # read by the job (same user); may hold secrets
            ex = self._submitit(task.stage, task.fingerprint, spec, deps)
            try:
                limit = self.time_limit(task.stage, spec)
                if spec.tasks:
                    fns = [StageJob(str(task_file), str(task.output_dir / array_log(spec.phase, i)),
                                    sharding.ShardSlice(i, spec.tasks, spec.phase).encode(), resumable,
                                    task.env, cwd, limit=limit) for i in range(spec.tasks)]
                    job_id = ex.submit_array(fns)[0].job_id.split("_")[0]
                else:
                    job_id = ex.submit(StageJob(str(task_file), str(task.log_file), None, resumable,
                                                task.env, cwd, limit=limit)).job_id
            except Exception as exc:  # sbatch missing or refusing: a named error with Slurm's words
                if jobs:
                    self.cancel_ids([j["id"] for j in jobs])
                raise SlurmError(f"stage '{task.stage}': sbatch failed for its {spec.label} job: {exc}") from None
            jobs.append({"label": spec.label, "id": job_id, "tasks": spec.tasks, "phase": spec.phase})
            deps = [job_id]
        sub = Submitted(task.stage, task.fingerprint, task.attempt, folder, jobs)
        write_json_atomic(folder / JOBS_FILE, sub.to_json(), indent=2)
        return sub

    def recorded(self, stage: str, fp: str) -> Submitted | None:
        """The last submission of this output (from its jobs.json), if any."""
        path = self.folder(stage, fp) / JOBS_FILE
        if not path.is_file():
            return None
        return Submitted.from_json(path.parent, json.loads(path.read_text()))

    def active(self, stage: str, fp: str) -> Submitted | None:
        """The last submission of this output if one of its jobs is still queued or running."""
        sub = self.recorded(stage, fp)
        if sub is None:
            return None
        queued = squeue(sub.job_ids)
        return sub if any(base_id(j) in {base_id(i) for i in sub.job_ids} for j in queued) else None

    # -- following ----------------------------------------------------------------------------------
    def poll(self, handles: Mapping[str, Submitted]) -> dict[str, JobState]:
        """Where every stage's jobs stand: one squeue for all of them, a lookup for each that left."""
        ids = [i for sub in handles.values() for i in sub.job_ids if i not in self._ended]
        queued = squeue(ids) if ids else {}
        by_base: dict[str, list[JobRecord]] = {}
        for rec in queued.values():
            by_base.setdefault(base_id(rec.id), []).append(rec)
        return {name: self._stage_state(sub, by_base) for name, sub in handles.items()}

    def _stage_state(self, sub: Submitted, queued: dict[str, list[JobRecord]]) -> JobState:
        for job in sub.jobs:
            records = queued.get(job["id"])
            if records:  # still queued: the stage is as far as this job
                running = [r for r in records if r.state == "RUNNING"]
                lead = running[0] if running else records[0]
                detail = f"{len(running)} of {job['tasks']} tasks running" if job.get("tasks") else ""
                return JobState(False, state=lead.state, reason=detail or lead.reason, nodes=lead.nodes)
            finals = self._finished(job["id"])
            if finals is None:
                return JobState(False, state="UNKNOWN", reason=f"job {job['id']} is neither queued nor recorded yet")
            bad = [r for r in finals if r.state != "COMPLETED"]
            if job.get("tasks") and not bad and len(finals) < job["tasks"]:
                return JobState(False, state="UNKNOWN", reason=f"{len(finals)} of {job['tasks']} array tasks recorded")
            if bad:
                r = bad[0]
                return JobState(True, ok=False, state=r.state, reason=r.describe(), nodes=r.nodes, failed_job=r.id)
        last = self._terminal.get(sub.final_id)
        return JobState(True, ok=True, state="COMPLETED", nodes=last.nodes if last else "")

    def _finished(self, job_id: str) -> list[JobRecord] | None:
        """Terminal records of a job (every task of an array), or None when Slurm has none yet."""
        cached = [r for k, r in self._terminal.items() if base_id(k) == job_id]
        if cached:
            return cached
        records = scontrol_show(job_id) or sacct(job_id) or sacct(job_id, completion=True)
        if not records or any(r.state in ACTIVE_STATES for r in records):
            return None
        for r in records:
            self._terminal[r.id] = r
        self._ended.add(job_id)
        return records

    def cancel(self, handles: Sequence[Submitted]) -> None:
        self.cancel_ids([i for sub in handles for i in sub.job_ids])

    def cancel_ids(self, ids: Sequence[str]) -> None:
        """scancel (arrays whole); never raises: it runs while a run is being torn down."""
        if not ids:
            return
        try:
            proc = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("could not cancel jobs %s: %s", " ".join(ids), exc)
            return
        if proc.returncode != 0 and proc.stderr.strip():
            log.warning("scancel %s: %s", " ".join(ids), proc.stderr.strip())

    def job_output(self, sub: Submitted, job_id: str | None = None, lines: int = 40) -> str:
        """The end of Slurm's own output file for a job (errors from before the stage started)."""
        job_id = job_id or sub.final_id
        base, _, index = job_id.partition("_")
        name = f"{base}_{index}_0_log.out" if index else f"{base}_0_log.out"
        path = sub.folder / name
        if not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def preflight(self, stages: Sequence[str]) -> None:
        """Before the runner submits ``stages``: refuse GPU stages whose jobs would run a CPU-only torch
        (CpuOnlyInterpreter; pipeline/executors/interpreter.py)."""
        from pipeline.executors.interpreter import check_gpu_interpreters

        check_gpu_interpreters(self.cfg, stages)
