"""``llmpipe lineage``: where an output came from, read from the stage_info.json files alone.

Every committed output records what it was made from (``stage_info.json``: its config, the
committed paths and fingerprints of its inputs, the state of its outside inputs). Following
``inputs`` back, output by output, gives the chain from a model to the files a data stage read,
with no config, plan or MLflow needed: an output made by last month's config, on another
branch or by a colleague traces as well as today's.

    sft 77d0a1b2c3d4  runs/sft/sft-77d0a1b2c3d4
    │   made 2026-12-06T06:56:02+0000 by config 'tiny', git b9a2..., run key 278b...
    │   config  base_model = "pretrain"
    └── pretrain.model: pretrain 1c9e...  runs/pretrain/pretrain-1c9e...
        └── tokenize.tokens: tokenize ...
                outside data/embedded/embedded-00000.warc.gz: 383226, 1796539911015543805

An input is looked for at the path its consumer recorded, then at the same place under the
consumer's own run root (a root that was moved or copied); where neither holds a committed output
(removed to free space) it is shown as missing and the walk goes on with the others. The outside
inputs are the stage's ``external`` state as its fingerprint holds it (pipeline/stage.py): content
digests, hub commits, or what a stage chose (ingest: path, size, mtime); relative paths there are
relative to the recorded ``project_dir``. The orchestrator does not know what they mean, so they
are printed as recorded.

A target is a stage of the current config (its current fingerprint's output), a path (an output
dir, a file in it, or its stage_info.json), or a tracking key: a stage run's ``llmpipe.run_key``
(``tracking_key`` in stage_info.json, also of a run that found the output cached), an MLflow run
id the sync recorded for one, or a pipeline run's key (the lineage of every output it ended with).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import LlmpipeError, OutputNotBuilt
from pipeline.schema import suggest
from pipeline.store import STAGE_INFO, SUCCESS
from pipeline.tracking import JOURNAL_DIR, flatten

SHORT_CONFIG_LINES = 8  # config lines per stage in the tree; --config prints all of them
OUTSIDE_LINES = 20  # outside inputs per stage in the tree (a crawl may have thousands of files); --json has all
PARENT_LEVELS = 3  # a path given inside an output dir (runs/sft/sft-<fp>/model/config.json) finds its dir


class LineageError(LlmpipeError):
    """A lineage target that names no committed output: not a stage, path or tracking key, or not built."""


@dataclass
class Node:
    """One output in the chain; ``info`` is its stage_info.json, None when it is missing."""

    stage: str
    fingerprint: str
    path: Path
    info: dict[str, Any] | None
    ref: str | None = None  # "<stage>.<artifact>" through which the output below reads it
    inputs: list[Node] = field(default_factory=list)

    @property
    def missing(self) -> bool:
        return self.info is None

    def outside(self) -> Any:
        """The outside inputs' state as the fingerprint holds it (None: the stage reads none)."""
        return (self.info or {}).get("payload", {}).get("external")

    def to_json(self) -> dict[str, Any]:
        info = self.info or {}
        out: dict[str, Any] = {"stage": self.stage, "fingerprint": self.fingerprint, "path": str(self.path),
                               "ref": self.ref, "status": "missing" if self.missing else "committed"}
        if not self.missing:
            out.update({k: info.get(k) for k in ("version", "finished_at_iso", "git_commit", "pipeline_config",
                                                   "overrides", "tracking_key", "project_dir")})
            out["config"] = info.get("config")
            out["outside"] = self.outside()
        out["inputs"] = [child.to_json() for child in self.inputs]
        return out


