"""Apply a tracking journal to MLflow: ``python -m pipeline.mlflow_sync JOURNAL [--once]``.

Follows the journal while the pipeline that writes it is alive, and stops after its
``pipeline_end`` event (or when that process is gone and nothing new arrives). Progress is saved
in ``<journal>.state.json`` (byte offset and local key -> MLflow run id), so a sync that dies
resumes where it stopped; run creation looks runs up by their ``llmpipe.run_key`` tag first, so
re-applying an event never creates a second run.

Several runs may start at once on a fresh run root, each with its own sync: creating the embedded
SQLite store (MLflow runs its schema migrations on first use) and the experiment happens under a
file lock beside the database (``mlflow.db.lock``), or two migrations race and one sync dies with
``duplicate column name``. A tracking server creates its own schema; an experiment that another
sync created in the meantime is looked up again.

A sync that fails records why in its state (``error``, secrets masked) and exits non-zero:
``llmpipe run`` warns about it, ``llmpipe status`` shows it, ``llmpipe sync`` applies the rest.
The journal keeps the tracking URI with ``***`` for its credentials; the real one comes from the
caller (``LLMPIPE_SYNC_URIS``, or the config `llmpipe sync` loads).

What MLflow shows, and where it comes from:
- the experiment is tagged ``mlflow.experimentKind=custom_model_development`` (the model-training view;
  untagged, MLflow 3's UI opens it as a GenAI experiment), when created or first used; a kind someone
  chose in the UI is kept;
- the pipeline run is named by what its plan runs (``tiny: ran 3 (sft, align, quantize), 8 cached``), holds
  the resolved config (``resolved_config.json``) and, at its end, ``stages_ran``, ``stages_cached``,
  ``stages_failed``, ``stages_blocked`` and ``wall_s``;
- a ``lineage`` event (what a stage logged: pipeline/stage.py ``log_model``...) becomes, on the stage run:
  dataset inputs (digest = fingerprint or content digest, context tag ``mlflow.data.context``, row count in
  the profile); logged models (MLflow 3 ``LoggedModel``: source run, tags ``llmpipe.fingerprint``,
  ``llmpipe.model_path``, ``llmpipe.output_path``; the files are referenced, copied only with
  ``tracking.copy_models``; a version of a registered model with ``tracking.register_models``); and model
  metrics (``log_batch`` with ``model_id``), found by the model's path or fingerprint tag. A cached stage's
  run is linked to the logged model its producer made. Each logged model carries ``llmpipe.model_key``
  (stage run key / name), so re-applying an event never makes a second one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import LlmpipeError
from pipeline.files import write_json_atomic
from pipeline.processes import pid_alive
from pipeline.secrets import redact_text, unmask
from pipeline.tracking import SYNC_URIS_ENV, lock_path, pending_journals, state_path

log = logging.getLogger("llmpipe.mlflow_sync")

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
PARAM_BATCH = 100  # MLflow's limit on params per log_batch call
METRIC_BATCH = 1000
MAX_DIGEST_LENGTH = 36  # MLflow's limit on a dataset digest
_UNQUOTABLE = re.compile(r"['\\\\]")  # what an MLflow search filter value cannot hold, escaped or not
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"  # MLflow 3's model-training view
# Kinds MLflow's UI infers and may store on its own: replaced by ours. Any other value was chosen by someone.
INFERRED_KINDS = ("genai_development_inferred", "custom_model_development_inferred", "no_inferred_type")
STORE_LOCK_WAIT_S = 600.0  # creating a fresh SQLite store takes seconds; far longer means a stuck holder


class CredentialsMissing(LlmpipeError):
    """A journal's tracking URI was written with ``***`` for its credentials, and the caller did not
    give the URI they belong to."""


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Held while a sync creates or opens the MLflow store at ``uri`` and its experiment: an flock on
    ``<db>.lock`` beside an embedded SQLite database (in the run root, by default); nothing for a server."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as f:
        deadline = time.monotonic() + STORE_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gave up waiting {STORE_LOCK_WAIT_S:.0f}s for the lock {db}.lock") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class Sync:
    def __init__(self, journal: Path, uris: Sequence[str] = ()):
        """``uris``: the tracking URI and artifact location with credentials (the journal masks them)."""
        self.journal = journal
        self.uris = list(uris)
        self.state_file = state_path(journal)
        self.state: dict[str, Any] = {"offset": 0, "runs": {}, "done": False}
        if self.state_file.is_file():
            self.state.update(json.loads(self.state_file.read_text() or "{}"))
        self.client = None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.writer_pid: int | None = None
        self.uri: str | None = None
        self.copy_models = False
        self.register_models: dict[str, str] = {}

    # -- driving -----------------------------------------------------------------------------
    def run(self, follow: bool = True, idle_exit_s: float = 5.0) -> bool:
        """Apply the journal; False when another sync process already holds it."""
        lock = open(lock_path(self.journal), "a")  # noqa: SIM115 - held until the process exits
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            return False
        if self.state_file.is_file():  # re-read under the lock: another sync may have advanced it
            self.state.update(json.loads(self.state_file.read_text() or "{}"))
        try:
            self._follow(follow, idle_exit_s)
        except Exception as exc:
            # Kept for `llmpipe run` and `llmpipe status`; the traceback goes to the sync's log.
            first_line = (str(exc).strip().splitlines() or [""])[0]
            self.state["error"] = redact_text(f"{type(exc).__name__}: {first_line}")[:500]
            self.state["failed_at"] = time.time()
            self._save()
            raise
        finally:
            lock.close()
        return True

    def _follow(self, follow: bool, idle_exit_s: float) -> None:
        idle_since = time.monotonic()
        while True:
            progressed = self._apply_available()
            if self.state.get("done"):
                return
            if not follow:
                return
            if progressed:
                idle_since = time.monotonic()
            elif self.writer_pid and not pid_alive(self.writer_pid) and time.monotonic() - idle_since > idle_exit_s:
                log.warning("pipeline process %s is gone without a pipeline_end: marking its runs failed",
                            self.writer_pid)
                self._finish_orphans()
                return
            time.sleep(0.5)

    def _apply_available(self) -> bool:
        with open(self.journal, encoding="utf-8") as f:
            f.seek(self.state["offset"])
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        if not complete:
            return False
        for line in complete.splitlines():
            if line.strip():
                self._apply(json.loads(line))
            self.state["offset"] += len(line.encode()) + 1
            self._save()
        return True

    def _save(self) -> None:
        # Saved after every event: no fsync (a state lost in a crash only re-applies events, which
        # finds the runs already created by their run key).
        write_json_atomic(self.state_file, self.state, fsync=False)

    # -- events ------------------------------------------------------------------------------
    def _connect(self, event: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        uri = self._unmask(event["uri"])
        with store_lock(uri):  # the first use of a fresh store creates its schema
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment(event["experiment"], self._unmask(event.get("artifact_location")))
        self.writer_pid = event.get("pid")
        self.uri = uri
        self.copy_models = bool(event.get("copy_models"))
        self.register_models = dict(event.get("register_models") or {})

    def _unmask(self, value: str | None) -> str | None:
        real = unmask(value, self.uris)
        if value and real is None:
            raise CredentialsMissing(
                f"{self.journal.name}: its tracking location {value} needs credentials the journal does not keep: "
                "run `llmpipe sync` with the tracking.uri (or MLFLOW_TRACKING_URI) of the run that wrote it")
        return real

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name, artifact_location, tags={KIND_TAG: KIND})
            except MlflowException:  # a tracking server: another sync created it since we looked
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        kind = exp.tags.get(KIND_TAG)
        if kind is None or kind in INFERRED_KINDS:  # first use by llmpipe (or by a version before this tag)
            self.client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
        return exp.experiment_id

    def _ensure_connected(self) -> None:
        """When resuming past the start event, re-read it to connect."""
        if self.client is not None:
            return
        with open(self.journal, encoding="utf-8") as f:
            first = json.loads(f.readline())  # the pipeline_start event says where to connect
        self._connect(first)
        self.parent_id = self.state["runs"].get(first["key"])

    def _apply(self, ev: dict[str, Any]) -> None:
        kind = ev["event"]
        if kind == "pipeline_start":
            self._connect(ev)
            self.parent_id = self._create_run(ev["key"], ev["run_name"], ev["tags"], ev["params"])
            if not self.state.get("config_logged"):
                self.client.log_text(self.parent_id, json.dumps(ev["resolved_config"], indent=2, default=str),
                                     "resolved_config.json")
                self.state["config_logged"] = True
            return
        self._ensure_connected()
        if kind == "stage_start":
            tags = {"mlflow.parentRunId": self.parent_id, **ev["tags"]}
            produced_by = tags.get("llmpipe.produced_by_key")
            if produced_by:
                tags["llmpipe.produced_by_run_id"] = self._find_run(produced_by) or "unknown"
            self._create_run(ev["key"], ev["stage"], tags, ev["params"])
        elif kind == "metrics":
            self._log_metrics(self.state["runs"][ev["key"]], ev["records"])
        elif kind == "lineage":
            self._lineage(ev)
        elif kind == "stage_end":
            self._end_stage(ev)
        elif kind == "pipeline_end":
            if ev.get("metrics"):
                self._log_metrics(self.parent_id, [{"t": ev["t"], "step": 0, "metrics": ev["metrics"]}])
            self.client.set_terminated(self.parent_id, "FINISHED" if ev["ok"] else "FAILED")
            self.state["done"] = True
            self.state.pop("error", None)

    def _create_run(self, key: str, name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        from mlflow.entities import Param

        run_id = self.state["runs"].get(key) or self._find_run(key)
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
            run_id = run.info.run_id
            items = [Param(k, _param_value(v)) for k, v in params.items()]
            for i in range(0, len(items), PARAM_BATCH):
                self.client.log_batch(run_id, params=items[i:i + PARAM_BATCH])
        self.state["runs"][key] = run_id
        return run_id

    def _find_run(self, key: str) -> str | None:
        if key in self.state["runs"]:
            return self.state["runs"][key]
        found = self.client.search_runs([self.experiment_id], f"tags.`llmpipe.run_key` = '{key}'", max_results=1)
        return found[0].info.run_id if found else None

    def _log_metrics(self, run_id: str, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, float(v), int(r["t"] * 1000), int(r.get("step") or 0))
                   for r in records for k, v in r["metrics"].items()]
        for i in range(0, len(metrics), METRIC_BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + METRIC_BATCH])

    def _end_stage(self, ev: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        run_id = self.state["runs"][ev["key"]]
        self._log_metrics(run_id, [{"t": ev["t"], "step": 0, "metrics": ev["metrics"]}])
        if ev["tags"]:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in ev["tags"].items()])
        for f in ev["files"]:
            if Path(f).is_file():
                self.client.log_artifact(run_id, f)
        self.client.set_terminated(run_id, "FINISHED" if ev["ok"] else "FAILED")
        self.state.setdefault("ended", []).append(ev["key"])

    # -- lineage: datasets, logged models, model metrics ------------------------------------------
    def _lineage(self, ev: dict[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        run_id = self.state["runs"][ev["key"]]
        inputs = [DatasetInput(Dataset(d["name"], _digest(d["digest"]), d["source_type"],
                                       json.dumps({"uri": d["source"]}),
                                       profile=json.dumps({"num_rows": d["rows"], "digest": d["digest"]})),
                               tags=[InputTag("mlflow.data.context", d["context"])]) for d in ev["datasets"]]
        if inputs:  # MLflow keeps one dataset per name and digest, and one link per run: re-applying adds nothing
            self.client.log_inputs(run_id, datasets=inputs)
        for model in ev["models"]:
            self._logged_model(ev, run_id, model)
        for step, scores in enumerate(ev["model_metrics"]):
            self._model_scores(run_id, ev["t"], scores, step, bool(ev.get("cached")))

    def _logged_model(self, ev: dict[str, Any], run_id: str, m: dict[str, Any]) -> None:
        """The stage's logged model: made once per stage run and name; a cached stage's run is linked to the
        model its producer logged for the same path (made now if the producer's run logged none)."""
        from mlflow.entities import LoggedModelStatus

        key = f"{ev['key']}/{m['name']}"
        done = self.state.setdefault("models", {})
        if key in done:
            return
        found = self._models_tagged("llmpipe.model_key", key)
        if not found and ev.get("cached"):
            found = self._models_tagged("llmpipe.model_path", m["path"])
            if found:
                self._link(run_id, found[0].model_id)
                done[key] = found[0].model_id
                return
        if found:
            model = found[0]
        else:
            tags = {**m["tags"], "llmpipe.fingerprint": ev["fingerprint"], "llmpipe.model_path": m["path"],
                    "llmpipe.output_path": ev["output"], "llmpipe.model_key": key, "llmpipe.run_key": ev["key"]}
            if ev.get("stage"):
                tags["llmpipe.stage"] = ev["stage"]
            params = {k: _param_value(v) for k, v in m["params"].items()}
            model = self.client.create_logged_model(self.experiment_id, name=m["name"], source_run_id=run_id,
                                                    tags=tags, params=params)
        if model.status != LoggedModelStatus.READY:  # a sync that died half way finishes the job
            path = Path(m["path"])
            if self.copy_models and path.is_dir():
                self.client.log_model_artifacts(model.model_id, str(path))
            elif self.copy_models and path.is_file():
                self.client.log_model_artifact(model.model_id, str(path))
            self._link(run_id, model.model_id)
            if m["name"] in self.register_models:
                self._register(self.register_models[m["name"]], model.model_id, run_id, m["path"])
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        done[key] = model.model_id

    def _link(self, run_id: str, model_id: str) -> None:
        """The model as an output of the run (the runs table's Models column), once."""
        from mlflow.entities import LoggedModelOutput

        outputs = self.client.get_run(run_id).outputs
        if model_id not in {o.model_id for o in (outputs.model_outputs if outputs else [])}:
            self.client.log_outputs(run_id, [LoggedModelOutput(model_id, 0)])

    def _register(self, name: str, model_id: str, run_id: str, path: str) -> None:
        """A new version of the registered model ``name`` for the logged model (tracking.register_models), its
        source ``models:/<model_id>`` as MLflow's own ``register_model`` makes it (the UI links the two); the
        logged model lists its versions in ``mlflow.modelVersions``, as there."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        if any(v.name == name for v in self.client.search_model_versions(f"tags.`llmpipe.model_id` = '{model_id}'")):
            return
        # A SQL registry looks a models:/ source up with a client of the *global* tracking URI (MLflow 3.17).
        with _use_tracking_uri(self.uri):
            version = self.client.create_model_version(
                name, f"models:/{model_id}", run_id=run_id, model_id=model_id, await_creation_for=0,
                tags={"llmpipe.model_id": model_id, "llmpipe.model_path": path})
        listed = json.loads(self.client.get_logged_model(model_id).tags.get("mlflow.modelVersions") or "[]")
        self.client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(
            [*listed, {"name": version.name, "version": version.version}])})

    def _models_tagged(self, tag: str, value: str) -> list[Any]:
        """The experiment's logged models whose ``tag`` is ``value``, newest first, one per model path (an
        output re-made by run.force replaces the model of the same path)."""
        found, token = [], None
        # MLflow's filter has no escape for a quote in a value (3.17): such a value is matched with LIKE, the
        # quote as a wildcard, and compared exactly here.
        plain = "'" not in value and "\\" not in value
        match = f"= '{value}'" if plain else "LIKE '" + _UNQUOTABLE.sub("_", value) + "'"
        while True:
            page = self.client.search_logged_models([self.experiment_id], f"tags.`{tag}` {match}",
                                                    order_by=[{"field_name": "creation_timestamp", "ascending": False}],
                                                    page_token=token)
            found.extend(m for m in page if m.tags.get(tag) == value)
            token = page.token
            if not token:
                break
        newest: dict[str, Any] = {}
        for model in found:
            newest.setdefault(model.tags.get("llmpipe.model_path", model.model_id), model)
        return list(newest.values())

    def _model_scores(self, run_id: str, t: float, scores: dict[str, Any], step: int, cached: bool) -> None:
        """Scores of a model, on its logged model (found by path, else by fingerprint) and this run; on this run
        only, as ``<label>.<metric>``, when no logged model has that path or fingerprint (an outside model).
        MLflow puts a model's metric on the run too: each model scored by the run has its own step there (the
        order it was scored in), so the run's history of a metric lists every model's score. A cached stage's
        run adds scores only to models that do not have them yet (its producer's run gave them)."""
        from mlflow.entities import Metric

        models = scores.get("path") and self._models_tagged("llmpipe.model_path", scores["path"])
        if not models and scores.get("fingerprint"):
            models = self._models_tagged("llmpipe.fingerprint", scores["fingerprint"])
        at = int(t * 1000)
        if cached:
            models = [m for m in models or [] if not set(scores["metrics"]) <= {x.key for x in m.metrics or []}]
            if not models:
                return
        if models:
            metrics = [Metric(k, float(v), at, step, model_id=m.model_id)
                       for m in models for k, v in scores["metrics"].items()]
        else:
            metrics = [Metric(f"{scores['label']}.{k}", float(v), at, 0) for k, v in scores["metrics"].items()]
        for i in range(0, len(metrics), METRIC_BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + METRIC_BATCH])

    def _finish_orphans(self) -> None:
        ended = set(self.state.get("ended", []))
        for key, run_id in self.state["runs"].items():
            if key not in ended:
                self.client.set_terminated(run_id, "FAILED")
        self.state["done"] = True
        self.state.pop("error", None)
        self._save()


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def _digest(digest: str) -> str:
    """A digest within MLflow's limit: ``xxh3_128:<32 hex>`` loses its algorithm name (the profile keeps it whole)."""
    return digest if len(digest) <= MAX_DIGEST_LENGTH else digest.rpartition(":")[2][:MAX_DIGEST_LENGTH]


