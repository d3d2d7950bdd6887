"""What a stage is, and what it is handed when it runs."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.files import write_json_atomic
from pipeline.sharding import valid_phase

Metrics = Mapping[str, float | int]
FINAL_PHASE = "final"  # reserved: what a cluster calls the job that runs the stage whole and commits
ARTIFACTS_FILE = "_artifacts.json"  # files a stage asked to attach to its tracking run
# models, datasets and model scores a stage logged (StageContext.log_model, log_dataset, log_model_metrics):
# read by the runner when the stage ends, and by a later run that finds the output cached
LOGGED_FILE = "_logged.json"


@dataclass(frozen=True)
class Stage:
    """A lifecycle step with declared inputs and outputs.

    ``name`` is the one name used everywhere: module, config group ``stage/<name>``, output
    folder ``<root>/<name>/<name>-<fingerprint>`` and MLflow run name.
    """

    name: str
    config: type  # frozen dataclass: the schema of conf/stage/<name>/*.yaml
    run: Callable[[Any, StageContext], Metrics | None]  # writes only under ctx.output_dir
    inputs: tuple[str, ...] = ()  # "<stage>.<artifact>" references
    outputs: tuple[str, ...] = ()  # artifact names created under the output dir
    version: int = 1  # bump when the code's results change: it re-addresses the output
    unhashed: frozenset[str] = frozenset()  # execution-only config fields (dotted paths)
    resumable: bool = False  # True: a failed attempt's partial output is handed to the next
    # Which of ``inputs`` this config needs (a subset, in any order); None: all of them. The DAG is built
    # from what the resolved config selects: an sft whose base_model is a local dir and whose data are
    # files needs no upstream stage at all, and a run plans only what its final stages need.
    select_inputs: Callable[[Any], Sequence[str]] | None = None
    # State of outside sources (files, model dirs, hub revisions), folded into the fingerprint: a flat
    # {"<key>": state} is best (digests from pipeline/content.py), `llmpipe why` then names the key.
    external: Callable[[Any], Any] | None = None
    # Plan-time check of the outside inputs the config names (files, globs, model dirs): preflight(cfg)
    # returns (key, problem) pairs, keys relative to the stage's config. `plan` and `run` call it for
    # every stage that would run, before anything runs or is created. Cheap: see pipeline/inputs.py.
    preflight: Callable[[Any], Sequence[tuple[str, str]]] | None = None
    description: str = ""
    # The phases (named maps over shards: map_shards(..., phase=...)) a cluster may split across the
    # tasks of a job array, one array per phase, in the order the stage runs them; a map not named
    # here always runs whole; (): the stage always runs as one job. sharding.single(name) marks a phase
    # that is a step of the stage's own work, ended by sharding.end_phase(name): one task of its own.
    # Needs resumable=True (the tasks share the partial output). See pipeline/sharding.py.
    shard_phases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"stage name {self.name!r} must be a Python identifier")
        for ref in self.inputs:
            if ref.count(".") != 1 or not all(ref.split(".")):
                raise ValueError(f"stage '{self.name}': input {ref!r} must look like '<stage>.<artifact>'")
        if len(set(self.outputs)) != len(self.outputs):
            raise ValueError(f"stage '{self.name}': outputs {self.outputs} repeat a name")
        if not isinstance(self.shard_phases, tuple) or not all(map(valid_phase, self.shard_phases)):
            raise ValueError(f"stage '{self.name}': shard_phases must be a tuple of phase names (identifiers), "
                             f"got {self.shard_phases!r}")
        if len(set(self.shard_phases)) != len(self.shard_phases) or FINAL_PHASE in self.shard_phases:
            raise ValueError(f"stage '{self.name}': shard_phases {self.shard_phases} repeat a name or use "
                             f"'{FINAL_PHASE}' (the name of the job that commits)")
        if self.shard_phases and not self.resumable:
            raise ValueError(f"stage '{self.name}': shard_phases={self.shard_phases} needs resumable=True "
                             "(the array tasks and the final job share one partial output)")

    def output_ref(self, artifact: str) -> str:
        return f"{self.name}.{artifact}"

    def needed_inputs(self, config: Any) -> tuple[str, ...]:
        """The declared inputs ``config`` selects, in declaration order (all when nothing selects)."""
        if self.select_inputs is None:
            return self.inputs
        chosen = set(self.select_inputs(config))
        unknown = chosen - set(self.inputs)
        if unknown:
            raise ValueError(f"stage '{self.name}': select_inputs returned {sorted(unknown)}, which it does not "
                             f"declare in inputs {self.inputs}")
        return tuple(ref for ref in self.inputs if ref in chosen)


@dataclass(frozen=True)
class Project:
    """Everything the orchestrator needs to know about a concrete pipeline.

    ``stages`` is the explicit registry. ``shared`` maps top-level config groups the project owns
    (e.g. ``model``) to their schema dataclass; stages reach them by interpolation
    (``model: ${model}``) so that only stages that use a group are fingerprinted on it.
    ``import_path`` ("module:attribute") lets worker processes load the same project.
    """

    name: str
    stages: tuple[Stage, ...]
    import_path: str
    shared: Mapping[str, type] = field(default_factory=dict)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)


@dataclass
class StageContext:
    """What a running stage gets: where its inputs are and where to write.

    ``output_dir`` is a private in-progress directory; the stage's worker process commits it
    atomically when ``run`` returns. A resumable stage finds the previous attempt's files there.
    """

    stage: str
    fingerprint: str
    output_dir: Path
    inputs: Mapping[str, Path]  # "<stage>.<artifact>" -> committed path
    attempt: int = 1
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("llmpipe.stage"))
    metrics_file: Path | None = None

    def output(self, artifact: str) -> Path:
        """Path of one of this stage's declared artifacts (created by the stage)."""
        return self.output_dir / artifact

    def input(self, ref: str) -> Path:
        try:
            return self.inputs[ref]
        except KeyError:
            raise KeyError(f"stage '{self.stage}' did not declare input {ref!r}; "
                           f"it has {sorted(self.inputs)}") from None

    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        """Record a metric now (a curve when ``step`` is given); streamed to tracking live."""
        self.log_metrics({name: value}, step=step)

    def log_artifact(self, path: Path | str) -> None:
        """Ask for a file under ``output_dir`` (a table, a chart) to be attached to the stage's MLflow run."""
        rel = Path(path).resolve().relative_to(self.output_dir.resolve())  # ValueError outside output_dir
        listing = self.output_dir / ARTIFACTS_FILE
        names = json.loads(listing.read_text()) if listing.exists() else []
        if str(rel) not in names:
            write_json_atomic(listing, [*names, str(rel)])

    # -- lineage: what MLflow shows as the run's models and datasets (pipeline/mlflow_sync.py) -------------
    # Written to LOGGED_FILE in the output dir, like the artifact listing: the stage's process may be a Slurm
    # job on another node, and the file is committed with the output, so a run that finds it cached links the
    # same models and datasets. Paths under output_dir are recorded relative to it (the committed path is known
    # only after the rename); calling again with the same name replaces the entry (a resumed attempt).

    def log_model(self, name: str, path: Path | str, *, params: Mapping[str, Any] | None = None,
                  tags: Mapping[str, Any] | None = None) -> None:
        """A model this stage produced (or used: a path outside ``output_dir``), logged as an MLflow logged
        model of the stage run, tagged with the stage fingerprint and the model's committed path. Its files
        stay where they are unless ``tracking.copy_models`` is set. ``name``: the logged model's name in MLflow
        (no ``/ : . %`` or quotes): the stage's name for its one model."""
        if not name or any(c in name for c in "/:.%\"'"):
            raise ValueError(f"stage '{self.stage}': model name {name!r} must be non-empty without / : . % or quotes "
                             "(MLflow's rule for logged model names)")
        entry = {"name": name, **self._where(path), "params": {k: str(v) for k, v in (params or {}).items()},
                 "tags": {k: str(v) for k, v in (tags or {}).items()}}
        self._record("models", entry, ("name",))

    def log_dataset(self, name: str, source: Path | str, *, digest: str | None = None, rows: int | None = None,
                    context: str = "input", source_type: str | None = None) -> None:
        """A dataset this stage read (``context="input"``) or wrote (``"output"``), logged as a dataset input of
        the stage run (MLflow has no dataset outputs; the context tag tells them apart). ``source``: a path or a
        URI (``hf://datasets/org/name``). ``digest``: what identifies the content; None: the fingerprint of the
        stage output that holds ``source`` (this stage's own output, or one of its inputs); an outside file
        needs its own (a content digest, a hub revision). ``rows``: its row count, shown in its profile.
        ``source_type``: MLflow's name for the kind of source; None: ``local`` for a path, else the URI scheme."""
        where = self._where(source) if "://" not in str(source) else {"uri": str(source)}
        if digest is None and "path" in where and not any(_within(Path(where["path"]), Path(p).absolute())
                                                               for p in self.inputs.values()):
            raise ValueError(f"stage '{self.stage}': dataset {name!r} at {source} is neither in the output dir nor "
                             f"in an input ({sorted(self.inputs)}): give its digest (a content digest or revision)")
        if digest is None and "uri" in where:
            raise ValueError(f"stage '{self.stage}': dataset {name!r} at {source}: give its digest (a revision)")
        entry = {"name": name, **where, "digest": digest, "rows": None if rows is None else int(rows),
                 "context": context, "source_type": source_type}
        self._record("datasets", entry, ("name", "context"))

    def log_model_metrics(self, model: Path | str, metrics: Metrics, *, label: str | None = None) -> None:
        """Scores of a model, attached to its MLflow logged model so that the Models tab compares models.
        ``model``: the committed path of the model (an input of this stage, e.g. ``ctx.input("sft.model")``) or
        the fingerprint of the stage output that holds it. Where no logged model is found (an outside model
        dir), the scores go on this stage's run only, as ``<label>.<metric>`` (``label``: the path's name by
        default)."""
        text = str(model)
        by_path = "/" in text or isinstance(model, Path)
        ref = {"path": str(Path(text).absolute())} if by_path else {"fingerprint": text}
        entry = {**ref, "label": label or Path(text).name, "metrics": {k: float(v) for k, v in metrics.items()}}
        self._record("model_metrics", entry, ("path", "fingerprint"))

    def _where(self, path: Path | str) -> dict[str, str]:
        """``{"output": <relative path>}`` for a path under output_dir, else ``{"path": <absolute path>}``. Both
        as given and with symlinks resolved: a stage may hand over ``output_dir.resolve() / ...``."""
        for given, folder in ((Path(path).absolute(), self.output_dir.absolute()),
                              (Path(path).resolve(), self.output_dir.resolve())):
            if _within(given, folder):
                return {"output": str(given.relative_to(folder))}
        return {"path": str(Path(path).absolute())}

    def _record(self, kind: str, entry: dict[str, Any], identity: tuple[str, ...]) -> None:
        listing = self.output_dir / LOGGED_FILE
        logged = json.loads(listing.read_text()) if listing.exists() else {}
        same = [e for e in logged.get(kind, []) if all(e.get(k) == entry.get(k) for k in identity)]
        logged[kind] = [e for e in logged.get(kind, []) if e not in same] + [entry]
        write_json_atomic(listing, logged, indent=1)

    def log_metrics(self, metrics: Metrics, step: int | None = None) -> None:
        if self.metrics_file is None:
            return
        record = {"t": time.time(), "step": step, "attempt": self.attempt,
                  "metrics": {k: float(v) for k, v in metrics.items()}}
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or under it (lexically: neither needs to exist)."""
    return path == folder or folder in path.parents
