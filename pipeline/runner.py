"""Run a plan: cached stages skipped, every other stage submitted to the executor, followed to its
end and tracked. A failed stage blocks its descendants and nothing else.

One loop serves every executor (pipeline/executors): every stage that must run is submitted at
once, each after the jobs of the stages it needs (a local executor starts a job when its
dependencies completed; Slurm chains them with ``afterok``), and the job commits its own output.
The runner then only follows: it streams the jobs' logs and metrics, records outcomes and tracking,
cancels what a failure makes pointless, and cancels everything it submitted when it is interrupted
(Ctrl-C, SIGTERM).

A stage's output lock is taken when it is submitted and held until its jobs have ended, so a
second run waits for them instead of producing the same output twice, then finds it committed.
A run that finds an output's jobs still queued from an earlier, vanished run (Slurm) follows
those jobs instead of submitting new ones. Otherwise it also waits for the output's job lock before
a new attempt begins: the stage's worker holds it until its last process is gone (pipeline/worker.py),
so no attempt writes beside the processes of an earlier one whose run was killed.

A full disk does not take the orchestrator down: a failure that cannot be recorded, a log line or
a tracking event that cannot be written is logged instead, and the stage's error names the full
disk (pipeline/store.py: disk_full).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import SchedulerUnavailable
from pipeline.executors import Executor, Handle, JobState, Task, make_executor
from pipeline.plan import EXCLUDED, SKIP, Plan, StagePlan, make_plan
from pipeline.provenance import git_commit
from pipeline.schema import to_plain
from pipeline.secrets import redact, redact_overrides
from pipeline.stage import ARTIFACTS_FILE, Project
from pipeline.store import LOG_FILE, METRICS_FILE, STAGE_INFO, DiskFull, disk_full
from pipeline.tails import LogTail, MetricsTail
from pipeline.tracking import NullTracker, logged_lineage, make_tracker
from pipeline.worker import clear_error, read_error

log = logging.getLogger("llmpipe.runner")

RAN, CACHED, FAILED, BLOCKED, NOT_RUN = "ran", "cached", "failed", "blocked", "excluded"
UNKNOWN_GRACE_S = 120.0  # a job out of the queue with no record of its end for this long is settled by its output


@dataclass
class Outcome:
    stage: str
    status: str
    fingerprint: str
    output: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    duration_s: float = 0.0
    tracking_key: str | None = None  # the stage run's llmpipe.run_key tag in MLflow
    causes: list[str] = field(default_factory=list)  # failed stages that kept this one from running

    def __post_init__(self) -> None:
        if self.status == FAILED:
            self.causes = [self.stage]


@dataclass
class RunResult:
    plan: Plan
    outcomes: dict[str, Outcome]
    tracker: NullTracker | None = None

    @property
    def ok(self) -> bool:
        return all(o.status in (RAN, CACHED, NOT_RUN) for o in self.outcomes.values())

    def summary(self) -> str:
        rows = [f"{'stage':<10} {'status':<9} {'fingerprint':<13} {'time':>8}  detail"]
        for o in self.outcomes.values():
            detail = o.error or (str(o.output) if o.output else "")
            rows.append(f"{o.stage:<10} {o.status:<9} {o.fingerprint:<13} {o.duration_s:>7.1f}s  {detail}")
        return "\n".join(rows)


def _named(stage: str, path: Path, exc: OSError, what: str) -> BaseException:
    """``exc`` as a DiskFull that names the stage and the path when the disk is full; else ``exc``."""
    full = disk_full(path, exc)
    return DiskFull(f"stage '{stage}': {what}: {full} ({exc})") if full else exc


def _requested_artifacts(output: Path) -> list[Path]:
    listing = output / ARTIFACTS_FILE
    return [output / name for name in json.loads(listing.read_text())] if listing.is_file() else []


@dataclass
class _Followed:
    """A stage whose jobs were submitted (or found still queued from an earlier run)."""

    sp: StagePlan
    handle: Handle
    partial: Path
    final: Path
    attempt: int
    run_id: str | None
    lock: contextlib.ExitStack  # the output's lock, released when the stage is settled
    metrics: MetricsTail
    logs: dict[str, LogTail]
    seen: tuple[str, str, str] = ("", "", "")  # last reported (state, reason, nodes)
    running_since: float | None = None
    unknown_since: float | None = None

    def pump(self) -> None:
        """Forward new metrics records and echo new log lines, prefixed with the stage (and task)."""
        self.metrics.poll()
        for prefix, tail in self.logs.items():
            for line in tail.lines():
                sys.stderr.write(f"[{self.sp.name}{prefix}] {line}\n")
        sys.stderr.flush()


class _Tracking:
    """The tracker as the runner calls it: a journal that cannot be written (a full disk) is logged,
    once, and the run goes on; the events stay buffered and reach the journal when space is back.
    Tracking never fails a run, as a tracking server that does not answer never does either."""

    def __init__(self, tracker: NullTracker):
        self.tracker = tracker
        self.failed = False
        self.root = Path(".")  # the run root, once started: where the journal lives

    def __getattr__(self, name: str) -> Any:  # key, journal...: the tracker's own
        return getattr(self.tracker, name)

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.tracker, method)(*args)
        except OSError as exc:
            if not self.failed:
                full = disk_full(self.tracker.journal or self.root, exc)
                log.error("tracking: cannot write the journal %s (%s); the run goes on", self.tracker.journal,
                          full or exc)
            self.failed = True
            return None

    def start(self, cfg: PipelineConfig, tags: dict[str, str], run_name: str | None = None) -> None:
        self.root = cfg.root
        self._call("start", cfg, tags, run_name)

    def stage_started(self, name: str, params: Any, tags: dict[str, str]) -> str | None:
        return self._call("stage_started", name, params, tags)

    def log_records(self, key: str | None, records: list[dict[str, Any]]) -> None:
        self._call("log_records", key, records)

    def stage_lineage(self, key: str | None, sp: StagePlan, output: Path, cached: bool = False) -> None:
        """Journal what the stage logged (models, datasets, model scores), if it logged anything; a listing
        that cannot be read is logged and skipped: it never fails the stage."""
        try:
            lineage = logged_lineage(sp.name, output, sp.fingerprint, sp.inputs, sp.input_fingerprints, cached)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: its logged models and datasets (%s) were not read: %s", sp.name, output, exc)
            return
        if lineage is not None:
            self._call("stage_lineage", key, lineage)

    def stage_finished(self, key: str | None, ok: bool, metrics: dict[str, float], tags: dict[str, str],
                       files: list[Path]) -> None:
        self._call("stage_finished", key, ok, metrics, tags, files)

    def end(self, ok: bool, metrics: dict[str, float] | None = None) -> None:
        self._call("end", ok, metrics)


def outside_tags(external: Any) -> dict[str, str]:
    """The outside inputs of a stage's fingerprint as MLflow tags (``llmpipe.outside.base_model`` ->
    ``org/name@<commit>`` or a content digest): which data and base model a run used, in the UI."""
    if isinstance(external, dict):
        # MLflow allows letters, digits and _ - . / : and space in a tag name: data.files[a.jsonl] -> data.files/a.jsonl
        return {re.sub(r"[^\w./\- :]", "_", f"llmpipe.outside.{key}".replace("[", "/").rstrip("]"))[:250]:
                str(value)[:5000] for key, value in external.items()}
    return {} if external is None else {"llmpipe.outside": json.dumps(external, sort_keys=True, default=str)[:5000]}


TITLE_STAGES = 4  # stage names a pipeline run's MLflow name lists before "+N"


def run_title(config: str, plan: Plan) -> str:
    """The pipeline run's name in MLflow, from what the plan runs: ``tiny: ran 3 (sft, align, quantize), 8 cached``
    (runs of one config are told apart at a glance; the stage runs say the rest)."""
    ran = [sp.name for sp in plan.to_run()]
    cached = sum(sp.action == SKIP for sp in plan.stages.values())
    if not ran:
        return f"{config}: all {cached} cached" if cached else f"{config}: nothing to run"
    names = ", ".join(ran[:TITLE_STAGES]) + (f", +{len(ran) - TITLE_STAGES}" if len(ran) > TITLE_STAGES else "")
    return f"{config}: ran {len(ran)} ({names})" + (f", {cached} cached" if cached else "")


class Runner:
    """Runs plans of one config through one executor (see the module doc). One run at a time."""

    def __init__(self, cfg: PipelineConfig, project: Project, executor: Executor | None = None,
                 tracker: NullTracker | None = None):
        self.cfg = cfg
        self.project = project
        self.executor = executor or make_executor(cfg.cluster, cfg.root)
        self.tracker = _Tracking(tracker if tracker is not None else make_tracker(cfg))
        self.commit = git_commit(cfg.project_dir)

    def run(self, plan: Plan | None = None) -> RunResult:
        self.plan = plan or make_plan(self.cfg, self.project)
        preflight = getattr(self.executor, "preflight", None)  # Slurm: GPU stages' torch, before any job or tracking
        if preflight is not None:
            preflight([sp.name for sp in self.plan.to_run()])
        self.started = time.time()
        self.followed: dict[str, _Followed] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.tracker.start(self.cfg, {"llmpipe.config": self.cfg.name, "llmpipe.git_commit": self.commit,
                                      "llmpipe.root": str(self.plan.store.root)}, run_title(self.cfg.name, self.plan))
        try:
            self._run_plan()
        except BaseException:
            self.tracker.end(False, self._summary())
            raise
        result = RunResult(self.plan, {name: self.outcomes[name] for name in self.plan.stages}, self.tracker.tracker)
        self.tracker.end(result.ok, self._summary())
        return result

    def _summary(self) -> dict[str, float]:
        """The pipeline run's own metrics in MLflow: how many stages ran, were cached, failed, and its time."""
        statuses = [o.status for o in self.outcomes.values()]
        return {"stages_ran": statuses.count(RAN), "stages_cached": statuses.count(CACHED),
                "stages_failed": statuses.count(FAILED), "stages_blocked": statuses.count(BLOCKED),
                "wall_s": round(time.time() - self.started, 3)}

    def _run_plan(self) -> None:
        try:
            for sp in self.plan.stages.values():
                if sp.action == EXCLUDED:
                    self.outcomes[sp.name] = Outcome(sp.name, NOT_RUN, sp.fingerprint, error=sp.reason)
                elif sp.action == SKIP:
                    self.outcomes[sp.name] = self._cached(sp)
                else:
                    self._submit(sp)
            self._follow()
        except BaseException as exc:
            self._abort(exc)
            raise
        finally:
            for f in self.followed.values():
                f.lock.close()

    # -- what every stage gets ---------------------------------------------------------------------
    def _tags(self, sp: StagePlan, output: Path) -> dict[str, str]:
        return {"llmpipe.stage": sp.name, "llmpipe.fingerprint": sp.fingerprint,
                "llmpipe.input_fingerprints": json.dumps(sp.input_fingerprints, sort_keys=True),
                "llmpipe.output_path": str(output), "llmpipe.git_commit": self.commit,
                "llmpipe.config": self.cfg.name, **outside_tags(sp.payload.get("external"))}

    def _cached(self, sp: StagePlan) -> Outcome:
        store = self.plan.store
        info = store.info(sp.name, sp.fingerprint) or {}
        final = store.final_dir(sp.name, sp.fingerprint)
        log.info("%s: cached (%s)", sp.name, final)
        tags = {**self._tags(sp, final), "llmpipe.status": CACHED, "llmpipe.cached": "true",
                "llmpipe.produced_by_key": str(info.get("tracking_key")),
                "llmpipe.produced_git_commit": str(info.get("git_commit"))}
        run_id = self.tracker.stage_started(sp.name, to_plain(sp.config), tags)
        metrics = dict(info.get("metrics", {}))
        self.tracker.stage_lineage(run_id, sp, final, cached=True)  # links the models its producer logged
        self.tracker.stage_finished(run_id, True, metrics, {}, [final / STAGE_INFO])
        return Outcome(sp.name, CACHED, sp.fingerprint, final, metrics, tracking_key=run_id)

    def base_info(self, sp: StagePlan, attempt: int, run_id: str | None) -> dict[str, Any]:
        """stage_info.json without what only the end of the attempt knows (timings, metrics, host)."""
        return {
            "stage": sp.name, "fingerprint": sp.fingerprint, "version": sp.stage.version,
            # Secrets masked (pipeline/secrets.py); the payload holds them hashed already (fingerprint.py).
            "payload": sp.payload, "config": redact(to_plain(sp.config), f"stage.{sp.name}"),
            "input_fingerprints": sp.input_fingerprints, "inputs": {k: str(v) for k, v in sp.inputs.items()},
            "outputs": list(sp.stage.outputs), "git_commit": self.commit, "attempt": attempt,
            "tracking_key": run_id, "pipeline_tracking_key": self.tracker.key,
            "pipeline_config": self.cfg.name, "overrides": redact_overrides(self.cfg.overrides),
            "executor": {"kind": self.cfg.cluster.executor},
            # What relative paths in the config and the outside inputs' state are relative to (`llmpipe lineage`).
            "project_dir": str(self.cfg.project_dir),
        }

    # -- submitting ---------------------------------------------------------------------------------
    def _submit(self, sp: StagePlan) -> None:
        store, cfg = self.plan.store, self.cfg
        lock = contextlib.ExitStack()
        lock.enter_context(store.lock(sp.name, sp.fingerprint, cfg.run.lock_wait_s))
        try:
            self._submit_locked(sp, lock)
        except BaseException:
            lock.close()
            raise

    def _produced_meanwhile(self, sp: StagePlan, lock: contextlib.ExitStack) -> bool:
        """Whether another run (or an earlier attempt's processes) committed the output since the plan:
        then it is cached, and its lock released."""
        info = self.plan.store.info(sp.name, sp.fingerprint)
        if info and (not sp.reason.startswith("forced") or info.get("finished_at", 0) > self.started):
            log.info("%s: produced meanwhile by another run", sp.name)
            lock.close()
            self.outcomes[sp.name] = self._cached(sp)
            return True
        return False

    def _submit_locked(self, sp: StagePlan, lock: contextlib.ExitStack) -> None:
        store, cfg = self.plan.store, self.cfg
        if self._produced_meanwhile(sp, lock):
            return
        after = [self.followed[p].handle.final_id for p in self.plan.dag.parents[sp.name] if p in self.followed]
        tags = {**self._tags(sp, store.final_dir(sp.name, sp.fingerprint)),
                "llmpipe.status": "running", "llmpipe.reason": sp.reason, "llmpipe.executor": cfg.cluster.executor}
        handle = self.executor.active(sp.name, sp.fingerprint)
        if handle is not None:  # its orchestrator is gone but its jobs are not: follow them
            partial, attempt = store.partial_dir(sp.name, sp.fingerprint), handle.attempt
            run_id = self.tracker.stage_started(sp.name, to_plain(sp.config),
                                                {**tags, "llmpipe.attempt": str(attempt), "llmpipe.adopted": "true"})
            log.info("%s: following jobs %s, still queued from an earlier run", sp.name, " ".join(handle.job_ids))
        else:
            # Processes of an earlier attempt (a killed run's stage, still stopping; a job the scheduler
            # has not ended) may still write into the partial dir: wait for them, then look again.
            store.wait_for_jobs(sp.name, sp.fingerprint, cfg.run.lock_wait_s)
            if self._produced_meanwhile(sp, lock):
                return
            try:
                partial, attempt = store.begin_attempt(sp.name, sp.fingerprint, sp.stage.resumable)
                clear_error(partial)  # an earlier attempt's, not this one's
            except OSError as exc:
                error = _named(sp.name, store.partial_dir(sp.name, sp.fingerprint), exc, "cannot begin an attempt")
                if error is exc:
                    raise
                raise error from exc
            run_id = self.tracker.stage_started(sp.name, to_plain(sp.config), {**tags, "llmpipe.attempt": str(attempt)})
            task = Task(project=self.project.import_path, stage=sp.name, fingerprint=sp.fingerprint,
                        config=to_plain(sp.config), output_dir=partial, inputs=sp.inputs, attempt=attempt,
                        log_file=partial / LOG_FILE, metrics_file=partial / METRICS_FILE,
                        commit={"root": str(store.root), "info": self.base_info(sp, attempt, run_id)},
                        env=dict(cfg.cluster.env), cwd=cfg.project_dir,
                        job_lock=store.job_lock_path(sp.name, sp.fingerprint))
            try:
                handle = self.executor.submit(task, after, phases=sp.stage.shard_phases, resumable=sp.stage.resumable)
            except BaseException as exc:
                error = _named(sp.name, partial, exc, "not submitted") if isinstance(exc, OSError) else exc
                store.record_failure(sp.name, sp.fingerprint, f"not submitted: {error}", attempt)
                self.tracker.stage_finished(run_id, False, {}, {"llmpipe.status": FAILED,
                                                               "llmpipe.error": str(error)[:5000]}, [])
                if error is not exc:
                    raise error from exc
                raise
            log.info("%s: submitted job%s %s (%s), attempt %d, fingerprint %s", sp.name,
                     "s" if len(handle.job_ids) > 1 else "", " ".join(handle.job_ids), sp.reason, attempt,
                     sp.fingerprint)
        final = store.final_dir(sp.name, sp.fingerprint)
        sink = (lambda recs, key=run_id: self.tracker.log_records(key, recs))
        logs = {prefix: LogTail(partial / rel, final / rel) for prefix, rel in handle.log_files().items()}
        self.followed[sp.name] = _Followed(sp, handle, partial, final, attempt, run_id, lock,
                                           MetricsTail(partial / METRICS_FILE, sink, final / METRICS_FILE), logs)

    # -- following ----------------------------------------------------------------------------------
    def _active(self) -> dict[str, _Followed]:
        return {n: f for n, f in self.followed.items() if n not in self.outcomes}

    def _follow(self) -> None:
        unavailable_since = None
        while active := self._active():
            try:
                states = self.executor.poll({n: f.handle for n, f in active.items()})
            except SchedulerUnavailable as exc:  # no verdict on any job: ask again
                if unavailable_since is None:
                    log.warning("the scheduler does not answer (%s); still following", exc)
                unavailable_since = unavailable_since or time.time()
                time.sleep(self.executor.poll_s)
                continue
            if unavailable_since is not None:
                log.info("the scheduler answers again after %.0fs", time.time() - unavailable_since)
                unavailable_since = None
            for name, f in active.items():
                if name in self.outcomes:  # blocked by a failure settled earlier in this round
                    continue
                f.pump()
                state = self._note(f, states[name])
                if state.finished:
                    self._settled(name, self._settle(f, state))
                    if self.outcomes[name].status == FAILED:
                        self._stop_after_failure(name)
            if self._active():
                time.sleep(self.executor.poll_s)

    def _settled(self, name: str, outcome: Outcome) -> None:
        """Record a stage's outcome: its jobs have ended (or were cancelled), so its lock is released."""
        self.outcomes[name] = outcome
        self.followed[name].lock.close()

    def _note(self, f: _Followed, state: JobState) -> JobState:
        """Log state changes; settle a job that left the queue without any record by its output."""
        now = time.time()
        if state.state == "RUNNING" and f.running_since is None:
            f.running_since = now
        key = (state.state, state.reason, state.nodes)
        if key != f.seen and not state.finished and state.state != "UNKNOWN":
            where = f" on {state.nodes}" if state.nodes and state.state == "RUNNING" else ""
            log.info("%s: %s%s%s", f.sp.name, state.state, where, f" ({state.reason})" if state.reason else "")
            f.seen = key
        if state.state != "UNKNOWN":
            f.unknown_since = None
            return state
        f.unknown_since = f.unknown_since or now
        if now - f.unknown_since < UNKNOWN_GRACE_S:
            return state
        done = self.plan.store.is_done(f.sp.name, f.sp.fingerprint)
        return JobState(True, ok=done, state="UNKNOWN", reason=f"{state.reason}; no record of how it ended")

    def _settle(self, f: _Followed, state: JobState) -> Outcome:
        f.pump()
        sp, store = f.sp, self.plan.store
        jobs = " ".join(f.handle.job_ids)
        done_tags = {"llmpipe.job_ids": jobs}
        if state.ok and store.is_done(sp.name, sp.fingerprint):
            info = store.info(sp.name, sp.fingerprint) or {}
            metrics = dict(info.get("metrics", {}))
            self.tracker.stage_lineage(f.run_id, sp, f.final)
            self.tracker.stage_finished(f.run_id, True, metrics, {**done_tags, "llmpipe.status": RAN},
                                        [f.final / STAGE_INFO, f.final / LOG_FILE, *_requested_artifacts(f.final)])
            # From the first job seen running (arrays included) to now; the job's own time if never seen.
            duration = time.time() - f.running_since if f.running_since else float(info.get("duration_s", 0.0))
            log.info("%s: done in %.1fs (jobs %s) -> %s", sp.name, duration, jobs, f.final)
            return Outcome(sp.name, RAN, sp.fingerprint, f.final, metrics, duration_s=duration,
                           tracking_key=f.run_id)
        error = self._error(f, state)
        self._record_failure(f, error, state)
        self.tracker.stage_finished(f.run_id, False, {}, {**done_tags, "llmpipe.status": FAILED,
                                                          "llmpipe.error": error[:5000]}, [f.partial / LOG_FILE])
        duration = time.time() - (f.running_since or f.handle.submitted_at)
        log.error("%s: failed: %s (log: %s)", sp.name, error, f.partial / LOG_FILE)
        return Outcome(sp.name, FAILED, sp.fingerprint, f.partial, error=error, duration_s=duration,
                       tracking_key=f.run_id)

    def _error(self, f: _Followed, state: JobState) -> str:
        """The stage's own error first (its exception), then the scheduler's account of the job."""
        if state.ok:
            scheduler = f"{state.reason or 'the jobs completed'}, but the output was not committed"
        else:
            scheduler = state.reason or state.state
        own = read_error(f.partial)
        if own is None:  # the stage could not even report (a full disk?): say what the disk says
            full = disk_full(f.partial)
            own = f"{DiskFull.__name__}: {full}; stage '{f.sp.name}' left no error report" if full else None
        return f"{own} ({scheduler})" if own else scheduler

    def _record_failure(self, f: _Followed, error: str, state: JobState | None) -> None:
        """The failure, in the partial dir for the next attempt and `llmpipe status`, and the
        scheduler's own output of the failed job at the end of the stage log."""
        sp, store = f.sp, self.plan.store
        if store.is_done(sp.name, sp.fingerprint):  # committed after all (cancelled while finishing)
            return
        store.record_failure(sp.name, sp.fingerprint, error, f.attempt)  # logs instead where it cannot write
        tail = self.executor.job_output(f.handle, state.failed_job if state else None)
        try:
            with open(f.partial / LOG_FILE, "a", encoding="utf-8") as out:
                out.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} scheduler: {error} =====\n")
                if tail:
                    out.write(f"----- end of the scheduler's output of the job -----\n{tail}\n")
        except OSError as exc:  # a full disk: the error is in the orchestrator's log already
            log.warning("%s: could not append to %s: %s", sp.name, f.partial / LOG_FILE, exc)

    def _stop_after_failure(self, failed: str) -> None:
        """Cancel the jobs that can no longer run (descendants), or all of them (run.keep_going=false)."""
        victims = self.plan.dag.descendants(failed) if self.cfg.run.keep_going else set(self.plan.stages)
        for name, f in self._active().items():  # topological: parents' outcomes first
            if name not in victims:
                continue
            self.executor.cancel([f.handle])
            causes = sorted({c for p in self.plan.dag.parents[name] if p in self.outcomes
                             for c in self.outcomes[p].causes})
            why = (f"upstream {', '.join(causes)} failed" if causes
                   else "stopped after a failure (run.keep_going=false)")
            if f.running_since is not None:
                self._record_failure(f, f"cancelled: {why}", None)
            else:
                self.plan.store.abandon_attempt(name, f.sp.fingerprint, f.attempt)
            self.tracker.stage_finished(f.run_id, False, {}, {"llmpipe.status": BLOCKED, "llmpipe.error": why,
                                                              "llmpipe.job_ids": " ".join(f.handle.job_ids)}, [])
            self._settled(name, Outcome(name, BLOCKED, f.sp.fingerprint, error=why, causes=causes))
            log.warning("%s: cancelled jobs %s, %s", name, " ".join(f.handle.job_ids), why)

    def _abort(self, exc: BaseException) -> None:
        """Interrupted (Ctrl-C, SIGTERM) or broken: cancel every job still queued or running."""
        active = self._active()
        if not active:
            return
        log.warning("cancelling the jobs of %s", ", ".join(active))
        self.executor.cancel([f.handle for f in active.values()])
        reason = f"interrupted: {type(exc).__name__}; jobs cancelled"
        for f in active.values():
            if f.running_since is not None:
                self._record_failure(f, reason, None)
            else:
                self.plan.store.abandon_attempt(f.sp.name, f.sp.fingerprint, f.attempt)
            self.tracker.stage_finished(f.run_id, False, {}, {"llmpipe.status": FAILED, "llmpipe.error": reason}, [])