def sync_pending(root: Path, uris: Sequence[str] = ()) -> tuple[int, dict[Path, str]]:
    """Apply every journal under ``root`` that was not applied completely (``uris`` as for :class:`Sync`).
    Returns how many this call applied, and why each one that failed did (it stays pending)."""
    applied, failed = 0, {}
    for journal in pending_journals(root):
        log.info("applying %s", journal)
        try:
            ran = Sync(journal, uris).run(follow=False)
        except Exception as exc:  # noqa: BLE001 - one journal's failure must not keep the others out
            log.error("%s: %s", journal.name, exc)
            failed[journal] = redact_text(f"{type(exc).__name__}: {exc}")
            continue
        if not ran:
            log.info("%s is being applied by another sync process", journal.name)
        applied += ran
    return applied, failed


def main(argv: list[str] | None = None) -> int:
    from pipeline.logs import setup_logging

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m pipeline.mlflow_sync JOURNAL [--once]", file=sys.stderr)
        return 2
    setup_logging(stream=sys.stdout)
    uris = json.loads(os.environ.get(SYNC_URIS_ENV) or "[]")
    try:
        Sync(Path(argv[0]), uris).run(follow="--once" not in argv)
    except Exception:  # noqa: BLE001 - logged through the filter that masks secrets, not as a raw traceback
        log.exception("applying %s to MLflow failed; `llmpipe sync` applies the rest", argv[0])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
