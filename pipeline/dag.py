"""The stage graph, built only from the stages' declared inputs and outputs."""

from __future__ import annotations

import graphlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pipeline.errors import ConfigError, CycleError, DuplicateProducerError, MissingInputError
from pipeline.schema import suggest
from pipeline.stage import Stage


@dataclass(frozen=True)
class Dag:
    stages: dict[str, Stage]  # in topological order
    producers: dict[str, str]  # "<stage>.<artifact>" -> producing stage
    parents: dict[str, tuple[str, ...]]
    children: dict[str, tuple[str, ...]]
    left_out: tuple[str, ...] = ()  # registered stages that nothing this config runs needs (see select())

    @property
    def order(self) -> list[str]:
        return list(self.stages)

    def ancestors(self, name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self.parents[name])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(self.parents[n])
        return seen

    def descendants(self, name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self.children[name])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(self.children[n])
        return seen

    def check_names(self, names: Iterable[str], key: str) -> None:
        for n in names:
            if n in self.left_out:
                raise ConfigError(f"{key}: stage '{n}' is not part of this config's pipeline: no stage it runs "
                                  f"needs it (the inputs a stage needs follow its config: base_model, "
                                  f"data.source, evaluate.models); it runs {list(self.stages)}")
            if n not in self.stages:
                raise ConfigError(f"{key}: unknown stage '{n}'" + suggest(n, self.stages))


def build_dag(stages: Sequence[Stage], inputs: Mapping[str, Sequence[str]] | None = None) -> Dag:
    """Wire stages by their declarations (or by ``inputs``: stage -> the input refs it needs); raise a
    named error on any inconsistency."""
    inputs = inputs or {}
    by_name: dict[str, Stage] = {}
    for s in stages:
        if s.name in by_name:
            raise DuplicateProducerError(f"two stages are named '{s.name}'")
        by_name[s.name] = s

    producers: dict[str, str] = {}
    for s in stages:
        for artifact in s.outputs:
            ref = s.output_ref(artifact)
            if ref in producers:  # unreachable while refs are prefixed by unique names; kept for safety
                raise DuplicateProducerError(f"'{ref}' is produced by both '{producers[ref]}' and '{s.name}'")
            producers[ref] = s.name

    parents: dict[str, tuple[str, ...]] = {}
    for s in stages:
        ps = []
        for ref in inputs.get(s.name, s.inputs):
            if ref not in producers:
                owner = ref.split(".")[0]
                hint = (f"; '{owner}' produces {list(by_name[owner].outputs)}" if owner in by_name
                        else suggest(owner, by_name))
                raise MissingInputError(f"stage '{s.name}' needs '{ref}', which no stage produces{hint}")
            if producers[ref] not in ps:
                ps.append(producers[ref])
        parents[s.name] = tuple(ps)

    try:
        order = _stable_order(parents, [s.name for s in stages])
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        raise CycleError("stages depend on each other in a cycle: " + " -> ".join(cycle)) from None

    children: dict[str, list[str]] = {n: [] for n in by_name}
    for n, ps in parents.items():
        for p in ps:
            children[p].append(n)
    return Dag(
        stages={n: by_name[n] for n in order},
        producers=producers,
        parents=parents,
        children={n: tuple(c) for n, c in children.items()},
    )


def _stable_order(parents: dict[str, tuple[str, ...]], registry_order: list[str]) -> list[str]:
    """Topological order that prefers registry order among ready stages."""
    sorter = graphlib.TopologicalSorter(parents)
    sorter.prepare()  # raises CycleError
    rank = {n: i for i, n in enumerate(registry_order)}
    order: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=rank.__getitem__)
        for n in ready:
            order.append(n)
            sorter.done(n)
    return order


def select(stages: Sequence[Stage], needed: Mapping[str, Sequence[str]]) -> Dag:
    """The DAG one config runs: its final stages and what they need, through the inputs each stage's
    config selects (``needed``: stage -> refs, a subset of its declared inputs). The final stages are
    those no stage declares as an input (serve and evaluate in llmpipe; a declared input whose producer
    is not registered does not count). A fine-tune whose sft starts from a model dir and reads files
    reaches no data stage and no pretrain: they are left out, not skipped. A selected input that no
    stage produces is a MissingInputError, as in build_dag."""
    by_name = {s.name: s for s in stages}
    producers = {s.output_ref(a): s.name for s in stages for a in s.outputs}
    consumed = {producers[ref] for s in stages for ref in s.inputs if ref in producers}
    keep: set[str] = set()
    todo = [s.name for s in stages if s.name not in consumed]
    while todo:
        n = todo.pop()
        if n not in keep:
            keep.add(n)
            todo.extend(producers[ref] for ref in needed[n] if ref in producers)
    dag = build_dag([by_name[s.name] for s in stages if s.name in keep], {n: needed[n] for n in keep})
    return Dag(dag.stages, dag.producers, dag.parents, dag.children,
               left_out=tuple(s.name for s in stages if s.name not in keep))
