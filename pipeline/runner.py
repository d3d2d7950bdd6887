"""Run a plan: stages in topological order, cached ones skipped, each attempt committed
atomically, every stage tracked. A failed stage blocks its descendants and nothing else.

Two ways to run, chosen by the executor:
- one stage after the other, each a process here that the runner waits for (local);
- through a batch scheduler (Slurm): every stage that must run is submitted at once, each job
  chained to its inputs' jobs (``afterok``), and the job itself commits its output. The runner then
  only follows: it streams the jobs' logs and metrics, records outcomes and tracking, cancels what a
  failure makes pointless, and cancels everything it submitted when it is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import SchedulerUnavailable
from pipeline.executors import BatchExecutor, Executor, JobState, Task, make_executor
from pipeline.plan import EXCLUDED, SKIP, Plan, StagePlan, make_plan
from pipeline.provenance import git_commit, host
from pipeline.schema import to_plain
from pipeline.stage import ARTIFACTS_FILE, Project
from pipeline.store import LOG_FILE, METRICS_FILE, STAGE_INFO
from pipeline.tracking import NullTracker, make_tracker
from pipeline.worker import ERROR_FILE, RESULT_FILE

log = logging.getLogger("llmpipe.runner")

RAN, CACHED, FAILED, BLOCKED, NOT_RUN = "ran", "cached", "failed", "blocked", "excluded"


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


def _requested_artifacts(output: Path) -> list[Path]:
    listing = output / ARTIFACTS_FILE
    return [output / name for name in json.loads(listing.read_text())] if listing.is_file() else []


class _Tail:
    """Reads what was appended to a file since the last call, and follows it when a job commits:
    ``path`` (in the partial dir) is read first; once it is gone, ``moved_to`` (the same file after
    the rename, recognised by its inode, or created since this tail started) at the same offset.
    An older file at ``moved_to`` (the output a forced run replaces) is never read. Only complete
    lines are returned."""

    def __init__(self, path: Path, moved_to: Path | None = None):
        self.path, self.moved_to = path, moved_to
        self.started = time.time()
        stat = _stat(path)
        self.inode, self.offset = (stat.st_ino, stat.st_size) if stat else (None, 0)

    def _current(self) -> Path | None:
        if self.path.exists():
            return self.path
        stat = _stat(self.moved_to) if self.moved_to else None
        if stat and (stat.st_ino == self.inode or (self.inode is None and stat.st_mtime >= self.started)):
            return self.moved_to
        return None

    def lines(self) -> list[str]:
        path = self._current()
        if path is None:
            return []
        try:
            with open(path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                if self.inode not in (None, inode):  # a new file in the partial dir (a restarted attempt)
                    self.offset = 0
                self.inode = inode
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:  # renamed between the two calls: the next poll reads the new path
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a half-written last line waits for the next poll
        self.offset += len(complete)
        return complete.decode(errors="replace").splitlines()


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


class MetricsTail(_Tail):
    """Follows a stage's metrics.jsonl and forwards new records, so curves appear while it runs."""

    def __init__(self, path: Path, sink, moved_to: Path | None = None):
        super().__init__(path, moved_to)
        self.sink = sink

    def poll(self) -> None:
        records = [json.loads(line) for line in self.lines() if line.strip()]
        if records:
            self.sink(records)


