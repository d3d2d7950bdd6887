"""Start anywhere (plans only, no training): the stages a config runs follow the inputs it selects."""

import json

import pytest

from llmpipe.project import PROJECT, load_config
from pipeline.plan import check_inputs, make_plan
from stages.common.models import ModelSourceError, parse_model

DATA_STAGES = {"ingest", "dedup", "quality", "pii", "decontaminate", "tokenize"}


@pytest.fixture
def base_dir(tmp_path):
    model = tmp_path / "base"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return model


def plan_of(conf, *overrides, root):
    return make_plan(load_config(conf, [f"run.root={root}", *overrides]), PROJECT)


def test_the_finetune_recipe_plans_no_data_stage_and_no_pretrain(tmp_path, base_dir):
    plan = plan_of("tiny-finetune", f"stage.sft.base_model={base_dir}", root=tmp_path / "runs")
    assert list(plan.stages) == ["sft", "align", "quantize", "serve", "evaluate"]
    assert set(plan.dag.left_out) == DATA_STAGES | {"pretrain"}
    assert plan.stages["sft"].inputs == {} and plan.stages["align"].inputs.keys() == {"sft.model"}
    # the outside base model, the data files and the evaluated base are in the fingerprints, by content
    external = plan.stages["sft"].payload["external"]
    assert external["base_model"].startswith("xxh3_128:")
    assert {k for k in external if k.startswith("data.files[")} == {
        f"data.files[examples/data/chat-{f}.jsonl]" for f in ("messages", "sharegpt", "alpaca")}
    assert plan.stages["evaluate"].payload["external"]["models[base]"] == external["base_model"]
    check_inputs(plan)  # the shipped example files pass the preflight


def test_the_tiny_pipeline_still_plans_every_stage(tmp_path):
    plan = plan_of("tiny", root=tmp_path / "runs")
    from llmpipe.project import PROJECT

    assert plan.stages.keys() == set(PROJECT.stage_names) and plan.dag.left_out == ()
    assert plan.stages["sft"].inputs.keys() == {"pretrain.model", "pii.documents"}


def test_evaluating_only_the_pretrained_model_needs_no_sft_align_or_quantize(tmp_path):
    plan = plan_of("tiny", "stage.evaluate.models=[pretrain]", "run.only=[evaluate]", root=tmp_path / "runs")
    assert plan.dag.ancestors("evaluate") == DATA_STAGES | {"pretrain"}
    assert {n for n, sp in plan.stages.items() if sp.action == "run"} == DATA_STAGES | {"pretrain", "evaluate"}


def test_an_edited_data_file_reruns_sft_and_why_names_it(tmp_path, base_dir):
    from pipeline.plan import diff_payloads, explain

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    args = (f"stage.sft.base_model={base_dir}", f"stage.sft.data.files=[{data}]")
    before = plan_of("tiny-finetune", *args, root=tmp_path / "runs")
    with data.open("a") as f:
        f.write(json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}) + "\n")
    after = plan_of("tiny-finetune", *args, root=tmp_path / "runs")
    changed = {n for n in after.stages if after.stages[n].fingerprint != before.stages[n].fingerprint}
    assert changed == {"sft", "align", "quantize", "serve", "evaluate"}
    [change] = diff_payloads(before.stages["sft"].payload, after.stages["sft"].payload)
    assert (change.kind, change.key) == ("external", f"data.files[{data}]")
    assert explain(after, "sft").splitlines()[1] == "no successful run of this stage yet: it runs because it never ran"


@pytest.mark.parametrize("spec, kind", [("pretrain", "stage"), ("./models/x", "dir"), ("/abs/dir", "dir"),
                                        ("meta-llama/Llama-2-7b-hf", "hub"), ("org/name@v1.0", "hub")])
def test_base_model_values(spec, kind):
    assert parse_model(spec).kind == kind


def test_a_stage_that_runs_later_is_not_a_base_model():
    with pytest.raises(ModelSourceError, match="does not run before"):
        parse_model("align", ("pretrain",))
    with pytest.raises(Exception, match="stage.sft.base_model"):
        load_config("tiny", ["stage.sft.base_model=align"])


def test_evaluate_names_outside_models(tmp_path, base_dir):
    plan = plan_of("tiny", f"stage.evaluate.models=['base={base_dir}',pretrain]", root=tmp_path / "runs")
    assert plan.stages["evaluate"].inputs.keys() == {"pretrain.model", "tokenize.heldout"}
    with pytest.raises(Exception, match="unknown model 'gpt4'"):
        load_config("tiny", ["stage.evaluate.models=[gpt4]"])
    with pytest.raises(Exception, match="name of a stage's model"):
        load_config("tiny", [f"stage.evaluate.models=['sft={base_dir}']"])
