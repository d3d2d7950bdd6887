from dataclasses import dataclass

import pytest

from pipeline import CycleError, DuplicateProducerError, MissingInputError, Stage
from pipeline.dag import build_dag


@dataclass(frozen=True)
class Empty:
    pass


def stage(name, inputs=(), outputs=("out",)):
    return Stage(name, Empty, lambda cfg, ctx: {}, tuple(inputs), tuple(outputs))


def test_topological_order_keeps_registry_order_among_peers():
    dag = build_dag([stage("c", ["a.out"]), stage("a"), stage("b"), stage("d", ["c.out", "b.out"])])
    assert dag.order == ["a", "b", "c", "d"]
    assert dag.ancestors("d") == {"a", "b", "c"}
    assert dag.descendants("a") == {"c", "d"}
    assert dag.parents["d"] == ("c", "b")


def test_cycle_is_named():
    with pytest.raises(CycleError, match="cycle: .*a.*b"):
        build_dag([stage("a", ["b.out"]), stage("b", ["a.out"])])


def test_input_nobody_produces_is_named_with_what_exists():
    with pytest.raises(MissingInputError, match=r"'b' needs 'a.documents'.*'a' produces \['out'\]"):
        build_dag([stage("a"), stage("b", ["a.documents"])])
    with pytest.raises(MissingInputError, match="did you mean 'dedup'"):
        build_dag([stage("dedup"), stage("b", ["dedupe.out"])])


def test_two_producers_of_one_artifact():
    with pytest.raises(DuplicateProducerError, match="'a'"):
        build_dag([stage("a"), stage("a")])


def test_malformed_declarations_fail_at_definition():
    with pytest.raises(ValueError, match="<stage>.<artifact>"):
        stage("a", ["nodot"])
    with pytest.raises(ValueError, match="repeat"):
        stage("a", outputs=("x", "x"))


def test_shard_phases_are_names_of_maps_a_resumable_stage_makes():
    def sharded(phases, resumable=True):
        return Stage("a", Empty, lambda cfg, ctx: {}, (), ("out",), resumable=resumable, shard_phases=phases)

    assert sharded(("signatures", "buckets")).shard_phases == ("signatures", "buckets")
    for bad in (2, ("a b",), ["x"]):
        with pytest.raises(ValueError, match="tuple of phase names"):
            sharded(bad)
    for bad in (("x", "x"), ("final",)):
        with pytest.raises(ValueError, match="repeat a name or use 'final'"):
            sharded(bad)
    with pytest.raises(ValueError, match="needs resumable=True"):
        sharded(("x",), resumable=False)
    from llmpipe.project import PROJECT

    assert {s.name: s.shard_phases for s in PROJECT.stages if s.shard_phases} == {
        "ingest": ("extract",), "dedup": ("signatures", "buckets"), "quality": ("filter",), "pii": ("scrub",),
        "decontaminate": ("scan",), "tokenize": ("tokenizer", "encode")}


def test_real_registry_forms_a_dag_of_the_stages_in_lifecycle_order():
    from llmpipe.project import PROJECT

    dag = build_dag(PROJECT.stages)
    assert dag.order == ["ingest", "dedup", "quality", "pii", "decontaminate", "tokenize", "pretrain", "sft", "align",
                         "quantize", "serve", "evaluate"]
    assert dag.descendants("pii") >= {"decontaminate", "tokenize", "pretrain", "sft", "align", "quantize", "serve",
                                      "evaluate"}


def test_a_config_selects_the_inputs_and_the_run_keeps_only_what_its_final_stages_need():
    from pipeline import ConfigError
    from pipeline.dag import select

    stages = [stage("data"), stage("pretrain", ["data.out"]), stage("sft", ["pretrain.out", "data.out"]),
              stage("serve", ["sft.out"]), stage("evaluate", ["pretrain.out", "sft.out"])]
    everything = select(stages, {s.name: s.inputs for s in stages})
    assert everything.order == ["data", "pretrain", "sft", "serve", "evaluate"] and everything.left_out == ()
    # sft from a model dir on files, evaluate of sft alone: no data, no pretrain
    finetune = select(stages, {"data": (), "pretrain": ("data.out",), "sft": (), "serve": ("sft.out",),
                                 "evaluate": ("sft.out",)})
    assert finetune.order == ["sft", "serve", "evaluate"] and finetune.left_out == ("data", "pretrain")
    assert finetune.parents["sft"] == ()
    with pytest.raises(ConfigError, match="'pretrain' is not part of this config's pipeline"):
        finetune.check_names(["pretrain"], "run.only")
    # a project without pretrain: an sft that does not select it runs; one that does is a named error
    partial = [stage("sft", ["pretrain.out"]), stage("serve", ["sft.out"])]
    assert select(partial, {"sft": (), "serve": ("sft.out",)}).order == ["sft", "serve"]
    with pytest.raises(MissingInputError, match="'sft' needs 'pretrain.out'"):
        select(partial, {"sft": ("pretrain.out",), "serve": ("sft.out",)})


def test_select_inputs_may_only_pick_declared_inputs():
    s = Stage("sft", Empty, lambda cfg, ctx: {}, ("pretrain.out",), ("out",), select_inputs=lambda cfg: ["x.out"])
    with pytest.raises(ValueError, match="does not declare"):
        s.needed_inputs(Empty())