def _committed(path: Path) -> dict[str, Any] | None:
    """stage_info.json of the committed output at ``path``, or None (absent, uncommitted, unreadable)."""
    if not (path / SUCCESS).is_file():
        return None
    try:
        info = json.loads((path / STAGE_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def output_dir_of(path: Path) -> Path:
    """The committed output dir that ``path`` is (or is inside of, or is the stage_info.json of)."""
    path = Path(path).resolve()
    for candidate in [path, *path.parents][:PARENT_LEVELS + 1]:
        if _committed(candidate) is not None:
            return candidate
    raise LineageError(f"{path}: not a committed stage output (no {STAGE_INFO} with {SUCCESS} in it or in the "
                       f"{PARENT_LEVELS} folders above it)")


def trace(path: Path, ref: str | None = None) -> Node:
    """The lineage tree of the committed output at ``path`` (see the module doc)."""
    return _trace(Path(path), ref, {})


def _trace(path: Path, ref: str | None, seen: dict[Path, Node]) -> Node:
    info = _committed(path)
    if info is None:
        raise LineageError(f"{path}: not a committed stage output")
    node = Node(str(info.get("stage", "?")), str(info.get("fingerprint", "?")), path, info, ref)
    seen[path.resolve()] = node
    fingerprints = info.get("input_fingerprints") or {}
    for input_ref, recorded in sorted((info.get("inputs") or {}).items()):
        stage = input_ref.split(".", 1)[0]
        fp = str(fingerprints.get(input_ref, Path(recorded).parent.name.removeprefix(f"{stage}-")))
        # Where the consumer read it; else the same place under the consumer's root (a moved or copied root).
        candidates = [Path(recorded).parent, path.parent.parent / stage / f"{stage}-{fp}"]
        found = next((c for c in candidates if _committed(c) is not None), None)
        if found is None:
            node.inputs.append(Node(stage, fp, candidates[0], None, input_ref))
        elif found.resolve() in seen:  # a diamond (evaluate's models share their ancestors): shown once
            first = seen[found.resolve()]
            node.inputs.append(Node(first.stage, first.fingerprint, found, first.info, input_ref, first.inputs))
        else:
            node.inputs.append(_trace(found, input_ref, seen))
    return node


# -- finding the output a target names ---------------------------------------------------------
def resolve(target: str, cfg: Any, project: Any, cwd: Path | None = None) -> list[Path]:
    """The committed output dirs ``target`` names (one, except for a pipeline run's key): a stage of
    ``cfg``, a path (relative to ``cwd``), or a tracking key under ``cfg.root``."""
    if target in project.stage_names:
        return [_stage_output(target, cfg, project)]
    path = Path(cwd or ".") / Path(target).expanduser()
    if path.exists():
        return [output_dir_of(path)]
    found = by_tracking_key(cfg.root, target)
    if found:
        return found
    raise LineageError(f"lineage: '{target}' is not a stage of config '{cfg.name}'"
                       f"{suggest(target, project.stage_names)}, not an existing path, and not a tracking key "
                       f"(a stage or pipeline run key, or an MLflow run id) of the outputs under {cfg.root}")


def _stage_output(stage: str, cfg: Any, project: Any) -> Path:
    from pipeline.plan import make_plan

    plan = make_plan(cfg, project)
    plan.dag.check_names([stage], "lineage")
    fp = plan.stages[stage].fingerprint
    if plan.store.is_done(stage, fp):
        return plan.store.final_dir(stage, fp)
    older = plan.store.successes(stage)
    hint = (f"; its latest output from another config or code version is "
            f"{plan.store.final_dir(stage, older[-1]['fingerprint'])} (pass that path for its lineage)"
            if older else "")
    raise OutputNotBuilt(f"lineage: stage '{stage}' has no output for config '{cfg.name}' yet ({stage}-{fp} "
                         f"under {cfg.root}): run `llmpipe run run.only=[{stage}]` (`make stage STAGE={stage}`) "
                         f"first{hint}")


def _outputs(root: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every committed output under ``root`` with its stage_info, superseded ones included."""
    for info_path in [*root.glob(f"*/*-*/{STAGE_INFO}"), *root.glob(f"*/.superseded/*/{STAGE_INFO}")]:
        if (info := _committed(info_path.parent)) is not None:
            yield info_path.parent, info


def _events(journal: Path, needle: str = "") -> Iterator[dict[str, Any]]:
    """The events of a tracking journal that mention ``needle``, cheaply: only those lines are parsed."""
    with contextlib.suppress(OSError), open(journal, encoding="utf-8") as f:
        for line in f:
            if needle in line:
                with contextlib.suppress(ValueError):
                    yield json.loads(line)


def _run_key(root: Path, target: str) -> str:
    """``target`` as an llmpipe run key: an MLflow run id becomes the key the sync created that run for."""
    for state in (root / JOURNAL_DIR).glob("*.state.json"):
        with contextlib.suppress(OSError, ValueError):
            for key, run_id in (json.loads(state.read_text()).get("runs") or {}).items():
                if run_id == target:
                    return key
    return target


def by_tracking_key(root: Path, target: str) -> list[Path]:
    """The outputs a tracking key names under ``root`` ([] when none): the output a stage run produced or
    found cached; for a pipeline run, the outputs it ended with (those none of its other outputs read)."""
    if not target or not root.is_dir():
        return []
    key = _run_key(root, target)
    produced = [out for out, info in _outputs(root) if info.get("tracking_key") == key]
    if produced:
        return produced[:1]
    for journal in sorted((root / JOURNAL_DIR).glob("*.jsonl")):
        for event in _events(journal, key):
            if event.get("key") != key:
                continue
            output = (event.get("tags") or {}).get("llmpipe.output_path")
            if event.get("event") == "stage_start" and output:  # a run that found the output cached
                return [output_dir_of(Path(output))]
            if event.get("event") == "pipeline_start":
                return _pipeline_outputs(journal, key)
    return []


def _pipeline_outputs(journal: Path, key: str) -> list[Path]:
    """The committed outputs of a pipeline run's stages (produced or cached) that no other one of them reads."""
    outputs = [Path(out) for e in _events(journal, "stage_start")
               if e.get("event") == "stage_start" and (out := (e.get("tags") or {}).get("llmpipe.output_path"))
               and _committed(Path(out)) is not None]
    if not outputs:
        raise LineageError(f"lineage: pipeline run {key} ({journal}) has no committed output left")
    read = {Path(p).parent.resolve() for out in outputs for p in ((_committed(out) or {}).get("inputs") or {}).values()}
    return [p for p in dict.fromkeys(outputs) if p.resolve() not in read]


# -- the tree as text ------------------------------------------------------------------------
def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def config_lines(node: Node, full: bool = False) -> list[str]:
    """``key = value`` lines of the output's config (secrets masked as stage_info holds them). Short form:
    the fingerprinted keys, those the outside inputs name first (``base_model``, ``data.files``), then
    those set to something, then the nulls (a feature left off)."""
    info = node.info or {}
    config = flatten(info.get("config") or {})
    if full:
        return [f"{k} = {_show(v)}" for k, v in sorted(config.items())]
    hashed = set(flatten((info.get("payload") or {}).get("config") or {}))
    keys = sorted(k for k in config if k in hashed)
    outside = node.outside()
    named = {k.split("[", 1)[0] for k in outside} if isinstance(outside, Mapping) else set()
    keys.sort(key=lambda k: (not any(k == n or k.startswith(f"{n}.") for n in named), config[k] is None))
    lines = [f"{k} = {_show(config[k])}" for k in keys[:SHORT_CONFIG_LINES]]
    if len(keys) > SHORT_CONFIG_LINES:
        lines.append(f"... {len(keys) - SHORT_CONFIG_LINES} more (--config prints the whole config)")
    return lines


def outside_lines(node: Node) -> list[str]:
    """The outside inputs' recorded state, one per line: ``key: state`` for a mapping, ``first: rest`` for
    a list of records (ingest's ``[path, size, mtime_ns]``)."""
    state = node.outside()
    if state is None:
        return []
    if isinstance(state, Mapping):
        lines = [f"{k}: {v if isinstance(v, str) else _show(v)}" for k, v in state.items()]
    elif isinstance(state, list):
        lines = [f"{item[0]}: {', '.join(map(str, item[1:]))}" if isinstance(item, list) and len(item) > 1
                 else str(item[0]) if isinstance(item, list) and item else _show(item) for item in state]
    else:
        lines = [_show(state)]
    if len(lines) > OUTSIDE_LINES:
        lines = [*lines[:OUTSIDE_LINES], f"... {len(lines) - OUTSIDE_LINES} more (--json lists them all)"]
    return lines


def render(node: Node, full_config: bool = False) -> str:
    """The tree as text (see the module doc): one block per output, its inputs below it."""
    lines: list[str] = []
    _render(node, "", "", full_config, lines, set())
    return "\n".join(lines)


def _render(node: Node, first: str, rest: str, full_config: bool, lines: list[str], shown: set[Path]) -> None:
    via = f"{node.ref}: " if node.ref else ""
    head = f"{first}{via}{node.stage} {node.fingerprint[:12]}  {node.path}"
    if node.missing:
        lines.append(f"{head}  missing: no committed output there (removed, or its root moved)")
        return
    if node.path.resolve() in shown:
        lines.append(f"{head}  (shown above)")
        return
    shown.add(node.path.resolve())
    lines.append(head)
    body = rest + ("│   " if node.inputs else "    ")
    info = node.info or {}
    made = [f"made {info.get('finished_at_iso', '?')} by config '{info.get('pipeline_config', '?')}'",
            f"code version {info.get('version', '?')}", f"git {info.get('git_commit') or '?'}"]
    if info.get("tracking_key"):
        made.append(f"run key {info['tracking_key']}")
    lines.append(f"{body}{', '.join(made)}")
    if info.get("overrides"):
        lines.append(f"{body}overrides {' '.join(info['overrides'])}")
    for i, text in enumerate(config_lines(node, full_config) or ["(no fingerprinted settings)"]):
        lines.append(f"{body}{'config  ' if i == 0 else '        '}{text}")
    outside = outside_lines(node)
    if outside:
        where = f" (relative paths: from {info['project_dir']})" if info.get("project_dir") else ""
        lines.append(f"{body}outside inputs{where}:")
        lines.extend(f"{body}  {text}" for text in outside)
    for i, child in enumerate(node.inputs):
        last = i == len(node.inputs) - 1
        _render(child, rest + ("└── " if last else "├── "), rest + ("    " if last else "│   "), full_config,
                lines, shown)


def lineage(target: str, cfg: Any, project: Any, cwd: Path | None = None) -> list[Node]:
    """The lineage trees of the outputs ``target`` names (see :func:`resolve`)."""
    return [trace(path) for path in resolve(target, cfg, project, cwd)]

