"""Lineage for MLflow: one parent run per pipeline invocation, one nested run per stage.

The runner never talks to MLflow itself. It appends events to a journal
(``<root>/.tracking/<key>.jsonl``) and a separate sync process (``pipeline.mlflow_sync``)
applies them to MLflow while the pipeline runs. Why:
- importing mlflow takes ~2 s, longer than a whole fully cached run is allowed to take;
- a slow or unreachable tracking server never blocks or fails a stage: the journal keeps the
  events, and the next `llmpipe run` (or `llmpipe sync`) applies whatever was not applied yet.

Tracking is a hook around stages, not code inside them: stages report metrics to their own
metrics file and the runner forwards them here. Likewise the models, datasets and model scores a
stage logs (``StageContext.log_model``, ``log_dataset``, ``log_model_metrics``) are a file in its
output (``_logged.json``) that the runner reads when the stage ends, or finds it cached
(:func:`logged_lineage`), and journals as a ``lineage`` event: the sync makes MLflow logged models
(references to the committed files, tagged with the fingerprint), dataset inputs and model metrics.

The journal holds no secret (pipeline/secrets.py): params, the resolved config, tags and the
tracking URI are written with ``***`` in their place. The sync process gets the tracking URI and
artifact location as they are through its environment (``LLMPIPE_SYNC_URIS``), and ``llmpipe sync``
from the config it loads.

A sync that fails records why in its state file; ``llmpipe run`` warns about it (with the command
that finishes the job, ``llmpipe sync``) and ``llmpipe status`` shows what is not in MLflow yet
(:func:`sync_summary`).
"""

from __future__ import annotations

import fcntl
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
from pipeline.processes import child_env
from pipeline.secrets import redact, redact_overrides, redact_text, redact_uri
from pipeline.stage import LOGGED_FILE

log = logging.getLogger("llmpipe.tracking")

JOURNAL_DIR = ".tracking"
SYNC_URIS_ENV = "LLMPIPE_SYNC_URIS"  # JSON list: the tracking URI and artifact location, credentials included


def tracking_uri(cfg: PipelineConfig) -> str:
    """MLFLOW_TRACKING_URI wins, then tracking.uri, then an embedded SQLite store under run.root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or f"sqlite:///{cfg.root / 'mlflow.db'}"


def artifact_location(cfg: PipelineConfig) -> str | None:
    if cfg.tracking.artifact_location:
        return cfg.tracking.artifact_location
    if tracking_uri(cfg).startswith("sqlite:///"):
        return (cfg.root / "mlartifacts").as_uri()
    return None


def tracking_locations(cfg: PipelineConfig) -> list[str]:
    """The tracking URI and artifact location as they are (credentials included): what a sync needs
    besides the journal, which masks them."""
    return [u for u in (tracking_uri(cfg), artifact_location(cfg)) if u]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


# MLflow 3.17's UI takes the view of an experiment (GenAI or model training) from this query parameter or
# from the GenAI / Model training switch of its sidebar, remembered by the browser, and not from the
# experiment's `mlflow.experimentKind` tag, which the sync sets all the same (MLflow's own notion of the kind).
UI_VIEW_QUERY = "workflowType=machine_learning"


def ui_link(base_url: str, experiment_id: str | None = None, tab: str | None = None) -> str:
    """The address of an experiment (or of the experiment list) in the MLflow UI at ``base_url``, opening in the
    model-training view (runs, models, model registry) rather than the GenAI one (traces); ``tab``: one of the
    experiment's pages (``runs``, ``models``)."""
    page = "/".join(["experiments", *([experiment_id] if experiment_id else []), *([tab] if tab else [])])
    return f"{base_url.rstrip('/')}/#/{page}?{UI_VIEW_QUERY}"


def new_key() -> str:
    return uuid.uuid4().hex


def _masked_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {k: redact_text(str(v)) for k, v in tags.items()}


