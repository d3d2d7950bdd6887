"""MLflow lineage, checked in a real MLflow store: parent and nested runs, params, curves, tags;
runs that start at once on a fresh root; a sync that fails, reported and finished by `llmpipe sync`."""

import json
import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.mlflow_sync import Sync
from pipeline.runner import Runner
from pipeline.tracking import JOURNAL_DIR, pending_journals, sync_error, tracking_uri


def tracked(toy, *overrides):
    return toy("tracking.enabled=true", *overrides)


def client_for(cfg):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(cfg))


def stage_runs(client, cfg, parent_key):
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    parent = client.search_runs([exp.experiment_id], f"tags.`llmpipe.run_key` = '{parent_key}'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, {r.info.run_name: r for r in children}


def test_parent_and_nested_runs_with_params_metrics_tags(toy):
    cfg = tracked(toy)
    result = Runner(cfg, toy.project).run()
    assert result.tracker.wait(timeout=120)
    client = client_for(cfg)
    parent, runs = stage_runs(client, cfg, result.tracker.key)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["config"] == "toy"
    assert set(runs) == {"source", "upper", "count", "side", "slow"}

    upper = runs["upper"]
    assert upper.info.status == "FINISHED"
    assert upper.data.params["suffix"] == "!" and upper.data.params["nested.a"] == "1"
    assert upper.data.metrics["chars"] == 11
    tags = upper.data.tags
    assert tags["llmpipe.fingerprint"] == result.outcomes["upper"].fingerprint
    assert json.loads(tags["llmpipe.input_fingerprints"]) == {"source.text": result.outcomes["source"].fingerprint}
    assert tags["llmpipe.output_path"] == str(result.outcomes["upper"].output)
    assert tags["llmpipe.status"] == "ran" and "llmpipe.git_commit" in tags
    artifacts = {a.path for a in client.list_artifacts(upper.info.run_id)}
    assert {"stage_info.json", "stage.log", "report.md"} <= artifacts  # report.md: asked for by the stage

    # a stepped metric is a curve
    history = client.get_metric_history(runs["source"].info.run_id, "progress")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2]


def test_cached_stage_gets_a_run_pointing_to_its_producer(toy):
    first = Runner(tracked(toy), toy.project).run()
    assert first.tracker.wait(timeout=120)
    second = Runner(tracked(toy, "stage.side.value=9"), toy.project).run()
    assert second.tracker.wait(timeout=120)
    client = client_for(tracked(toy))
    _, runs1 = stage_runs(client, tracked(toy), first.tracker.key)
    _, runs2 = stage_runs(client, tracked(toy), second.tracker.key)
    cached = runs2["upper"].data.tags
    assert cached["llmpipe.cached"] == "true" and cached["llmpipe.status"] == "cached"
    assert cached["llmpipe.produced_by_run_id"] == runs1["upper"].info.run_id
    assert runs2["upper"].data.metrics["chars"] == 11  # the producer's metrics, for comparison tables
    assert runs2["side"].data.tags["llmpipe.status"] == "ran"


def test_failed_stage_run_is_failed_in_mlflow(toy):
    cfg = tracked(toy, "stage.count.fail=true")
    result = Runner(cfg, toy.project).run()
    assert result.tracker.wait(timeout=120)
    parent, runs = stage_runs(client_for(cfg), cfg, result.tracker.key)
    assert runs["count"].info.status == "FAILED" and parent.info.status == "FAILED"
    assert "count asked to fail" in runs["count"].data.tags["llmpipe.error"]


