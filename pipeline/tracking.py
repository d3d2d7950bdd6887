"""Lineage for MLflow: one parent run per pipeline invocation, one nested run per stage.

The runner never talks to MLflow itself. It appends events to a journal
(``<root>/.tracking/<key>.jsonl``) and a separate sync process (``pipeline.mlflow_sync``)
applies them to MLflow while the pipeline runs. Why:
- importing mlflow takes ~2 s, longer than a whole fully cached run is allowed to take;
- a slow or unreachable tracking server never blocks or fails a stage: the journal keeps the
  events, and the next `llmpipe run` (or `llmpipe sync`) applies whatever was not applied yet.

Tracking is a hook around stages, not code inside them: stages report metrics to their own
metrics file and the runner forwards them here.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig

log = logging.getLogger("llmpipe.tracking")

JOURNAL_DIR = ".tracking"


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


def new_key() -> str:
    return uuid.uuid4().hex


class NullTracker:
    """Used with tracking.enabled=false: records nothing."""

    key: str | None = None
    journal: Path | None = None
    sync_process: subprocess.Popen | None = None

    def start(self, cfg: PipelineConfig, tags: Mapping[str, str]) -> None: ...
    def stage_started(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str | None:
        return None
    def log_records(self, key: str | None, records: Iterable[Mapping[str, Any]]) -> None: ...
    def stage_finished(self, key: str | None, ok: bool, metrics: Mapping[str, float],
                       tags: Mapping[str, str], files: Iterable[Path]) -> None: ...
    def end(self, ok: bool) -> None: ...

    def wait(self, timeout: float = 120.0) -> bool:
        """Block until the sync process has applied the journal; True if it finished cleanly."""
        return True


class JournalTracker(NullTracker):
    """Writes tracking events to a journal and starts the process that applies them to MLflow."""

    def __init__(self, cfg: PipelineConfig, start_sync: bool = True):
        self.cfg = cfg
        self.start_sync = start_sync
        self.key = new_key()
        self.journal = cfg.root / JOURNAL_DIR / f"{time.strftime('%Y%m%dT%H%M%S')}-{self.key[:8]}.jsonl"
        self._file = None

    def _emit(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({"event": event, "t": time.time(), **fields}, default=str) + "\n")
        self._file.flush()

    def start(self, cfg: PipelineConfig, tags: Mapping[str, str]) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.journal, "a", encoding="utf-8")  # noqa: SIM115 - open for the run's lifetime
        self._emit("pipeline_start", key=self.key, run_name=f"pipeline-{cfg.name}", pid=os.getpid(),
                   uri=tracking_uri(cfg), experiment=cfg.tracking.experiment,
                   artifact_location=artifact_location(cfg), tags={**tags, "llmpipe.run_key": self.key},
                   params={"config": cfg.name, "overrides": " ".join(cfg.overrides) or "-"},
                   resolved_config=cfg.resolved)
        if self.start_sync:
            self.sync_process = start_sync_process(self.journal)
        for pending in pending_journals(cfg.root, exclude=self.journal):
            log.info("applying an earlier, unfinished tracking journal %s", pending.name)
            start_sync_process(pending)

    def stage_started(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        key = new_key()
        self._emit("stage_start", key=key, stage=name, params=flatten(params),
                   tags={**tags, "llmpipe.run_key": key})
        return key

    def log_records(self, key: str | None, records: Iterable[Mapping[str, Any]]) -> None:
        self._emit("metrics", key=key, records=list(records))

    def stage_finished(self, key: str | None, ok: bool, metrics: Mapping[str, float],
                       tags: Mapping[str, str], files: Iterable[Path]) -> None:
        self._emit("stage_end", key=key, ok=ok, metrics=dict(metrics), tags=dict(tags),
                   files=[str(f) for f in files])

    def end(self, ok: bool) -> None:
        self._emit("pipeline_end", key=self.key, ok=ok)
        if self._file:
            self._file.close()
            self._file = None

    def wait(self, timeout: float = 120.0) -> bool:
        if self.sync_process is None:
            return True
        try:
            return self.sync_process.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            return False


def state_path(journal: Path) -> Path:
    return journal.with_suffix(".state.json")


def pending_journals(root: Path, exclude: Path | None = None) -> list[Path]:
    """Journals whose events were not all applied yet (a sync already at work on one just exits)."""
    out = []
    for journal in sorted((root / JOURNAL_DIR).glob("*.jsonl")):
        state = state_path(journal)
        if journal != exclude and not (state.is_file() and json.loads(state.read_text() or "{}").get("done")):
            out.append(journal)
    return out


def start_sync_process(journal: Path) -> subprocess.Popen:
    """Apply ``journal`` to MLflow in a detached process (it follows the journal until the run ends)."""
    log_file = journal.with_suffix(".sync.log")
    with open(log_file, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.mlflow_sync", str(journal)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def make_tracker(cfg: PipelineConfig) -> NullTracker:
    return JournalTracker(cfg) if cfg.tracking.enabled else NullTracker()
