"""Run a plan: stages in topological order, cached ones skipped, each attempt committed
atomically, every stage tracked. A failed stage blocks its descendants and nothing else."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.executors import Executor, Task, make_executor
from pipeline.plan import EXCLUDED, SKIP, Plan, StagePlan, make_plan
from pipeline.provenance import git_commit, host
from pipeline.schema import to_plain
from pipeline.stage import ARTIFACTS_FILE, Project
from pipeline.store import LOG_FILE, METRICS_FILE, STAGE_INFO
from pipeline.tracking import NullTracker, make_tracker

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
    import json

    listing = output / ARTIFACTS_FILE
    return [output / name for name in json.loads(listing.read_text())] if listing.is_file() else []


class MetricsTail:
    """Follows a stage's metrics.jsonl and forwards new records, so curves appear while it runs."""

    def __init__(self, path: Path, sink):
        self.path = path
        self.sink = sink
        self.offset = path.stat().st_size if path.exists() else 0

    def poll(self) -> None:
        if not self.path.exists():
            return
        import json

        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]  # a half-written last line waits for the next poll
        self.offset += len(complete.encode())
        records = [json.loads(line) for line in complete.splitlines() if line.strip()]
        if records:
            self.sink(records)


class Runner:
    def __init__(self, cfg: PipelineConfig, project: Project, executor: Executor | None = None,
                 tracker: NullTracker | None = None):
        self.cfg = cfg
        self.project = project
        self.executor = executor or make_executor(cfg.cluster.executor)
        self.tracker = tracker if tracker is not None else make_tracker(cfg)
        self.commit = git_commit(cfg.project_dir)

    def run(self, plan: Plan | None = None) -> RunResult:
        plan = plan or make_plan(self.cfg, self.project)
        started = time.time()
        self.tracker.start(self.cfg, {"llmpipe.config": self.cfg.name, "llmpipe.git_commit": self.commit,
                                      "llmpipe.root": str(plan.store.root)})
        outcomes: dict[str, Outcome] = {}
        stop = False
        try:
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
        except BaseException:
            self.tracker.end(False)
            raise
        result = RunResult(plan, outcomes, self.tracker)
        self.tracker.end(result.ok)
        return result

    # -- one stage ---------------------------------------------------------------------------
    def _tags(self, plan: Plan, sp: StagePlan, output: Path) -> dict[str, str]:
        import json

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

    def _stage_info(self, sp: StagePlan, attempt: int, started: float, duration: float,
                    metrics: Mapping[str, float], run_id: str | None, details: Mapping[str, Any]) -> dict:
        finished = time.time()
        return {
            "stage": sp.name, "fingerprint": sp.fingerprint, "version": sp.stage.version,
            "payload": sp.payload, "config": to_plain(sp.config),
            "input_fingerprints": sp.input_fingerprints, "inputs": {k: str(v) for k, v in sp.inputs.items()},
            "outputs": list(sp.stage.outputs), "git_commit": self.commit, "host": host(),
            "started_at": started, "finished_at": finished,
            "finished_at_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(finished)),
            "duration_s": duration, "attempt": attempt, "metrics": dict(metrics),
            "tracking_key": run_id, "pipeline_tracking_key": self.tracker.key,
            "pipeline_config": self.cfg.name, "overrides": list(self.cfg.overrides),
            "executor": {"kind": self.cfg.cluster.executor, **details},
        }
