"""What MLflow shows of a pipeline, checked in a real MLflow store: the experiment's kind, the pipeline run's
name and summary metrics, the stages' logged models (references, linked to their runs, tagged with the
fingerprint and the committed path), dataset inputs with their digests, and the models' scores; a cached
run links the same models; re-applying a journal makes nothing twice; the orchestrator never imports mlflow.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import StageContext, config
from pipeline.mlflow_sync import KIND, KIND_TAG, Sync
from pipeline.runner import Runner
from pipeline.tracking import state_path, tracking_uri
from tests.pipeline.lineage_project import LINEAGE, MODEL_STAGES, write_lineage_conf


@pytest.fixture
def lineage(tmp_path):
    """Load the lineage project's config from a temporary project folder: lineage(overrides...). An outside
    model dir is scored by evaluate too."""
    conf_dir = write_lineage_conf(tmp_path)
    outside = tmp_path / "outside-model"
    outside.mkdir()

    def load(*overrides: str):
        return config.load(LINEAGE, conf_dir, "lineage", [f"stage.evaluate.outside_model={outside}", *overrides],
                           project_dir=tmp_path)

    load.dir = tmp_path
    return load


def run_tracked(cfg):
    result = Runner(cfg, LINEAGE).run()
    assert result.ok and result.tracker.wait(timeout=180)
    return result


def client_for(cfg):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    return client, client.get_experiment_by_name(cfg.tracking.experiment).experiment_id


def runs_of(client, exp_id, parent_key):
    parent = client.search_runs([exp_id], f"tags.`llmpipe.run_key` = '{parent_key}'")[0]
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, {r.info.run_name: r for r in children}


def models_of(client, exp_id):
    return {m.model_id: m for m in client.search_logged_models([exp_id])}


def datasets_of(run):
    return {(d.dataset.name, d.tags[0].value): d.dataset for d in run.inputs.dataset_inputs}


def test_kind_parent_models_datasets_and_scores_reach_mlflow(lineage):
    cfg = lineage()
    result = run_tracked(cfg)
    client, exp_id = client_for(cfg)
    assert client.get_experiment(exp_id).tags[KIND_TAG] == KIND == "custom_model_development"

    parent, runs = runs_of(client, exp_id, result.tracker.key)
    assert parent.info.run_name == "lineage: ran 7 (corpus, clean, pretrain, sft, +3)"
    assert {k: parent.data.metrics[k] for k in ("stages_ran", "stages_cached", "stages_failed", "stages_blocked")} == {
        "stages_ran": 7, "stages_cached": 0, "stages_failed": 0, "stages_blocked": 0}
    assert parent.data.metrics["wall_s"] > 0
    resolved = client.download_artifacts(parent.info.run_id, "resolved_config.json", str(lineage.dir))
    assert json.loads(Path(resolved).read_text())["stage"]["clean"] == {"drop": "spam"}

    # One logged model per model stage: a reference to the committed files, made by the stage's run.
    models = models_of(client, exp_id)
    by_name = {m.name: m for m in models.values()}
    assert sorted(by_name) == sorted(MODEL_STAGES) and len(models) == 4
    for stage in MODEL_STAGES:
        model, run, outcome = by_name[stage], runs[stage], result.outcomes[stage]
        assert str(model.status) == "READY" and model.source_run_id == run.info.run_id
        assert model.tags["llmpipe.fingerprint"] == outcome.fingerprint
        assert model.tags["llmpipe.model_path"] == str(outcome.output / "model")  # committed, not .partial
        assert model.tags["llmpipe.output_path"] == str(outcome.output)
        assert model.tags["llmpipe.stage"] == stage and model.tags["kind"] == "toy" and model.params == {"scale": "1"}
        assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
        assert client.list_logged_model_artifacts(model.model_id) == []  # tracking.copy_models=false: nothing copied

    # Datasets: the outside corpus by its content digest, pipeline data by the fingerprint of its producer.
    corpus_fp = result.outcomes["corpus"].fingerprint
    corpus = datasets_of(runs["corpus"])
    outside = corpus[("corpus", "input")]
    assert json.loads(outside.profile)["digest"].endswith(outside.digest) and len(outside.digest) == 32
    assert json.loads(outside.source) == {"uri": str(lineage.dir / "corpus.txt")} and outside.source_type == "local"
    assert json.loads(outside.profile)["num_rows"] == 5
    assert corpus[("corpus.documents", "output")].digest == corpus_fp
    clean = datasets_of(runs["clean"])
    assert clean[("corpus.documents", "input")].digest == corpus_fp  # the same dataset, read downstream
    assert clean[("clean.documents", "output")].digest == result.outcomes["clean"].fingerprint
    assert json.loads(clean[("clean.documents", "output")].profile)["num_rows"] == 3  # spam lines dropped
    assert json.loads(clean[("clean.documents", "output")].source) == {
        "uri": str(result.outcomes["clean"].output / "documents")}

    # Scores: on each model, by the model's committed path; an outside model's on the evaluate run only.
    evaluate = runs["evaluate"]
    for stage in MODEL_STAGES:
        scores = {m.key: m.value for m in by_name[stage].metrics}
        assert scores["score"] == pytest.approx(evaluate.data.metrics[f"{stage}.score"])
        assert scores["loss"] == pytest.approx(1 - scores["score"])
        assert {m.run_id for m in by_name[stage].metrics} == {evaluate.info.run_id}
    assert evaluate.data.metrics["outside.score"] == 0.01
    history = client.get_metric_history(evaluate.info.run_id, "score")  # one step per scored model, in order
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2, 3]


def test_a_cached_run_links_the_same_models_and_reapplying_makes_nothing_twice(lineage):
    cfg = lineage()
    first = run_tracked(cfg)
    second = run_tracked(cfg)
    client, exp_id = client_for(cfg)
    parent, runs = runs_of(client, exp_id, second.tracker.key)
    assert parent.info.run_name == "lineage: all 7 cached"
    assert parent.data.metrics["stages_cached"] == 7 and parent.data.metrics["stages_ran"] == 0
    models = models_of(client, exp_id)
    assert len(models) == 4  # the cached stages' runs are linked to the models their producers logged
    _, first_runs = runs_of(client, exp_id, first.tracker.key)
    for stage in MODEL_STAGES:
        (linked,) = [o.model_id for o in runs[stage].outputs.model_outputs]
        assert models[linked].source_run_id == first_runs[stage].info.run_id
        assert len(models[linked].metrics) == 2  # score and loss once: the cached evaluate adds none
    assert datasets_of(runs["clean"]).keys() == {("corpus.documents", "input"), ("clean.documents", "output")}

    # The first journal applied again from the start (its state lost): found, not made again.
    counts = (len(client.search_runs([exp_id])), len(models),
              sum(len(r.inputs.dataset_inputs) for r in client.search_runs([exp_id])))
    state_path(first.tracker.journal).unlink()
    assert Sync(first.tracker.journal).run(follow=False)
    assert (len(client.search_runs([exp_id])), len(models_of(client, exp_id)),
            sum(len(r.inputs.dataset_inputs) for r in client.search_runs([exp_id]))) == counts
    state_path(second.tracker.journal).unlink()  # and the cached run's: its links are not made twice
    assert Sync(second.tracker.journal).run(follow=False)
    _, runs = runs_of(client, exp_id, second.tracker.key)
    assert all(len(runs[stage].outputs.model_outputs) == 1 for stage in MODEL_STAGES)


def test_copy_models_and_register_models(lineage):
    cfg = lineage("+tracking.copy_models=true", "+tracking.register_models={quantize: lineage-served}")
    result = run_tracked(cfg)
    client, exp_id = client_for(cfg)
    by_name = {m.name: m for m in models_of(client, exp_id).values()}
    files = {f.path for f in client.list_logged_model_artifacts(by_name["sft"].model_id)}
    assert files == {"weights.txt", "config.json"}
    (version,) = client.search_model_versions("name = 'lineage-served'")
    quantize = by_name["quantize"].model_id
    assert version.source == f"models:/{quantize}" and version.run_id == by_name["quantize"].source_run_id
    assert version.tags["llmpipe.model_path"] == str(result.outcomes["quantize"].output / "model")
    assert json.loads(client.get_logged_model(quantize).tags["mlflow.modelVersions"]) == [
        {"name": "lineage-served", "version": 1}]
    # Applied again: still one version.
    state_path(result.tracker.journal).unlink()
    Sync(result.tracker.journal).run(follow=False)
    assert len(client.search_model_versions("name = 'lineage-served'")) == 1


def test_the_orchestrator_never_imports_mlflow(lineage):
    """The runner only writes the journal; the sync process imports mlflow (pipeline/tracking.py)."""
    conf, project = str(lineage.dir / "conf"), str(lineage.dir)
    code = ("import sys; from pipeline import config; from pipeline.runner import Runner; "
            "from tests.pipeline.lineage_project import LINEAGE; "
            f"cfg = config.load(LINEAGE, {conf!r}, 'lineage', [], project_dir={project!r}); "
            "r = Runner(cfg, LINEAGE).run(); ok = r.ok and r.tracker.wait(timeout=180); "
            "print('MLFLOW', 'mlflow' in sys.modules, 'OK', ok)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert "MLFLOW False OK True" in proc.stdout, proc.stderr[-3000:]
    client, exp_id = client_for(lineage())
    assert len(models_of(client, exp_id)) == 4  # tracking was on, and reached MLflow


def test_context_records_paths_relative_to_the_output_and_rejects_undigested_outside_data(tmp_path):
    out, upstream = tmp_path / ".partial" / "s-1", tmp_path / "up" / "up-2" / "documents"
    out.mkdir(parents=True)
    ctx = StageContext("s", "1", out, {"up.documents": upstream})
    ctx.log_model("s", out / "model")
    ctx.log_model("s", out / "model2", params={"a": 1})  # the same name again: replaced (a resumed attempt)
    ctx.log_dataset("up.documents", upstream)  # an input: its producer's fingerprint, filled in by the runner
    ctx.log_model_metrics(upstream, {"x": 1})
    ctx.log_model_metrics("abcdef123456", {"x": 2})
    logged = json.loads((out / "_logged.json").read_text())
    assert logged["models"] == [{"name": "s", "output": "model2", "params": {"a": "1"}, "tags": {}}]
    assert logged["datasets"][0]["path"] == str(upstream) and logged["datasets"][0]["digest"] is None
    assert [m.get("path") or m.get("fingerprint") for m in logged["model_metrics"]] == [str(upstream), "abcdef123456"]
    with pytest.raises(ValueError, match="give its digest"):
        ctx.log_dataset("raw", tmp_path / "raw.jsonl")
    (tmp_path / "link").symlink_to(out)  # an output dir reached through a link, a path given resolved
    linked = StageContext("s", "1", tmp_path / "link", {})
    linked.log_model("t", out.resolve() / "model")
    assert json.loads((out / "_logged.json").read_text())["models"][-1]["output"] == "model"
    with pytest.raises(ValueError, match="model name 'a.b'"):
        ctx.log_model("a.b", out / "model")


@pytest.mark.integration
def test_the_data_stages_chain_their_datasets(tiny_data):
    """The real data stages (the session's tiny run, ingest -> tokenize, tracked): each reads the dataset the
    stage before it wrote, by the same name and digest (its producer's fingerprint)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_data['root'] / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("llmpipe").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([exp_id], "tags.`llmpipe.status` = 'ran'")}
    chain = ["ingest", "dedup", "quality", "pii", "decontaminate"]
    for before, after in zip(chain, [*chain[1:], "tokenize"], strict=True):
        written = datasets_of(runs[before])[(f"{before}.documents", "output")]
        read = datasets_of(runs[after])[(f"{before}.documents", "input")]
        assert written.digest == read.digest == runs[before].data.tags["llmpipe.fingerprint"]
        assert json.loads(written.profile)["num_rows"] == runs[before].data.metrics["docs_out"]
    warc = datasets_of(runs["ingest"])[("ingest.warc", "input")]
    assert json.loads(warc.profile)["num_rows"] == runs["ingest"].data.metrics["docs_in"]
    tokens = datasets_of(runs["tokenize"])
    assert json.loads(tokens[("tokenize.tokens.train", "output")].profile)["num_rows"] == (
        runs["tokenize"].data.metrics["sequences_train"])
    assert ("tokenize.heldout", "output") in tokens


def test_a_model_path_with_a_quote_is_found(tmp_path):
    """MLflow's search filter cannot hold a quote (3.17): such a path is looked up another way, still exactly."""
    from mlflow.tracking import MlflowClient

    sync = Sync(tmp_path / "j.jsonl")
    sync.client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    sync.experiment_id = sync.client.create_experiment("quotes")
    for path in ("/runs/it's/model", "/runs/it_s/model", "/runs/back\\slash/model"):
        sync.client.create_logged_model(sync.experiment_id, name="m", tags={"llmpipe.model_path": path})
    for path in ("/runs/it's/model", "/runs/it_s/model", "/runs/back\\slash/model"):
        assert [m.tags["llmpipe.model_path"] for m in sync._models_tagged("llmpipe.model_path", path)] == [path]
