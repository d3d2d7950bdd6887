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
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
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
        if exp:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location)
        except MlflowException:  # a tracking server: another sync created it since we looked
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
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
        elif kind == "stage_end":
            self._end_stage(ev)
        elif kind == "pipeline_end":
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