class NullTracker:
    """Used with tracking.enabled=false: records nothing."""

    key: str | None = None
    journal: Path | None = None
    sync_process: subprocess.Popen | None = None

    def start(self, cfg: PipelineConfig, tags: Mapping[str, str], run_name: str | None = None) -> None: ...
    def stage_started(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str | None:
        return None
    def log_records(self, key: str | None, records: Iterable[Mapping[str, Any]]) -> None: ...
    def stage_lineage(self, key: str | None, lineage: Mapping[str, Any]) -> None: ...
    def stage_finished(self, key: str | None, ok: bool, metrics: Mapping[str, float],
                       tags: Mapping[str, str], files: Iterable[Path]) -> None: ...
    def end(self, ok: bool, metrics: Mapping[str, float] | None = None) -> None: ...

    def wait(self, timeout: float = 120.0) -> bool:
        """Block until the sync process has applied the journal; True if it finished cleanly."""
        return True

    def warnings(self) -> list[str]:
        """What went wrong with tracking that the user must hear of (a sync that failed), as sentences."""
        return []


class JournalTracker(NullTracker):
    """Writes tracking events to a journal and starts the process that applies them to MLflow."""

    def __init__(self, cfg: PipelineConfig, start_sync: bool = True):
        self.cfg = cfg
        self.start_sync = start_sync
        self.key = new_key()
        self.journal = cfg.root / JOURNAL_DIR / f"{time.strftime('%Y%m%dT%H%M%S')}-{self.key[:8]}.jsonl"
        self._file = None
        self.uris = tracking_locations(cfg)
        self.earlier_syncs: list[tuple[Path, subprocess.Popen]] = []  # started for earlier runs' journals
        self.waited_out = False  # wait() gave up while the sync was still at work

    def _emit(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({"event": event, "t": time.time(), **fields}, default=str) + "\n")
        self._file.flush()

    def start(self, cfg: PipelineConfig, tags: Mapping[str, str], run_name: str | None = None) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.journal, "a", encoding="utf-8")  # noqa: SIM115 - open for the run's lifetime
        location = artifact_location(cfg)
        self._emit("pipeline_start", key=self.key, run_name=run_name or f"pipeline-{cfg.name}", pid=os.getpid(),
                   copy_models=cfg.tracking.copy_models, register_models=dict(cfg.tracking.register_models),
                   uri=redact_uri(tracking_uri(cfg)), experiment=cfg.tracking.experiment,
                   artifact_location=location and redact_uri(location),
                   tags=_masked_tags({**tags, "llmpipe.run_key": self.key}),
                   params={"config": cfg.name, "overrides": " ".join(redact_overrides(cfg.overrides)) or "-"},
                   resolved_config=redact(cfg.resolved))
        if self.start_sync:
            self.sync_process = start_sync_process(self.journal, self.uris)
        for pending in pending_journals(cfg.root, exclude=self.journal):
            error = sync_error(pending)
            if error:
                log.warning("tracking journal %s did not reach MLflow earlier (%s): applying it again",
                            pending.name, error)
            else:
                log.info("applying an earlier, unfinished tracking journal %s", pending.name)
            self.earlier_syncs.append((pending, start_sync_process(pending, self.uris)))

    def stage_started(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        key = new_key()
        self._emit("stage_start", key=key, stage=name, params=flatten(redact(params, f"stage.{name}")),
                   tags=_masked_tags({**tags, "llmpipe.run_key": key}))
        return key

    def log_records(self, key: str | None, records: Iterable[Mapping[str, Any]]) -> None:
        self._emit("metrics", key=key, records=list(records))

    def stage_lineage(self, key: str | None, lineage: Mapping[str, Any]) -> None:
        """The models, datasets and model scores of a stage (:func:`logged_lineage`), before its stage_end."""
        self._emit("lineage", key=key, **redact(dict(lineage)))

    def stage_finished(self, key: str | None, ok: bool, metrics: Mapping[str, float],
                       tags: Mapping[str, str], files: Iterable[Path]) -> None:
        self._emit("stage_end", key=key, ok=ok, metrics=dict(metrics), tags=_masked_tags(tags),
                   files=[str(f) for f in files])

    def end(self, ok: bool, metrics: Mapping[str, float] | None = None) -> None:
        self._emit("pipeline_end", key=self.key, ok=ok, metrics=dict(metrics or {}))
        if self._file:
            self._file.close()
            self._file = None

    def wait(self, timeout: float = 120.0) -> bool:
        """Block until this run's journal is in MLflow, applied by its own sync process or by another
        that holds it (a run starting meanwhile takes up journals not done yet); True when it is."""
        if self.sync_process is None:
            return journal_done(self.journal)
        deadline = time.monotonic() + timeout
        try:
            self.sync_process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.waited_out = True
            return False
        while not journal_done(self.journal) and sync_running(self.journal):
            if time.monotonic() > deadline:
                self.waited_out = True
                return False
            time.sleep(0.2)
        return journal_done(self.journal)

    def warnings(self) -> list[str]:
        out = []
        if self.waited_out:
            out.append(f"tracking: MLflow has not caught up with {self.journal} yet; the sync goes on in the "
                       "background (`llmpipe status` shows when it is done)")
        for journal, proc in [(self.journal, self.sync_process), *self.earlier_syncs]:
            code = proc.poll() if proc is not None else None
            if code not in (None, 0):
                why = sync_error(journal) or f"the sync process exited with status {code}"
                out.append(f"tracking: the MLflow sync of {journal} failed ({why}); the journal keeps every "
                           "event: run `llmpipe sync` to apply it")
        return out


def logged_lineage(stage: str, output: Path, fingerprint: str, inputs: Mapping[str, Path],
                   input_fingerprints: Mapping[str, str], cached: bool = False) -> dict[str, Any] | None:
    """What the stage whose committed output is ``output`` logged (``_logged.json``, pipeline/stage.py), with
    paths made absolute (a path the stage gave under its in-progress dir is under ``output`` now) and the
    digests it left to the orchestrator filled in: a dataset in the output gets the stage's fingerprint, one in
    an input that input's fingerprint; a scored model given by path gets the fingerprint of the input that
    holds it. None when the stage logged nothing."""
    listing = output / LOGGED_FILE
    if not listing.is_file():
        return None
    logged = json.loads(listing.read_text())

    def producer(path: str) -> str | None:
        """The fingerprint of the input that holds ``path``, if any."""
        p = Path(path)
        for ref, where in inputs.items():
            w = Path(where).absolute()
            if (p == w or w in p.parents) and ref in input_fingerprints:
                return input_fingerprints[ref]
        return None

    def place(entry: Mapping[str, Any]) -> str:
        return str(output / entry["output"]) if "output" in entry else entry.get("path") or entry["uri"]

    models = [{"name": m["name"], "path": place(m), "params": m.get("params", {}), "tags": m.get("tags", {})}
              for m in logged.get("models", [])]
    datasets = []
    for d in logged.get("datasets", []):
        source = place(d)
        digest = d.get("digest") or (fingerprint if "output" in d else producer(source))
        kind = d.get("source_type") or ("local" if "uri" not in d else source.split("://", 1)[0])
        datasets.append({"name": d["name"], "source": source, "source_type": kind, "digest": digest or "unknown",
                         "rows": d.get("rows"), "context": d.get("context", "input")})
    scores = [{"path": s.get("path"), "fingerprint": s.get("fingerprint") or (s.get("path") and producer(s["path"])),
               "label": s.get("label"), "metrics": s["metrics"]} for s in logged.get("model_metrics", [])]
    return {"stage": stage, "fingerprint": fingerprint, "output": str(output), "cached": cached, "models": models,
            "datasets": datasets, "model_metrics": scores}


def state_path(journal: Path) -> Path:
    return journal.with_suffix(".state.json")


def lock_path(journal: Path) -> Path:
    """Held by the sync process applying ``journal`` (one at a time)."""
    return journal.with_suffix(".lock")


def sync_state(journal: Path) -> dict[str, Any]:
    """What the sync of ``journal`` saved: offset, run ids, ``done``, and ``error`` when it failed."""
    try:
        return json.loads(state_path(journal).read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return {}


def journal_done(journal: Path) -> bool:
    return bool(sync_state(journal).get("done"))


def sync_error(journal: Path) -> str | None:
    """Why the last sync of ``journal`` failed (secrets masked), or None."""
    return sync_state(journal).get("error")


def sync_running(journal: Path) -> bool:
    """Whether a sync process holds ``journal`` now."""
    try:
        f = open(lock_path(journal))  # noqa: SIM115 - closed below; never created here
    except FileNotFoundError:
        return False
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False


def pending_journals(root: Path, exclude: Path | None = None) -> list[Path]:
    """Journals whose events were not all applied yet (a sync already at work on one just exits)."""
    return [j for j in sorted((root / JOURNAL_DIR).glob("*.jsonl")) if j != exclude and not journal_done(j)]


def sync_summary(root: Path) -> str | None:
    """One line for `llmpipe status`: which journals are not in MLflow yet, and why; None without journals."""
    journals = sorted((root / JOURNAL_DIR).glob("*.jsonl"))
    if not journals:
        return None
    pending = pending_journals(root)
    if not pending:
        return f"tracking: all {len(journals)} journal(s) in MLflow"
    busy = [j for j in pending if sync_running(j)]
    waiting = [j for j in pending if j not in busy]
    parts = [f"{len(busy)} journal(s) being applied to MLflow now"] if busy else []
    if waiting:
        errors = [f"{j.name}: {e}" for j in waiting if (e := sync_error(j))]  # the newest two say enough
        parts.append(f"{len(waiting)} journal(s) not yet in MLflow" + (f" ({'; '.join(errors[-2:])})" if errors else "")
                     + ": run `llmpipe sync`")
    return "tracking: " + "; ".join(parts)


def start_sync_process(journal: Path, uris: Iterable[str] = ()) -> subprocess.Popen:
    """Apply ``journal`` to MLflow in a detached process (it follows the journal until the run ends).
    ``uris``: the tracking URI and artifact location with their credentials, which the journal masks."""
    log_file = journal.with_suffix(".sync.log")
    with open(log_file, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.mlflow_sync", str(journal)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env({SYNC_URIS_ENV: json.dumps(list(uris))}), start_new_session=True)


def make_tracker(cfg: PipelineConfig) -> NullTracker:
    return JournalTracker(cfg) if cfg.tracking.enabled else NullTracker()