def test_sync_resumes_a_partially_applied_journal_without_duplicates(toy):
    cfg = tracked(toy)
    from pipeline.tracking import JournalTracker

    tracker = JournalTracker(cfg, start_sync=False)
    result = Runner(cfg, toy.project, tracker=tracker).run()
    lines = tracker.journal.read_text().splitlines(keepends=True)
    # Apply the first half, as if the sync process had died there.
    half = tracker.journal.with_name("half.jsonl")
    half.write_text("".join(lines[: len(lines) // 2]))
    assert Sync(half).run(follow=False)
    half.write_text("".join(lines))
    Sync(half).run(follow=False)
    assert pending_journals(cfg.root) == [tracker.journal]  # the original was never applied
    assert json.loads(half.with_suffix(".state.json").read_text())["done"]
    client = client_for(cfg)
    parent, runs = stage_runs(client, cfg, result.tracker.key)
    assert len(runs) == 5
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert len(client.search_runs([exp.experiment_id])) == 6  # one parent + five stages, nothing twice


def test_environment_tracking_uri_wins(toy, monkeypatch, tmp_path):
    cfg = toy("tracking.uri=sqlite:////nowhere/x.db")
    assert tracking_uri(cfg) == "sqlite:////nowhere/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path}/env.db"


def test_tracking_disabled_writes_no_journal(toy):
    cfg = toy()
    Runner(cfg, toy.project).run()
    assert not (cfg.root / ".tracking").exists()


def cli(toy, *args):
    return main(list(args), project_path="tests.pipeline.toy:PROJECT", default_config_dir=toy.conf_dir)


def cli_process(toy, *args):
    """`llmpipe <args>` of the toy project as its own process (started, not waited for)."""
    code = ("import sys; from pathlib import Path; from pipeline.cli import main; sys.exit(main(sys.argv[2:], "
            "project_path='tests.pipeline.toy:PROJECT', default_config_dir=Path(sys.argv[1])))")
    return subprocess.Popen([sys.executable, "-c", code, str(toy.conf_dir), *args], cwd=toy.dir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.integration
def test_runs_starting_at_once_on_a_fresh_root_both_reach_mlflow(toy):
    """Two syncs on a fresh root race to create the SQLite schema ("duplicate column name: step") unless
    the store is created under its lock."""
    cfg = tracked(toy)
    procs = [cli_process(toy, "run", "-c", "toy", "--wait-tracking", "tracking.enabled=true") for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "warning" not in err, err[-3000:]
    keys = [line.split("llmpipe.run_key=")[1].split()[0] for out, _ in outputs for line in out.splitlines()
            if "llmpipe.run_key=" in line]
    assert len(keys) == 2
    client = client_for(cfg)
    for key in keys:
        parent, runs = stage_runs(client, cfg, key)
        assert parent.info.status == "FINISHED" and set(runs) == {"source", "upper", "count", "side", "slow"}
    assert pending_journals(cfg.root) == []
    for log in (cfg.root / JOURNAL_DIR).glob("*.sync.log"):
        assert "Error" not in log.read_text(), log.read_text()[-3000:]


def test_a_failed_sync_is_reported_shown_by_status_and_finished_by_sync(toy, capsys, monkeypatch):
    monkeypatch.chdir(toy.dir)
    store = toy.dir / "store"
    store.write_text("not a folder")  # the MLflow store cannot be created: the sync fails, the run does not
    args = ("-c", "toy", "tracking.enabled=true", f"tracking.uri=sqlite:///{store}/mlflow.db")
    assert cli(toy, "run", "--wait-tracking", *args) == 0
    err = capsys.readouterr().err
    assert "warning: tracking: the MLflow sync of" in err and "failed (FileExistsError" in err
    assert "run `llmpipe sync` to apply it" in err
    cfg = toy(*args[2:])
    [journal] = pending_journals(cfg.root)
    assert "FileExistsError" in sync_error(journal)

    assert cli(toy, "status", *args) == 0
    status = capsys.readouterr().out
    assert f"tracking: 1 journal(s) not yet in MLflow ({journal.name}: FileExistsError" in status
    assert status.rstrip().endswith("run `llmpipe sync`")

    assert cli(toy, "sync", *args) == 1  # still unreachable: says so, and the journal stays pending
    captured = capsys.readouterr()
    assert "applied 0 tracking journal(s)" in captured.out
    assert f"tracking journal {journal} did not reach MLflow: FileExistsError" in captured.err

    store.unlink()  # the store is reachable again
    assert cli(toy, "sync", *args) == 0
    assert "applied 1 tracking journal(s)" in capsys.readouterr().out
    assert pending_journals(cfg.root) == [] and sync_error(journal) is None
    assert cli(toy, "status", *args) == 0
    assert "tracking: all 1 journal(s) in MLflow" in capsys.readouterr().out
    parent, runs = stage_runs(client_for(cfg), cfg, json.loads(journal.read_text().splitlines()[0])["key"])
    assert parent.info.status == "FINISHED" and len(runs) == 5


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