class Runner:
    def __init__(self, cfg: PipelineConfig, project: Project, executor: Executor | None = None,
                 tracker: NullTracker | None = None):
        self.cfg = cfg
        self.project = project
        self.executor = executor or make_executor(cfg.cluster, cfg.root)
        self.tracker = tracker if tracker is not None else make_tracker(cfg)
        self.commit = git_commit(cfg.project_dir)

    def run(self, plan: Plan | None = None) -> RunResult:
        plan = plan or make_plan(self.cfg, self.project)
        started = time.time()
        self.tracker.start(self.cfg, {"llmpipe.config": self.cfg.name, "llmpipe.git_commit": self.commit,
                                      "llmpipe.root": str(plan.store.root)})
        try:
            if getattr(self.executor, "batch", False):
                outcomes = BatchRun(self, plan, started).run()
            else:
                outcomes = self._run_in_order(plan, started)
        except BaseException:
            self.tracker.end(False)
            raise
        result = RunResult(plan, outcomes, self.tracker)
        self.tracker.end(result.ok)
        return result

    def _run_in_order(self, plan: Plan, started: float) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        stop = False
        for sp in plan.stages.values():
            causes = sorted({c for p in plan.dag.parents[sp.name] if p in outcomes for c in outcomes[p].causes})
            if sp.action == EXCLUDED:
                outcomes[sp.name] = Outcome(sp.name, NOT_RUN, sp.fingerprint, error=sp.reason)
            elif causes or stop:
                why = (f"upstream {', '.join(causes)} failed" if causes
                       else "stopped after a failure (run.keep_going=false)")
                outcomes[sp.name] = Outcome(sp.name, BLOCKED, sp.fingerprint, error=why, causes=causes)
                log.warning("%s: not run, %s", sp.name, why)
            elif sp.action == SKIP:
                outcomes[sp.name] = self._cached(plan, sp)
            else:
                outcomes[sp.name] = self._execute(plan, sp, started)
                stop = outcomes[sp.name].status == FAILED and not self.cfg.run.keep_going
        return outcomes

    # -- one stage ---------------------------------------------------------------------------
    def _tags(self, plan: Plan, sp: StagePlan, output: Path) -> dict[str, str]:
        return {"llmpipe.stage": sp.name, "llmpipe.fingerprint": sp.fingerprint,
                "llmpipe.input_fingerprints": json.dumps(sp.input_fingerprints, sort_keys=True),
                "llmpipe.output_path": str(output), "llmpipe.git_commit": self.commit,
                "llmpipe.config": self.cfg.name}

    def _cached(self, plan: Plan, sp: StagePlan) -> Outcome:
        store = plan.store
        info = store.info(sp.name, sp.fingerprint) or {}
        final = store.final_dir(sp.name, sp.fingerprint)
        log.info("%s: cached (%s)", sp.name, final)
        tags = {**self._tags(plan, sp, final), "llmpipe.status": CACHED, "llmpipe.cached": "true",
                "llmpipe.produced_by_key": str(info.get("tracking_key")),
                "llmpipe.produced_git_commit": str(info.get("git_commit"))}
        run_id = self.tracker.stage_started(sp.name, to_plain(sp.config), tags)
        metrics = dict(info.get("metrics", {}))
        self.tracker.stage_finished(run_id, True, metrics, {}, [final / STAGE_INFO])
        return Outcome(sp.name, CACHED, sp.fingerprint, final, metrics, tracking_key=run_id)

    def _execute(self, plan: Plan, sp: StagePlan, pipeline_started: float) -> Outcome:
        store, stage = plan.store, sp.stage
        with store.lock(sp.name, sp.fingerprint, self.cfg.run.lock_wait_s):
            info = store.info(sp.name, sp.fingerprint)
            forced = sp.reason.startswith("forced")
            if info and (not forced or info.get("finished_at", 0) > pipeline_started):
                log.info("%s: produced meanwhile by another run", sp.name)
                return self._cached(plan, sp)
            partial, attempt = store.begin_attempt(sp.name, sp.fingerprint, stage.resumable)
            log.info("%s: running (%s), attempt %d, fingerprint %s", sp.name, sp.reason, attempt, sp.fingerprint)
            tags = {**self._tags(plan, sp, store.final_dir(sp.name, sp.fingerprint)),
                    "llmpipe.status": "running", "llmpipe.attempt": str(attempt), "llmpipe.reason": sp.reason}
            run_id = self.tracker.stage_started(sp.name, to_plain(sp.config), tags)
            tail = MetricsTail(partial / METRICS_FILE, lambda recs: self.tracker.log_records(run_id, recs))
            task = Task(project=self.project.import_path, stage=sp.name, fingerprint=sp.fingerprint,
                        config=to_plain(sp.config), output_dir=partial, inputs=sp.inputs, attempt=attempt,
                        log_file=partial / LOG_FILE, metrics_file=partial / METRICS_FILE,
                        env=dict(self.cfg.cluster.env), cwd=self.cfg.project_dir)
            t0 = time.time()
            try:
                result = self.executor.run(task, tail.poll)
            except BaseException as exc:  # Ctrl-C or a bug in the executor: record, then re-raise
                store.record_failure(sp.name, sp.fingerprint, f"interrupted: {type(exc).__name__}", attempt)
                self.tracker.stage_finished(run_id, False, {}, {"llmpipe.status": FAILED}, [partial / LOG_FILE])
                raise
            duration = time.time() - t0
            if not result.ok:
                store.record_failure(sp.name, sp.fingerprint, result.error, attempt)
                self.tracker.stage_finished(run_id, False, {}, {"llmpipe.status": FAILED,
                                                               "llmpipe.error": result.error[:5000]},
                                            [partial / LOG_FILE])
                log.error("%s: failed after %.1fs: %s (log: %s)", sp.name, duration, result.error,
                          partial / LOG_FILE)
                return Outcome(sp.name, FAILED, sp.fingerprint, partial, error=result.error,
                               duration_s=duration, tracking_key=run_id)
            info = self._stage_info(sp, attempt, t0, duration, result.metrics, run_id, result.details)
            final = store.commit(sp.name, sp.fingerprint, info)
            self.tracker.stage_finished(run_id, True, result.metrics, {"llmpipe.status": RAN},
                                        [final / STAGE_INFO, final / LOG_FILE, *_requested_artifacts(final)])
            log.info("%s: done in %.1fs -> %s", sp.name, duration, final)
            return Outcome(sp.name, RAN, sp.fingerprint, final, result.metrics, duration_s=duration,
                           tracking_key=run_id)

    def base_info(self, sp: StagePlan, attempt: int, run_id: str | None) -> dict[str, Any]:
        """stage_info.json without what only the end of the attempt knows (timings, metrics, host)."""
        return {
            "stage": sp.name, "fingerprint": sp.fingerprint, "version": sp.stage.version,
            "payload": sp.payload, "config": to_plain(sp.config),
            "input_fingerprints": sp.input_fingerprints, "inputs": {k: str(v) for k, v in sp.inputs.items()},
            "outputs": list(sp.stage.outputs), "git_commit": self.commit, "attempt": attempt,
            "tracking_key": run_id, "pipeline_tracking_key": self.tracker.key,
            "pipeline_config": self.cfg.name, "overrides": list(self.cfg.overrides),
            "executor": {"kind": self.cfg.cluster.executor},
        }

    def _stage_info(self, sp: StagePlan, attempt: int, started: float, duration: float,
                    metrics: Mapping[str, float], run_id: str | None, details: Mapping[str, Any]) -> dict:
        finished = time.time()
        info = self.base_info(sp, attempt, run_id)
        info.update({
            "host": host(), "started_at": started, "finished_at": finished,
            "finished_at_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(finished)),
            "duration_s": duration, "metrics": dict(metrics),
            "executor": {**info["executor"], **details},
        })
        return info


