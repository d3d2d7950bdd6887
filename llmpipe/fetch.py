"""``llmpipe fetch`` (``make fetch``): fill the HF cache on a node with network, so that the stages run
with the hub offline.

What it fetches is read from the resolved config, nothing else:

- hub models: every stage config value under a key named ``base_model`` that is a hub id
  (``org/name[@revision]``; a stage name or a local dir is not), and the ``name=<hub id>`` entries of
  ``stage.evaluate.models``; downloaded with huggingface_hub's ``snapshot_download``;
- hub datasets: ``stage.<name>.data.dataset`` of a stage whose ``data.source`` is ``dataset`` (sft,
  align), when it is not a local path; prepared by ``datasets.load_dataset`` at the resolved commit;
- standard lm-eval benchmarks: the ``stage.evaluate.tasks`` that are not built locally (heldout_ppl,
  heldout_mc); lm-eval builds each task once, which downloads its datasets.

The commit of each model and dataset is written to ``<run.root>/fetched.json`` (merged with what an
earlier fetch into that root recorded). ``--dry-run`` prints the list with the commit each resolves to
from the cache alone ("not cached" otherwise), without network.

The HF settings of ``cluster.env`` (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_DATASETS_CACHE``, ``HF_TOKEN``...)
apply here as they do in the stage processes, so the files land in the cache the stages read; its
offline switches (``HF_HUB_OFFLINE``...) do not.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.files import write_json_atomic
from stages.common.benchmarks import LOCAL_TASKS
from stages.common.hub import HubError, HubRef, cached_revision, parse_hub_id, require_cached

FETCHED = "fetched.json"
MODEL_KEY = "base_model"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")  # cluster.env's are for compute nodes


@dataclass
class Wanted:
    """One thing to fetch: ``name`` as written (``org/name@rev``, or a task name), the config ``keys`` that
    name it, and its HubRef (None for an lm-eval task)."""

    kind: Literal["model", "dataset", "task"]
    name: str
    ref: HubRef | None = None
    keys: list[str] = field(default_factory=list)


def wanted(resolved: Mapping[str, Any]) -> list[Wanted]:
    """Every hub model, hub dataset and standard lm-eval task the resolved config names, each once (with
    every key naming it), models first, then datasets, then tasks, in config order."""
    stages = resolved.get("stage") or {}
    found: dict[tuple[str, str], Wanted] = {}

    def add(kind: str, name: str, key: str, ref: HubRef | None = None) -> None:
        found.setdefault((kind, name), Wanted(kind, name, ref)).keys.append(key)

    for key, value in _leaves(stages, "stage"):
        if key.rpartition(".")[2] == MODEL_KEY and isinstance(value, str) and (ref := parse_hub_id(value, "model")):
            add("model", str(ref), key, ref)
    evaluate = stages.get("evaluate") or {}
    for i, entry in enumerate(evaluate.get("models") or ()):
        _, eq, spec = str(entry).partition("=")
        if eq and (ref := parse_hub_id(spec, "model")):
            add("model", str(ref), f"stage.evaluate.models[{i}]", ref)
    for stage, config in stages.items():
        data = config.get("data") if isinstance(config, Mapping) else None
        if isinstance(data, Mapping) and data.get("source") == "dataset" and isinstance(data.get("dataset"), str):
            if ref := parse_hub_id(data["dataset"], "dataset"):
                add("dataset", str(ref), f"stage.{stage}.data.dataset", ref)
    for stage in ("evaluate", "decontaminate"):  # decontaminate reads the evaluation tasks' texts too
        for task in (stages.get(stage) or {}).get("tasks") or ():
            if task not in LOCAL_TASKS:
                add("task", str(task), f"stage.{stage}.tasks")
    return list(found.values())


def _leaves(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _leaves(value, f"{path}.{key}")
    else:
        yield path, node


def apply_hf_env(env: Mapping[str, str]) -> list[str]:
    """Set the HF variables of ``cluster.env`` (cache folders, token, endpoint) in this process, before
    huggingface_hub or datasets read them; the offline switches are left out. Returns the names set."""
    names = [n for n in env if (n.startswith(("HF_", "HUGGINGFACE_")) or n == "XDG_CACHE_HOME")
             and n not in OFFLINE_ENV]
    for name in names:
        os.environ[name] = str(env[name])
    return names


def read_fetched(root: Path) -> dict[str, Any]:
    """What earlier fetches into ``root`` recorded (empty lists and maps when none did)."""
    try:
        record = json.loads((root / FETCHED).read_text())
    except (OSError, ValueError):
        record = {}
    return {"models": {}, "datasets": {}, "tasks": [], "task_datasets": {}, **record}


# ---------------------------------------------------------------- the command


def run_fetch(cfg: Any, dry_run: bool = False, out: Any = None) -> int:
    """``llmpipe fetch [--dry-run]`` on a loaded pipeline config; the exit code. Raises HubError (exit
    status 2 from the CLI) naming everything that could not be fetched, after recording the rest."""
    out = out or sys.stdout
    apply_hf_env(cfg.cluster.env)
    items = wanted(cfg.resolved)
    from stages.common.hub import datasets_cache_dir, hub_cache_dir

    print(f"fetch for config '{cfg.name}' into the HF cache {hub_cache_dir()} (datasets: {datasets_cache_dir()}); "
          f"record: {cfg.root / FETCHED}", file=out)
    if not items:
        print("nothing to fetch: the config names no hub model, hub dataset or standard lm-eval task", file=out)
        return 0
    if dry_run:
        print_list(items, read_fetched(cfg.root), out)
        return 0
    from stages.common.hub import hub_is_offline

    if hub_is_offline():
        raise HubError("llmpipe fetch downloads from the hub, but HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set "
                       "in this environment: run it without, on a node with network (--dry-run lists offline)")
    return download(items, cfg.root, out)


def cache_state(item: Wanted, fetched: Mapping[str, Any]) -> str:
    """The commit an item resolves to from the local caches alone, or "not cached"; for an lm-eval task,
    whether a fetch into this root loaded it."""
    if item.ref is None:
        return "fetched" if item.name in fetched["tasks"] else "not fetched"
    try:
        return require_cached(item.ref)
    except HubError:
        sha = cached_revision(item.ref)
        return f"{sha} (incomplete)" if sha else "not cached"


def print_list(items: Sequence[Wanted], fetched: Mapping[str, Any], out: Any) -> None:
    width = max(len(i.name) for i in items)
    print(f"{'kind':<8} {'id':<{width}}  {'revision':<41}  named by", file=out)
    for item in items:
        print(f"{item.kind:<8} {item.name:<{width}}  {cache_state(item, fetched):<41}  {', '.join(item.keys)}",
              file=out)


def download(items: Sequence[Wanted], root: Path, out: Any) -> int:
    from stages.common.hub import fetch

    record = read_fetched(root)
    failed: list[str] = []
    for item in items:
        if item.ref is None:
            continue
        try:
            sha, path = fetch(item.ref)
        except HubError as exc:
            failed.append(f"{', '.join(item.keys)}: {exc}")
            print(f"FAILED  {item.kind} {item.name}: {exc}", file=out)
            continue
        record[f"{item.kind}s"][item.name] = {"revision": sha, "path": str(path)}
        print(f"fetched {item.kind} {item.name} at {sha}: {path}", file=out)
    tasks = [i.name for i in items if i.kind == "task"]
    if tasks:
        try:
            record["task_datasets"].update(fetch_tasks(tasks))
            record["tasks"] = sorted({*record["tasks"], *tasks})
            print(f"fetched lm-eval tasks {tasks}", file=out)
        except HubError as exc:
            failed.append(f"stage.evaluate.tasks: {exc}")
            print(f"FAILED  tasks {tasks}: {exc}", file=out)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / FETCHED, record, indent=2, sort_keys=True, newline=True)
    print(f"recorded in {root / FETCHED}", file=out)
    if failed:
        raise HubError("\n  ".join([f"llmpipe fetch: {len(failed)} of {len(items)} could not be fetched:", *failed]))
    return 0


def fetch_tasks(names: Sequence[str]) -> dict[str, str | None]:
    """Build the lm-eval tasks ``names`` once with the hub online, as ``evaluate`` builds them offline:
    each task downloads and prepares its datasets in the datasets cache. Returns ``{dataset id: commit
    recorded in the hub cache, or None}`` for the hub datasets they read."""
    from stages.common.hub import hub_is_offline

    if hub_is_offline():
        raise HubError(f"cannot fetch the lm-eval tasks {list(names)}: HF_HUB_OFFLINE is set")
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager()
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise HubError(f"lm-eval does not know the task(s) {unknown}; local tasks are {list(LOCAL_TASKS)}")
    try:
        tasks = get_task_dict(list(names), manager)
    except Exception as exc:  # noqa: BLE001 - datasets and lm-eval raise many types
        raise HubError(f"cannot download the lm-eval tasks {list(names)}: {type(exc).__name__}: {exc}") from exc
    revisions: dict[str, str | None] = {}
    for task in _task_leaves(tasks):
        config = getattr(task, "config", None)
        path = getattr(config, "dataset_path", None)
        ref = parse_hub_id(path, "dataset") if isinstance(path, str) else None
        if ref is not None:
            revision = (getattr(config, "dataset_kwargs", None) or {}).get("revision") or ref.revision
            ref = HubRef(ref.repo, revision, "dataset")
            revisions[str(ref)] = cached_revision(ref)
    return revisions


def _task_leaves(tasks: Any) -> Iterator[Any]:
    """The task objects of get_task_dict's nested {name or group: task or {...}}."""
    for value in tasks.values():
        yield from _task_leaves(value) if isinstance(value, Mapping) else (value,)
