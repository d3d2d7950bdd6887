"""Which edits change a stage's fingerprint, and which do not."""

import math

import pytest

from pipeline.fingerprint import UnhashableValue, canonical_json, fingerprint, without
from pipeline.plan import make_plan


def fps(toy, *overrides):
    plan = make_plan(toy(*overrides), toy.project)
    return {name: sp.fingerprint for name, sp in plan.stages.items()}


BASE = ()

# (override, stages whose fingerprint must change)
CHANGES = [
    ("stage.source.text=bye", {"source", "upper", "count", "slow"}),
    ("stage.source.repeat=3", {"source", "upper", "count", "slow"}),
    ("stage.upper.suffix=?", {"upper", "count", "slow"}),
    ("stage.upper.nested.a=2", {"upper", "count", "slow"}),
    ("stage.upper.nested.b=[x,y]", {"upper", "count", "slow"}),
    ("stage.side.value=8", {"side"}),
    ("stage.slow.steps=7", {"slow"}),
    # execution-only fields never re-address an output
    ("stage.source.workers=8", set()),
    ("stage.source.fail=true", set()),
    ("stage.upper.log_every=1", set()),
    ("stage.slow.step_s=0.5", set()),
    # orchestrator settings are not part of any stage's identity
    ("run.keep_going=false", set()),
    ("run.force=[side]", set()),
    ("tracking.experiment=other", set()),
    ("+cluster.env.OMP_NUM_THREADS='1'", set()),
    # nor where it runs: the same config on Slurm addresses (and reuses) the same outputs
    ("cluster.executor=slurm", set()),
    ("+cluster.slurm.nodes=4", set()),
    ("+cluster.slurm.stages.upper.gpus_per_node=8", set()),
]


@pytest.mark.parametrize(("override", "changed"), CHANGES, ids=[c[0] for c in CHANGES])
def test_which_edits_change_which_fingerprints(toy, override, changed):
    before, after = fps(toy), fps(toy, override)
    assert {n for n in before if before[n] != after[n]} == changed


def test_same_value_written_differently_is_the_same_fingerprint(toy):
    assert fps(toy, "stage.upper.nested.a=1") == fps(toy)
    assert fps(toy, "stage.source.repeat=2") == fps(toy)


def test_fingerprints_are_stable_across_processes_and_dirs(toy, tmp_path):
    # Outputs are addressed by content, not by where the project lives.
    a = fps(toy)
    assert all(len(v) == 12 and int(v, 16) >= 0 for v in a.values())
    assert fps(toy) == a


def test_canonical_json_ignores_key_order_and_tuple_vs_list():
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": (1, 2), "b": 1})
    assert fingerprint({"x": {"b": 1, "a": 2}}) == fingerprint({"x": {"a": 2, "b": 1}})
    assert fingerprint({"x": 1}) != fingerprint({"x": 1.5})


@pytest.mark.parametrize("bad", [{1, 2}, object(), math.nan, math.inf, b"bytes"])
def test_encoder_refuses_values_without_deterministic_serialisation(bad):
    with pytest.raises(UnhashableValue, match="cfg.value"):
        canonical_json({"cfg": {"value": bad}})


def test_without_removes_nested_paths_only():
    cfg = {"a": 1, "n": {"workers": 2, "keep": 3}, "workers": 4}
    assert without(cfg, ["workers", "n.workers", "missing.path"]) == {"a": 1, "n": {"keep": 3}}
    assert cfg["workers"] == 4  # the input is not modified


def test_code_version_bump_changes_fingerprint_and_descendants(toy):
    import dataclasses

    from tests.pipeline.toy import PROJECT

    stages = tuple(dataclasses.replace(s, version=2) if s.name == "upper" else s for s in PROJECT.stages)
    bumped = dataclasses.replace(PROJECT, stages=stages)
    cfg = toy()
    before = {n: p.fingerprint for n, p in make_plan(cfg, PROJECT).stages.items()}
    after = {n: p.fingerprint for n, p in make_plan(cfg, bumped).stages.items()}
    assert {n for n in before if before[n] != after[n]} == {"upper", "count", "slow"}
