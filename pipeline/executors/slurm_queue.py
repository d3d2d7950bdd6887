"""What Slurm says about jobs: the queue (``squeue``), a job that just left it (``scontrol show
job``, kept ``MinJobAge`` seconds), the accounting database (``sacct``) and the job completion log
(``sacct --completion``). Read-only; pipeline/executors/slurm.py decides what the answers mean."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.errors import LlmpipeError, SchedulerUnavailable

# The states of a job that has not ended yet.
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT", "STOPPED",
                 "PREEMPTED"}


class SlurmError(LlmpipeError):
    """Slurm refused a submission or could not be queried."""


@dataclass(frozen=True)
class JobRecord:
    id: str  # "123", or "123_4" for an array task
    state: str
    reason: str = ""
    exit_code: str = ""
    nodes: str = ""

    def describe(self) -> str:
        parts = [f"Slurm job {self.id} {self.state}"]
        detail = [p for p in (self.reason if self.reason not in ("None", "") else "",
                              f"exit {self.exit_code}" if self.exit_code not in ("", "0:0") else "") if p]
        if detail:
            parts.append(f"({', '.join(detail)})")
        if self.nodes and self.nodes != "(null)":
            parts.append(f"on {self.nodes}")
        return " ".join(parts)


def base_id(job_id: str) -> str:
    return job_id.split("_")[0]


def _run(cmd: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmError(f"'{cmd[0]}' is not installed here: cluster.executor=slurm needs the Slurm client "
                         "commands on the machine that runs the pipeline") from None
    except subprocess.TimeoutExpired:
        return None


def squeue(ids: Sequence[str]) -> dict[str, JobRecord]:
    """Jobs (array tasks one by one) still in the queue, by id.

    Raises SchedulerUnavailable when squeue itself fails: an empty answer must mean "not queued".
    """
    proc = _run(["squeue", "-h", "-r", "-j", ",".join(sorted({base_id(i) for i in ids})), "-o", "%i|%T|%r|%N"])
    if proc is None:
        raise SchedulerUnavailable("squeue did not answer within 120 s")
    out: dict[str, JobRecord] = {}
    if proc.returncode != 0:
        if "Invalid job id" not in proc.stderr:
            raise SchedulerUnavailable(f"squeue failed: {proc.stderr.strip()}")
        if len(ids) > 1:  # one id Slurm already forgot fails the whole call: ask job by job
            for i in ids:
                out.update(squeue([i]))
        return out
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            reason = "" if parts[2] == "None" else parts[2]
            out[parts[0]] = JobRecord(parts[0], parts[1], reason, "", parts[3])
    return out


def scontrol_show(job_id: str) -> list[JobRecord]:
    """Every record ``scontrol show job`` has for a job or array (until MinJobAge after it ends)."""
    proc = _run(["scontrol", "show", "job", "-o", job_id])
    if proc is None or proc.returncode != 0:
        return []
    records = []
    for line in proc.stdout.splitlines():
        kv = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobState" not in kv:
            continue
        task = kv.get("ArrayTaskId", "")
        rid = f"{kv['ArrayJobId']}_{task}" if kv.get("ArrayJobId") and task.isdigit() else kv.get("JobId", job_id)
        records.append(JobRecord(rid, kv["JobState"], kv.get("Reason", ""), kv.get("ExitCode", ""),
                                 kv.get("NodeList", "")))
    return records


def sacct(job_id: str, completion: bool = False) -> list[JobRecord]:
    """The accounting record of a job (``completion``: Slurm's job completion log instead)."""
    cmd = ["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode,NodeList"]
    cmd[1:1] = ["-c"] if completion else ["-X"]
    proc = _run(cmd)
    if proc is None or proc.returncode != 0:
        return []
    records = []
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and "." not in parts[0]:
            state = parts[1].split()[0]  # "CANCELLED by 0"
            records.append(JobRecord(parts[0], state, "", parts[2], parts[3]))
    return records
