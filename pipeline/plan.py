"""Decide, per stage, whether it runs and why — before anything runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.dag import Dag, select
from pipeline.errors import InputError, OutputNotBuilt
from pipeline.fingerprint import fingerprint, fingerprint_payload, without
from pipeline.schema import to_plain
from pipeline.stage import Project, Stage
from pipeline.store import Store

RUN, SKIP, EXCLUDED = "run", "skip", "excluded"


@dataclass
class StagePlan:
    stage: Stage
    fingerprint: str
    payload: dict[str, Any]  # what the fingerprint was computed from
    config: Any  # typed config
    inputs: dict[str, Path]  # "<stage>.<artifact>" -> committed path
    input_fingerprints: dict[str, str]
    action: str = RUN
    reason: str = ""
    changes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.stage.name


@dataclass
class Plan:
    config: PipelineConfig
    dag: Dag
    store: Store
    stages: dict[str, StagePlan]  # topological order

    def to_run(self) -> list[StagePlan]:
        return [p for p in self.stages.values() if p.action == RUN]

    def committed(self, ref: str) -> Path:
        """The committed path of ``"<stage>.<artifact>"`` for the current config, or OutputNotBuilt."""
        stage, _, artifact = ref.partition(".")
        self.dag.check_names([stage], ref)
        sp = self.stages[stage]
        if not self.store.is_done(stage, sp.fingerprint):
            raise OutputNotBuilt(f"{ref} of config '{self.config.name}' ({stage}-{sp.fingerprint} under "
                                 f"{self.store.root}) is not built yet: run `make pipeline` or "
                                 f"`make stage STAGE={stage}` first")
        return self.store.artifact(stage, sp.fingerprint, artifact)


def hashed_config(stage: Stage, config: Any) -> dict[str, Any]:
    return without(to_plain(config), stage.unhashed)


def make_plan(cfg: PipelineConfig, project: Project) -> Plan:
    dag = select(project.stages, {s.name: s.needed_inputs(cfg.stages[s.name]) for s in project.stages})
    store = Store(cfg.root)
    for key, names in (("run.only", cfg.run.only), ("run.force", cfg.run.force),
                       ("run.from", [cfg.run.from_] if cfg.run.from_ else [])):
        dag.check_names(names, key)

    selected = set(dag.order)
    if cfg.run.only:
        selected = set(cfg.run.only)
        for n in cfg.run.only:
            selected |= dag.ancestors(n)
    forced: dict[str, str] = {n: "run.force" for n in cfg.run.force}
    if cfg.run.from_:
        for n in {cfg.run.from_} | dag.descendants(cfg.run.from_):
            forced.setdefault(n, f"run.from={cfg.run.from_}")

    plans: dict[str, StagePlan] = {}
    for name, stage in dag.stages.items():
        config = cfg.stages[name]
        needed = stage.needed_inputs(config)
        input_fps = {ref: plans[dag.producers[ref]].fingerprint for ref in needed}
        external = stage.external(config) if stage.external else None
        payload = fingerprint_payload(name, stage.version, hashed_config(stage, config), input_fps, external)
        fp = fingerprint(payload)
        inputs = {ref: store.artifact(dag.producers[ref], input_fps[ref], ref.split(".", 1)[1])
                  for ref in needed}
        plan = StagePlan(stage, fp, payload, config, inputs, input_fps)
        plans[name] = plan

        done = store.is_done(name, fp)
        only_ancestor = cfg.run.only and name not in cfg.run.only
        if name not in selected:
            plan.action, plan.reason = EXCLUDED, "not selected by run.only"
        elif name in forced and not only_ancestor:
            plan.action, plan.reason = RUN, f"forced by {forced[name]}"
        elif done:
            plan.action, plan.reason = SKIP, "cached: output exists"
        else:
            plan.action = RUN
            plan.changes = changes_since_last_success(store, plan)
            failure = store.failure(name, fp)
            if failure:
                plan.reason = (f"retry: attempt {failure['attempt']} failed"
                               + (", resuming its partial output" if stage.resumable else ""))
            elif interrupted := store.interrupted(name, fp):  # its orchestrator was killed, its machine lost
                plan.reason = (f"{'resuming' if stage.resumable else 'retry'} after an interrupted attempt "
                               f"(attempt {interrupted})")
            elif plan.changes:
                plan.reason = summarize(plan.changes)
            else:
                plan.reason = "never ran"
    return Plan(cfg, dag, store, plans)


def check_inputs(plan: Plan) -> None:
    """Run the ``preflight`` check of every stage the plan would run; raise InputError listing every
    problem (``stage.<name>.<key>: ...``). Cached and unselected stages read nothing and are not
    checked. Creates nothing: ``plan`` and ``run`` call it before the run root is touched."""
    problems = []
    for sp in plan.to_run():
        if sp.stage.preflight is not None:
            problems += [f"stage.{sp.name}{'.' + key if key else ''}: {message}"
                         for key, message in sp.stage.preflight(sp.config)]
    if problems:
        raise InputError(f"inputs of config '{plan.config.name}' cannot be used; nothing was run "
                         f"(relative paths are read from {Path.cwd()}):", problems)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


@dataclass(frozen=True)
class Change:
    kind: str  # "config", "upstream", "version" or "external"
    key: str
    old: Any = None
    new: Any = None
    added: bool = False
    removed: bool = False


_ABSENT = object()


def diff_payloads(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """What differs between two fingerprint payloads."""
    out: list[Change] = []
    if old.get("version") != new.get("version"):
        out.append(Change("version", "version", old.get("version"), new.get("version")))
    a, b = _flatten(old.get("config", {})), _flatten(new.get("config", {}))
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va is _ABSENT:
            out.append(Change("config", key, None, vb, added=True))
        elif vb is _ABSENT:
            out.append(Change("config", key, va, None, removed=True))
        elif va != vb:
            out.append(Change("config", key, va, vb))
    ai, bi = old.get("inputs", {}), new.get("inputs", {})
    for ref in sorted(set(ai) | set(bi)):
        if ai.get(ref) != bi.get(ref):
            out.append(Change("upstream", ref, ai.get(ref), bi.get(ref)))
    ea, eb = old.get("external"), new.get("external")
    if isinstance(ea, Mapping) and isinstance(eb, Mapping):  # one change per key: `why` names the file
        for key in sorted(set(ea) | set(eb)):
            if ea.get(key, _ABSENT) != eb.get(key, _ABSENT):
                out.append(Change("external", key, ea.get(key), eb.get(key), added=key not in ea,
                                  removed=key not in eb))
    elif ea != eb:
        out.append(Change("external", "external", ea, eb))
    return out


def render_diff(changes: list[Change]) -> list[str]:
    """Changes as -/+ lines, the way a reviewer reads a diff."""
    lines: list[str] = []
    for c in changes:
        label = {"config": "", "upstream": "upstream ", "version": "code ", "external": ""}[c.kind]
        if not c.added:
            lines.append(f"- {label}{c.key}: {_show(c.old)}")
        if not c.removed:
            lines.append(f"+ {label}{c.key}: {_show(c.new)}")
    return lines


def _show(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


def changes_since_last_success(store: Store, plan: StagePlan) -> list[Change]:
    history = store.successes(plan.name)
    if not history:
        return []
    return diff_payloads(history[-1].get("payload", {}), plan.payload)


def summarize(changes: list[Change]) -> str:
    parts = []
    keys = [c.key for c in changes if c.kind == "config"]
    if keys:
        parts.append("config changed: " + ", ".join(keys[:3]) + (f" +{len(keys) - 3} more" if len(keys) > 3 else ""))
    upstream = list(dict.fromkeys(c.key.split(".")[0] for c in changes if c.kind == "upstream"))
    if upstream:
        parts.append("upstream changed: " + ", ".join(upstream))
    if any(c.kind == "version" for c in changes):
        parts.append("code version changed")
    external = [c.key for c in changes if c.kind == "external"]
    if external:
        parts.append("outside inputs changed: " + ", ".join(external[:3])
                     + (f" +{len(external) - 3} more" if len(external) > 3 else ""))
    return "; ".join(parts)


def explain(plan: Plan, name: str) -> str:
    """The text of `llmpipe why <stage>`."""
    plan.dag.check_names([name], "why")
    sp = plan.stages[name]
    store = plan.store
    lines = [f"{name}: fingerprint {sp.fingerprint} (current config)"]
    if store.is_done(name, sp.fingerprint):
        lines.append(f"up to date: {store.final_dir(name, sp.fingerprint)}")
        return "\n".join(lines)
    history = store.successes(name)
    if not history:
        lines.append("no successful run of this stage yet: it runs because it never ran")
        return "\n".join(lines)
    last = history[-1]
    lines.append(f"last success: {last['fingerprint']} at {last.get('finished_at_iso', '?')} "
                 f"({store.final_dir(name, last['fingerprint'])})")
    changes = diff_payloads(last.get("payload", {}), sp.payload)
    if not changes:
        lines.append("no difference in config, code version or inputs")
    lines.extend(render_diff(changes))
    for up in dict.fromkeys(c.key.split(".")[0] for c in changes if c.kind == "upstream"):
        lines.append(f"# {up} changed upstream: see `llmpipe why {up}`")
    return "\n".join(lines)
