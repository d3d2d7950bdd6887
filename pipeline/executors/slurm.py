"""Stages as Slurm jobs, submitted through submitit; the runner submits the whole DAG, then follows.

One stage attempt becomes:

- for a stage with ``shard_phases = ("signatures", "buckets")`` (and ``array_tasks = n > 1``): one job
  array of ``n`` tasks per phase, each task running its share of that named map over shards
  (pipeline/sharding.py), then
- one final job, which runs the stage as a local run does and **commits its output itself**
  (``pipeline.worker`` with a ``commit`` section), so that a downstream job chained with
  ``--dependency=afterok`` finds its inputs committed when it starts, whether or not the
  orchestrator still runs.

Every job runs ``python -m pipeline.worker task.json`` — the same entry point and the same commit
as the local executor — from a small callable that submitit pickles (:class:`StageJob`). The batch script runs
that callable directly on the first node of the allocation (``use_srun=False``): a multi-node
training stage then starts its ranks with ``srun`` from there (stages/common/launch.py), and the
batch shell ``exec``-s Python so that the time-limit signal (``--signal=B:USR2@...``) reaches
submitit, which stops the stage and requeues the job when the stage is resumable (it resumes from
its partial output; the job id, and so every ``afterok`` chained on it, stays).

The worker in every job holds the output's job lock on the shared file system while any of its
processes runs (shared by the tasks of an array, exclusive for the final job; pipeline/store.py),
where flock works there (NFSv4, Lustre mounted with flock; elsewhere it warns and goes on): a rerun
that no longer finds the jobs in the queue still waits for a straggler before a new attempt begins.

Where things are, for stage S at fingerprint F under the run root R:

    R/S/.slurm/S-F/                 submitit folder: sbatch scripts, pickles, Slurm's own stdout,
                                    task-<attempt>-<job>.json, jobs.json (the ids of the last submission)
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

from pipeline import sharding
from pipeline.config import ClusterConfig, SlurmResources
from pipeline.executors.base import JobState, Task
from pipeline.executors.slurm_queue import ACTIVE_STATES, JobRecord, SlurmError, base_id, sacct, scontrol_show, squeue
from pipeline.files import write_json_atomic
from pipeline.processes import child_env, die_with_parent, terminate_group
from pipeline.stage import FINAL_PHASE
from pipeline.store import LOG_FILE
from pipeline.worker import read_error

log = logging.getLogger("llmpipe.slurm")

FINAL = FINAL_PHASE  # the label of the job that commits; an array's label is its phase's name
JOBS_FILE = "jobs.json"
ARRAY_LOG_DIR = "_logs"
SIGNAL_LEAD_S = 120  # the stage gets this long between the time-limit signal and Slurm's kill
# Recorded into stage_info.json's "executor" section by the job that commits.
RECORD_ENV = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_JOB_PARTITION",
              "SLURM_JOB_ACCOUNT", "SLURM_JOB_QOS", "SLURM_CLUSTER_NAME", "SLURM_RESTART_COUNT")
class StageJobFailed(RuntimeError):
    """Raised inside a job when the stage process failed: submitit records it and the job fails."""


# ---------------------------------------------------------------- inside the job


class StageJob(Checkpointable):
    """What a Slurm job runs: ``python -m pipeline.worker TASK`` with its output in the stage log.

    ``shard_slice`` makes the process one array task (pipeline/sharding.py). On the time-limit
    signal, submitit calls :meth:`checkpoint`: the stage is stopped, and a resumable one is
    requeued to continue from its partial output.
    """

    def __init__(self, task_file: str, log_file: str, shard_slice: str | None, resumable: bool,
                 env: Mapping[str, str], cwd: str | None):
        self.task_file = task_file
        self.log_file = log_file
        self.shard_slice = shard_slice
        self.resumable = resumable
        self.env = dict(env)
        self.cwd = cwd
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._proc = None

    def __call__(self) -> str:
        env = child_env(self.env, pythonpath=[self.cwd] if self.cwd else ())
        env.pop(sharding.ENV, None)
        if self.shard_slice:
            env[sharding.ENV] = self.shard_slice
        log_file = Path(self.log_file)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as log:
            job = os.environ.get("SLURM_JOB_ID", "?")
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '?')}"
            where = f"Slurm job {job} on {os.uname().nodename}"
            part = f", array task {self.shard_slice}" if self.shard_slice else ""
            log.write(f"\n===== {where}{part} at {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
            log.flush()
            self._proc = subprocess.Popen([sys.executable, "-u", "-m", "pipeline.worker", self.task_file],
                                          stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd,
                                          start_new_session=True, preexec_fn=die_with_parent)
            try:
                returncode = self._proc.wait()
            except BaseException:  # the time-limit signal (requeue) or a cancellation
                self.stop()
                raise
        if returncode != 0:
            raise StageJobFailed(stage_error(self.task_file, returncode))
        return "ok"

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM the stage's process group (the worker forwards it to launchers and ranks), then SIGKILL."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        terminate_group(proc, grace_s)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission | None:
        """Called by submitit on the time-limit (or preemption) signal, before it requeues the job."""
        self.stop()
        with open(self.log_file, "a", encoding="utf-8") as log_file:
            log_file.write(f"===== time limit (or preemption) signal at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                           f"stage stopped; {'requeued to resume' if self.resumable else 'not resumable, not requeued'}"
                           " =====\n")
        if not self.resumable:
            return None  # submitit then fails the job: a restart would begin from scratch anyway
        return DelayedSubmission(StageJob(self.task_file, self.log_file, self.shard_slice, self.resumable,
                                          self.env, self.cwd))


def stage_error(task_file: str | Path, returncode: int) -> str:
    """The stage's own account of its failure (``_error.json``), else its exit status."""
    task = json.loads(Path(task_file).read_text())
    error = read_error(Path(task["output_dir"]))
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
        """One array per phase the stage may split (in its order), then the job that commits."""
        n = self.cfg.for_stage(stage).array_tasks or 1
        arrays = [JobSpec(phase, n, phase) for phase in phases] if n > 1 else []
        return [*arrays, JobSpec(FINAL)]

    def parameters(self, stage: str, spec: JobSpec, dependency: Sequence[str] = ()) -> dict[str, Any]:
        """submitit's parameters for one job of ``stage`` (the #SBATCH lines it writes)."""
        res: SlurmResources = self.cfg.for_stage(stage)
        params: dict[str, Any] = {
            "job_name": f"llmpipe.{stage}" + ("" if spec.label == FINAL else f".{spec.label}"),
            "time": res.time_min, "nodes": res.nodes, "ntasks_per_node": 1, "cpus_per_task": res.cpus_per_task,
            "use_srun": False, "stderr_to_stdout": True, "wckey": None,
            "signal_delay_s": SIGNAL_LEAD_S, "array_parallelism": self.cfg.array_parallelism,
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
        extra: dict[str, Any] = {"signal": f"B:USR2@{SIGNAL_LEAD_S}", "kill-on-invalid-dep": "yes"}
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
                if spec.tasks:
                    fns = [StageJob(str(task_file), str(task.output_dir / array_log(spec.phase, i)),
                                    sharding.ShardSlice(i, spec.tasks, spec.phase).encode(), resumable,
                                    task.env, cwd) for i in range(spec.tasks)]
                    job_id = ex.submit_array(fns)[0].job_id.split("_")[0]
                else:
                    job_id = ex.submit(StageJob(str(task_file), str(task.log_file), None, resumable,
                                                task.env, cwd)).job_id
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
