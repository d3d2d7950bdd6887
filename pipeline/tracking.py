"""MLflow lineage: one parent run per pipeline invocation, one nested run per stage.

Tracking is a hook around stages, not code inside them: stages report metrics through their
context (a metrics file) and the runner forwards them here, live, as curves.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig

log = logging.getLogger("llmpipe.tracking")

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow's limit on params per log_batch call


def tracking_uri(cfg: PipelineConfig) -> str:
    """MLFLOW_TRACKING_URI wins, then tracking.uri, then an embedded SQLite store under run.root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or f"sqlite:///{cfg.root / 'mlflow.db'}"


def artifact_location(cfg: PipelineConfig) -> str | None:
    if cfg.tracking.artifact_location:
        return cfg.tracking.artifact_location
    if tracking_uri(cfg).startswith("sqlite:///"):
        return (cfg.root / "mlartifacts").as_uri()
    return None


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


class NullTracker:
    """Used with tracking.enabled=false."""

    parent_run_id: str | None = None

    def start(self, cfg: PipelineConfig, tags: Mapping[str, str]) -> None: ...
    def stage_started(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str | None:
        return None
    def log_records(self, run_id: str | None, records: Iterable[Mapping[str, Any]]) -> None: ...
    def stage_finished(self, run_id: str | None, ok: bool, metrics: Mapping[str, float],
                       tags: Mapping[str, str], files: Iterable[Path]) -> None: ...
    def end(self, ok: bool) -> None: ...


class MlflowTracker(NullTracker):
    def __init__(self, cfg: PipelineConfig):
        self.uri = tracking_uri(cfg)
        self.experiment_name = cfg.tracking.experiment
        self.artifact_location = artifact_location(cfg)
        self.client = None
        self.experiment_id: str | None = None

    def start(self, cfg: PipelineConfig, tags: Mapping[str, str]) -> None:
        from mlflow.tracking import MlflowClient  # heavy: only when a run actually tracks

        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(self.experiment_name)
        self.experiment_id = (exp.experiment_id if exp else
                              self.client.create_experiment(self.experiment_name, self.artifact_location))
        run = self.client.create_run(self.experiment_id, run_name=f"pipeline-{cfg.name}", tags=dict(tags))
        self.parent_run_id = run.info.run_id
        params = {"config": cfg.name, "overrides": " ".join(cfg.overrides) or "-"}
        self._log_params(self.parent_run_id, params)
        self.client.log_text(self.parent_run_id, json.dumps(cfg.resolved, indent=2, default=str),
                             "resolved_config.json")
        log.info("MLflow: %s, experiment %r, run %s", self.uri, self.experiment_name, self.parent_run_id)

    def stage_started(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        assert self.client is not None
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.parent_run_id, **tags})
        self._log_params(run.info.run_id, flatten(params))
        return run.info.run_id

    def log_records(self, run_id: str | None, records: Iterable[Mapping[str, Any]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, float(v), int(r["t"] * 1000), int(r["step"] or 0))
                   for r in records for k, v in r["metrics"].items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])

    def stage_finished(self, run_id: str | None, ok: bool, metrics: Mapping[str, float],
                       tags: Mapping[str, str], files: Iterable[Path]) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                              tags=[RunTag(k, str(v)) for k, v in tags.items()])
        for f in files:
            if Path(f).is_file():
                self.client.log_artifact(run_id, str(f))
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def end(self, ok: bool) -> None:
        if self.client and self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, "FINISHED" if ok else "FAILED")

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(run_id, params=items[i:i + BATCH])


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def make_tracker(cfg: PipelineConfig) -> NullTracker:
    return MlflowTracker(cfg) if cfg.tracking.enabled else NullTracker()
