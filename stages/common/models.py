"""Where a stage's model comes from: an upstream stage, a local Hugging Face model dir, or a hub id.

Every stage that consumes a model has a ``base_model`` key (sft, align, quantize, serve), and
evaluate's ``models`` entries can name outside models as ``name=<dir or hub id>``. A value is read as:

- the name of a stage that produces a model (``pretrain``, ``sft``, ``align``, ``quantize``): the
  stage's ``model`` output; the DAG then runs that stage first (``Stage.select_inputs``);
- a local model dir: a path that exists, or that starts like one (``/``, ``./``, ``../``, ``~``); it is
  in the fingerprint by the digest of its files (pipeline/content.py, cached by stat: a multi-GB dir
  costs a stat per file once it is known);
- a hub id, ``org/name`` or ``org/name@revision``: in the fingerprint by the commit it resolves to
  (stages/common/hub.py: from the local HF cache, or the hub when online; resolved once per process).
  Compute nodes run offline: ``llmpipe fetch`` on a login node fills the cache first.

Light module: no torch/transformers import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.content import content_digest
from pipeline.errors import LlmpipeError
from pipeline.inputs import Problem

# The stages whose output is a model, and the input ref that names it.
MODEL_STAGES: Mapping[str, str] = {"pretrain": "pretrain.model", "sft": "sft.model", "align": "align.model",
                                   "quantize": "quantize.model"}
KEY = "base_model"


class ModelSourceError(LlmpipeError):
    """A model reference names no stage, no model dir and no resolvable hub model."""


@dataclass(frozen=True)
class ModelSource:
    """One parsed model reference; ``spec`` is the value as written."""

    kind: Literal["stage", "dir", "hub"]
    spec: str

    @property
    def input_ref(self) -> str | None:
        """The DAG input this source needs (``"sft.model"``), None for a dir or a hub id."""
        return MODEL_STAGES[self.spec] if self.kind == "stage" else None

    def describe(self) -> str:
        return {"stage": f"input {self.input_ref}", "dir": f"model dir {self.spec}",
                "hub": f"hub model {self.spec}"}[self.kind]


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec in (".", "..") or Path(spec).expanduser().exists()


def parse_model(spec: str, allowed_stages: Sequence[str] = tuple(MODEL_STAGES)) -> ModelSource:
    """Read a ``base_model`` value (see the module doc). A stage name not in ``allowed_stages`` (one that
    runs after the consuming stage) is a ModelSourceError; so is an empty value."""
    spec = spec.strip()
    if not spec:
        raise ModelSourceError("is empty: give a stage name, a model dir or a hub id")
    if spec in MODEL_STAGES:
        if spec not in allowed_stages:
            raise ModelSourceError(f"{spec!r} is a stage that does not run before this one; choose from "
                                   f"{list(allowed_stages)}, a model dir or a hub id")
        return ModelSource("stage", spec)
    if _looks_like_path(spec):
        return ModelSource("dir", spec)
    from stages.common.hub import parse_hub_id

    if parse_hub_id(spec, kind="model") is not None:
        return ModelSource("hub", spec)
    return ModelSource("dir", spec)  # neither: a dir that is not there, which the preflight names


def check_model_spec(spec: str, allowed_stages: Sequence[str], key: str = KEY) -> list[tuple[str, str]]:
    """Config-time check (``__post_init__``): ``[(key, problem)]``, empty when ``spec`` parses."""
    try:
        parse_model(spec, allowed_stages)
    except ModelSourceError as exc:
        return [(key, str(exc))]
    return []


def model_state(source: ModelSource) -> str | None:
    """The fingerprint state of an outside model: its files' digest, or ``repo@<commit>``; None for a
    stage (its fingerprint is already an input). An unresolvable hub id is ``unresolved`` (``plan``
    still shows the plan; the preflight reports why)."""
    if source.kind == "stage":
        return None
    if source.kind == "dir":
        return content_digest(Path(source.spec).expanduser())
    from stages.common.hub import HubError, parse_hub_id, resolve_revision

    ref = parse_hub_id(source.spec, kind="model")
    try:
        return f"{ref.repo}@{resolve_revision(ref)}"
    except HubError:
        return "unresolved"


def model_problems(source: ModelSource, key: str = KEY) -> list[Problem]:
    """Plan-time check: a dir is a Hugging Face model dir (a config.json), a hub id resolves offline or
    online to a commit that is in the local cache."""
    if source.kind == "stage":
        return []
    if source.kind == "dir":
        path = Path(source.spec).expanduser()
        if not path.is_dir():
            return [(key, f"model dir not found: {source.spec} (resolved to {path.resolve()}); give a stage name "
                          f"({', '.join(MODEL_STAGES)}), a local Hugging Face model dir or a hub id org/name[@rev]")]
        if not (path / "config.json").is_file():
            return [(key, f"{source.spec} holds no config.json: not a Hugging Face model dir")]
        return []
    from stages.common.hub import HubError, parse_hub_id, resolve_revision, snapshot_dir

    ref = parse_hub_id(source.spec, kind="model")
    try:
        snapshot_dir(ref, resolve_revision(ref))
    except HubError as exc:
        local = "" if "@" in source.spec else f"not a model dir here ({Path(source.spec).resolve()}), and as a hub id: "
        return [(key, local + str(exc))]
    return []


def model_dir(source: ModelSource, inputs: Any) -> Path:
    """The local dir to load: the upstream output (``inputs`` is the StageContext), the dir, or the hub
    snapshot in the HF cache."""
    if source.kind == "stage":
        return Path(inputs.input(source.input_ref))
    if source.kind == "dir":
        return Path(source.spec).expanduser()
    from stages.common.hub import parse_hub_id, resolve_revision, snapshot_dir

    ref = parse_hub_id(source.spec, kind="model")
    return snapshot_dir(ref, resolve_revision(ref))


def inputs_of(source: ModelSource) -> tuple[str, ...]:
    return (source.input_ref,) if source.input_ref else ()


def base_model_hooks(allowed_stages: Sequence[str], *, inputs: Any = None, external: Any = None,
                     preflight: Any = None) -> dict[str, Any]:
    """``select_inputs``, ``external`` and ``preflight`` for a Stage that reads a ``base_model``: the
    upstream stage it names, or the dir or hub model's state, and its checks; each combined with the
    stage's own hook for its other outside inputs when given (``inputs(cfg)``, ``external(cfg)``,
    ``preflight(cfg)``)."""

    def source(cfg: Any) -> ModelSource:
        return parse_model(cfg.base_model, allowed_stages)

    def state(cfg: Any) -> dict[str, str] | None:
        merged = dict((external(cfg) if external else None) or {})
        if (model := model_state(source(cfg))) is not None:
            merged[KEY] = model
        return merged or None

    return {"select_inputs": lambda cfg: (*inputs_of(source(cfg)), *(inputs(cfg) if inputs else ())),
            "external": state,
            "preflight": lambda cfg: [*model_problems(source(cfg)), *(preflight(cfg) if preflight else [])]}


def training_stage_hooks(allowed_stages: Sequence[str], data_suffixes: Sequence[str]) -> dict[str, Any]:
    """The hooks of sft and align, which read a ``base_model`` and a ``data`` block (source corpus | files
    | dataset): pii's documents only for the corpus source; the data's state and checks."""
    from stages.common.inputs import training_data_problems, training_data_state

    return base_model_hooks(allowed_stages,
                            inputs=lambda cfg: ("pii.documents",) if cfg.data.source == "corpus" else (),
                            external=lambda cfg: training_data_state(cfg.data),
                            preflight=lambda cfg: training_data_problems(cfg.data, data_suffixes))