# ---------------------------------------------------------------- through a batch scheduler

UNKNOWN_GRACE_S = 120.0  # a job out of the queue with no record of its end for this long is settled by its output


@dataclass
class _Followed:
    """A stage whose jobs were submitted (or found still queued from an earlier run)."""

    sp: StagePlan
    handle: Any  # the executor's record of the jobs (``.job_ids``)
    partial: Path
    final: Path
    attempt: int
    run_id: str | None
    submitted_at: float
    metrics: MetricsTail
    logs: dict[str, _Tail]
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


class BatchRun:
    """One run of a plan through a :class:`~pipeline.executors.BatchExecutor` (see the module doc).

    Locks are taken as in a local run, and held until the stage's jobs end: a second run waits for
    them instead of submitting the same output twice. A run that finds an output's jobs still queued
    from an earlier, vanished run follows those jobs instead of submitting new ones.
    """

    def __init__(self, runner: Runner, plan: Plan, started: float):
        self.runner = runner
        self.plan = plan
        self.started = started
        self.executor: BatchExecutor = runner.executor  # type: ignore[assignment]
        self.tracker = runner.tracker
        self.followed: dict[str, _Followed] = {}
        self.outcomes: dict[str, Outcome] = {}

    def run(self) -> dict[str, Outcome]:
        with contextlib.ExitStack() as locks:
            try:
                for sp in self.plan.stages.values():
                    if sp.action == EXCLUDED:
                        self.outcomes[sp.name] = Outcome(sp.name, NOT_RUN, sp.fingerprint, error=sp.reason)
                    elif sp.action == SKIP:
                        self.outcomes[sp.name] = self.runner._cached(self.plan, sp)
                    else:
                        self._submit(sp, locks)
                self._follow()
            except BaseException as exc:
                self._abort(exc)
                raise
        return {name: self.outcomes[name] for name in self.plan.stages}

    # -- submitting ---------------------------------------------------------------------------------
    def _submit(self, sp: StagePlan, locks: contextlib.ExitStack) -> None:
        store, cfg = self.plan.store, self.runner.cfg
        locks.enter_context(store.lock(sp.name, sp.fingerprint, cfg.run.lock_wait_s))
        info = store.info(sp.name, sp.fingerprint)
        if info and (not sp.reason.startswith("forced") or info.get("finished_at", 0) > self.started):
            log.info("%s: produced meanwhile by another run", sp.name)
            self.outcomes[sp.name] = self.runner._cached(self.plan, sp)
            return
        after = [self.followed[p].handle.final_id for p in self.plan.dag.parents[sp.name] if p in self.followed]
        tags = {**self.runner._tags(self.plan, sp, store.final_dir(sp.name, sp.fingerprint)),
                "llmpipe.status": "running", "llmpipe.reason": sp.reason, "llmpipe.executor": cfg.cluster.executor}
        handle = self.executor.active(sp.name, sp.fingerprint)
        if handle is not None:  # its orchestrator is gone but its jobs are not: follow them
            partial, attempt = store.partial_dir(sp.name, sp.fingerprint), handle.attempt
            run_id = self.tracker.stage_started(sp.name, to_plain(sp.config),
                                                {**tags, "llmpipe.attempt": str(attempt), "llmpipe.adopted": "true"})
            log.info("%s: following jobs %s, still queued from an earlier run", sp.name, " ".join(handle.job_ids))
        else:
            partial, attempt = store.begin_attempt(sp.name, sp.fingerprint, sp.stage.resumable)
            for name in (ERROR_FILE, RESULT_FILE):  # an earlier attempt's, not this one's
                (partial / name).unlink(missing_ok=True)
            run_id = self.tracker.stage_started(sp.name, to_plain(sp.config), {**tags, "llmpipe.attempt": str(attempt)})
            task = Task(project=self.runner.project.import_path, stage=sp.name, fingerprint=sp.fingerprint,
                        config=to_plain(sp.config), output_dir=partial, inputs=sp.inputs, attempt=attempt,
                        log_file=partial / LOG_FILE, metrics_file=partial / METRICS_FILE,
                        env=dict(cfg.cluster.env), cwd=cfg.project_dir,
                        commit={"root": str(store.root), "info": self.runner.base_info(sp, attempt, run_id)})
            try:
                handle = self.executor.submit(task, sp.stage.shard_phases, after, resumable=sp.stage.resumable)
            except BaseException as exc:
                store.record_failure(sp.name, sp.fingerprint, f"not submitted: {exc}", attempt)
                self.tracker.stage_finished(run_id, False, {}, {"llmpipe.status": FAILED,
                                                               "llmpipe.error": str(exc)[:5000]}, [])
                raise
            log.info("%s: submitted job%s %s (%s), attempt %d, fingerprint %s", sp.name,
                     "s" if len(handle.job_ids) > 1 else "", " ".join(handle.job_ids), sp.reason, attempt,
                     sp.fingerprint)
        final = store.final_dir(sp.name, sp.fingerprint)
        sink = (lambda recs, key=run_id: self.tracker.log_records(key, recs))
        logs = {prefix: _Tail(partial / rel, final / rel) for prefix, rel in handle.log_files().items()}
        self.followed[sp.name] = _Followed(sp, handle, partial, final, attempt, run_id, handle.submitted_at,
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
                    self.outcomes[name] = self._settle(f, state)
                    if self.outcomes[name].status == FAILED:
                        self._stop_after_failure(name)
            if self._active():
                time.sleep(self.executor.poll_s)

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
        duration = time.time() - (f.running_since or f.submitted_at)
        log.error("%s: failed: %s (log: %s)", sp.name, error, f.partial / LOG_FILE)
        return Outcome(sp.name, FAILED, sp.fingerprint, f.partial, error=error, duration_s=duration,
                       tracking_key=f.run_id)

    def _error(self, f: _Followed, state: JobState) -> str:
        """The stage's own error first (its exception), then the scheduler's account of the job."""
        if state.ok:
            scheduler = f"{state.reason or 'the jobs completed'}, but the output was not committed"
        else:
            scheduler = state.reason or state.state
        error_file = f.partial / ERROR_FILE
        if error_file.is_file():
            info = json.loads(error_file.read_text())
            return f"{info['type']}: {info['message']} ({scheduler})"
        return scheduler

    def _record_failure(self, f: _Followed, error: str, state: JobState | None) -> None:
        """The failure, in the partial dir for the next attempt and `llmpipe status`, and the
        scheduler's own output of the failed job at the end of the stage log."""
        sp, store = f.sp, self.plan.store
        if store.is_done(sp.name, sp.fingerprint):  # committed after all (cancelled while finishing)
            return
        store.record_failure(sp.name, sp.fingerprint, error, f.attempt)
        tail = self.executor.job_output(f.handle, state.failed_job if state else None)
        with open(f.partial / LOG_FILE, "a", encoding="utf-8") as out:
            out.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} scheduler: {error} =====\n")
            if tail:
                out.write(f"----- end of the scheduler's output of the job -----\n{tail}\n")

    def _stop_after_failure(self, failed: str) -> None:
        """Cancel the jobs that can no longer run (descendants), or all of them (run.keep_going=false)."""
        keep_going = self.runner.cfg.run.keep_going
        victims = self.plan.dag.descendants(failed) if keep_going else set(self.plan.stages)
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
            self.tracker.stage_finished(f.run_id, False, {}, {"llmpipe.status": BLOCKED, "llmpipe.error": why,
                                                              "llmpipe.job_ids": " ".join(f.handle.job_ids)}, [])
            self.outcomes[name] = Outcome(name, BLOCKED, f.sp.fingerprint, error=why, causes=causes)
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
            self.tracker.stage_finished(f.run_id, False, {}, {"llmpipe.status": FAILED, "llmpipe.error": reason}, [])
